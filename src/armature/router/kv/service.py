"""KvRouter: the KV-aware routing service a frontend or the standalone router embeds.

It consumes workers' KV events (``on_event``) into the indexer — or, with
``--no-router-kv-events``, predicts caches from its own routing history — tracks the requests it
routed, and answers ``best_worker(token_ids)`` with the cheapest (worker, dp_rank). With
``--router-replica-sync`` every local change to the active requests is published as a
``ReplicaSyncMessage`` and peers' messages are applied with ``apply_remote``.

Nothing here does I/O itself: KV events come in as structs, gap recovery goes through a
``GapHandler`` and replica sync through a ``SyncPublisher``, so the transport is wired by the
caller and every decision is a pure, synchronous function of the state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from armature.protocols.hashing import compute_local_block_hashes
from armature.protocols.kv_events import KvRemoved, KvStored, RouterEvent
from armature.protocols.llm import RoutingHints
from armature.protocols.load import ActiveLoad
from armature.router.kv.active_sequences import ActiveSequences
from armature.router.kv.approx import ApproxKvIndexer
from armature.router.kv.candidates import CandidateTable
from armature.router.kv.config import KvRouterConfig
from armature.router.kv.gap_recovery import GapHandler
from armature.router.kv.indexer import EventGap, KvIndexer, OverlapScores
from armature.router.kv.messages import (
    ReplicaSyncMessage,
    SeqAdded,
    SeqFreed,
    SeqPrefillDone,
    WorkerSnapshot,
)
from armature.router.kv.metrics import RouterMetrics
from armature.router.kv.scheduler import CostInputs, KvScheduler, RequestShape, Selection, WorkerCost
from armature.router.kv.scheduler import logger as logger_kv_scheduler
from armature.router.kv.slots import WorkerKey

logger = logging.getLogger(__name__)

_ns = time.perf_counter_ns


class NoWorkersError(RuntimeError):
    """No worker is registered (or none matches the request's dp_rank)."""


class UnknownWorkerError(LookupError):
    """A pinned worker (``backend_instance_id``) is not registered with the router."""


class SyncPublisher(Protocol):
    def publish(self, message: ReplicaSyncMessage) -> None:
        """Hand a message to the event plane; must not block (queue it)."""
        ...


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    worker_id: int
    dp_rank: int
    overlap_blocks: int  # request blocks cached (or in flight) on the chosen worker
    request_blocks: int  # full blocks of the request
    prefill_tokens: int  # tokens the chosen worker still has to prefill for this request
    pinned: bool  # chosen by the request (backend_instance_id), not by cost


class KvRouter:
    def __init__(
        self,
        config: KvRouterConfig | None = None,
        *,
        block_size: int | None = None,
        router_id: int | None = None,
        metrics: RouterMetrics | None = None,
        gap_handler: GapHandler | None = None,
        sync_publisher: SyncPublisher | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        recovery_timeout_s: float = 10.0,
    ) -> None:
        self.config = config = config if config is not None else KvRouterConfig()
        bs = config.kv_cache_block_size or block_size
        if bs is None:
            raise ValueError("the KV router needs a block size: --kv-cache-block-size or the model card's")
        if bs <= 0:
            raise ValueError(f"block size must be positive, got {bs}")
        self.block_size = bs
        self.router_id = router_id if router_id is not None else random.getrandbits(63)
        self.metrics = metrics
        self.gap_handler = gap_handler
        # Every fetch from a worker's local indexer is bounded; a hung worker must not leave
        # its events buffered forever.
        self.recovery_timeout_s = recovery_timeout_s
        self.sync_publisher = sync_publisher if config.router_replica_sync else None
        if config.router_replica_sync and sync_publisher is None:
            raise ValueError("--router-replica-sync needs a sync publisher (the event plane)")
        self._clock = clock
        self.indexer: KvIndexer | None = KvIndexer() if config.use_kv_events else None
        self.approx: ApproxKvIndexer | None = (
            None
            if config.use_kv_events
            else ApproxKvIndexer(
                ttl_secs=config.router_ttl_secs,
                max_tree_size=config.router_max_tree_size,
                prune_target_ratio=config.router_prune_target_ratio,
                clock=clock,
            )
        )
        self.active = ActiveSequences(
            bs,
            ttl_secs=config.active_sequence_ttl_secs,
            assume_kv_reuse=config.router_assume_kv_reuse,
            track_active_blocks=config.router_track_active_blocks,
            clock=clock,
        )
        self.active.on_change = self._load_changed
        self.scheduler = KvScheduler(bs, rng)
        self._workers: dict[int, int] = {}  # worker_id -> dp_size
        self._candidates: list[WorkerKey] = []
        # Late events of a worker that left discovery must not resurrect it.
        self._departed: deque[int] = deque(maxlen=4096)
        self._departed_set: set[int] = set()
        self._recoveries: dict[int, asyncio.Task[None]] = {}
        self._gaps_reported = 0
        # Per registered candidate, its ``_base_load`` as an array over ``_candidates``, kept
        # current on every load change: the common decision (no pinning, no per-request weight)
        # is then vector arithmetic over all workers.
        self._table = CandidateTable()

    # ------------------------------------------------------------------ workers

    @property
    def _index(self) -> KvIndexer:
        return self.indexer if self.indexer is not None else self.approx.index  # type: ignore[union-attr]

    def workers(self) -> dict[int, int]:
        return dict(self._workers)

    def register_worker(self, worker_id: int, dp_size: int = 1) -> None:
        """Make a worker a routing candidate (all its dp ranks)."""
        if dp_size <= 0:
            raise ValueError(f"dp_size must be positive, got {dp_size}")
        self._departed_set.discard(worker_id)
        self._workers[worker_id] = dp_size
        for dp in range(dp_size):
            self.active.ensure_worker((worker_id, dp))
        self._rebuild_candidates()

    async def add_worker(self, worker_id: int, dp_size: int = 1) -> None:
        """Register a newly discovered worker and load its full KV state from its local indexer."""
        self.register_worker(worker_id, dp_size)
        if self.indexer is not None and self.gap_handler is not None:
            self.indexer.hold_events(worker_id)
            await self._load_snapshot(worker_id)

    def remove_worker(self, worker_id: int) -> None:
        """A worker left discovery: forget its blocks and the requests routed to it."""
        dp_size = self._workers.pop(worker_id, 1)
        if len(self._departed) == self._departed.maxlen:
            self._departed_set.discard(self._departed[0])
        self._departed.append(worker_id)
        self._departed_set.add(worker_id)
        task = self._recoveries.pop(worker_id, None)
        if task is not None:
            task.cancel()
        if self.indexer is not None:
            self.indexer.remove_worker(worker_id)
        if self.approx is not None:
            self.approx.remove_worker(worker_id)
        dropped = self.active.remove_worker(worker_id)
        self._rebuild_candidates()
        if self.metrics is not None:
            self.metrics.remove_worker(worker_id, list(range(dp_size)))
        logger.info("worker %x removed from the KV router (%d active requests dropped)", worker_id, dropped)

    # ------------------------------------------------------------------ KV events

    def apply_event(self, event: RouterEvent) -> EventGap | None:
        """Apply one event now; returns a gap the caller must recover (see ``on_event``)."""
        if self.indexer is None:
            raise RuntimeError("KV events received but the router runs with --no-router-kv-events")
        if event.worker_id in self._departed_set:
            return None
        if self.metrics is not None:
            data = event.event.data
            kind = "stored" if isinstance(data, KvStored) else "removed" if isinstance(data, KvRemoved) else "cleared"
            self.metrics.event_types[kind].inc()
        gap = self.indexer.apply_event(event)
        if gap is not None:
            self._report_gaps()
        return gap

    def _report_gaps(self) -> None:
        # Gaps also open while buffered events drain after a recovery; count them all.
        assert self.indexer is not None
        new = self.indexer.stats.gaps - self._gaps_reported
        if new and self.metrics is not None:
            self.metrics.kv_event_gaps.inc(new)
        self._gaps_reported += new

    async def on_event(self, event: RouterEvent) -> None:
        """Apply one event; a gap starts a recovery from the worker's local indexer."""
        self.apply_event(event)
        # Check the open gap, not just this event's result: the gap may have opened through
        # ``apply_event`` alone, with no recovery started yet.
        wid = event.worker_id
        if self.gap_handler is not None and self.indexer.open_gap(wid) is not None:  # type: ignore[union-attr]
            running = self._recoveries.get(wid)
            if running is None or running.done():
                self._recoveries[wid] = asyncio.create_task(self._recover(wid), name=f"kv-recover-{wid:x}")

    async def consume(self, events: AsyncIterable[RouterEvent]) -> None:
        """Feed a stream of events (an event-plane subscription) until it ends."""
        async for event in events:
            await self.on_event(event)

    async def drain(self) -> None:
        """Wait for every recovery in flight."""
        while self._recoveries:
            tasks = list(self._recoveries.values())
            await asyncio.gather(*tasks, return_exceptions=True)
            for wid, task in list(self._recoveries.items()):
                if task.done():
                    del self._recoveries[wid]

    async def _recover(self, worker_id: int) -> None:
        assert self.indexer is not None and self.gap_handler is not None
        indexer = self.indexer
        while (gap := indexer.open_gap(worker_id)) is not None:
            try:
                reply = await asyncio.wait_for(
                    self.gap_handler.fetch_events(worker_id, gap.first, gap.last), self.recovery_timeout_s
                )
            except Exception:
                logger.exception("fetching events %d..%d of worker %x failed", gap.first, gap.last, worker_id)
                self._count_recovery("range", "error")
                await self._load_snapshot(worker_id)
                continue
            if reply.complete:
                remaining = indexer.fill_gap(worker_id, reply.events)
                self._report_gaps()
                if remaining is None or remaining != gap:
                    self._count_recovery("range", "ok")
                    logger.info("recovered events %d..%d of worker %x", gap.first, gap.last, worker_id)
                    continue
            self._count_recovery("range", "incomplete")
            await self._load_snapshot(worker_id)

    async def _load_snapshot(self, worker_id: int) -> None:
        assert self.indexer is not None and self.gap_handler is not None
        try:
            snap: WorkerSnapshot = await asyncio.wait_for(
                self.gap_handler.fetch_snapshot(worker_id), self.recovery_timeout_s
            )
        except Exception:
            # Forget what we knew and continue from the buffered events: the index then
            # under-estimates this worker's cache, which only costs hits, never correctness.
            logger.exception("fetching the KV snapshot of worker %x failed; its index restarts empty", worker_id)
            self._count_recovery("snapshot", "error")
            gap = self.indexer.open_gap(worker_id)
            self.indexer.load_worker_snapshot(worker_id, [], gap.last if gap is not None else None)
            self._report_gaps()
            return
        if worker_id not in self._workers and worker_id in self._departed_set:
            return
        self.indexer.load_worker_snapshot(worker_id, snap.events, snap.last_event_id)
        self._report_gaps()
        self._count_recovery("snapshot", "ok")
        logger.info(
            "loaded KV snapshot of worker %x: %d events up to event %s",
            worker_id, len(snap.events), snap.last_event_id,
        )

    def _count_recovery(self, kind: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.kv_recoveries.labels(kind=kind, outcome=outcome).inc()

    # ------------------------------------------------------------------ queries

    def block_hashes(self, token_ids: Sequence[int], lora_name: str | None = None) -> list[int]:
        """The canonical local block hashes this router matches on (reusable across routers)."""
        return compute_local_block_hashes(token_ids, self.block_size, lora_name)

    def find_matches(self, token_ids: Sequence[int], lora_name: str | None = None) -> OverlapScores:
        local = compute_local_block_hashes(token_ids, self.block_size, lora_name)
        if self.approx is not None:
            return self.approx.find_matches(local)
        assert self.indexer is not None
        return self.indexer.find_matches(local)

    def potential_loads(
        self, token_ids: Sequence[int], lora_name: str | None = None, hints: RoutingHints | None = None
    ) -> list[WorkerCost]:
        """What each candidate's cost would be for this request (nothing is booked)."""
        local = compute_local_block_hashes(token_ids, self.block_size, lora_name)
        weight = self._weight(hints)
        return self.scheduler.costs(
            self._cost_inputs(self._candidates, local, len(token_ids), self._match(local, weight), weight)
        )

    def active_loads(self) -> list[ActiveLoad]:
        return [
            ActiveLoad(
                worker_id=s.worker_id,
                dp_rank=s.dp_rank,
                active_decode_blocks=s.active_blocks,
                active_prefill_tokens=s.active_prefill_tokens,
                num_running_reqs=s.num_requests,
            )
            for s in self.active.loads()
        ]

    def dump_events(self) -> list[RouterEvent]:
        return self._index.dump_events()

    def _weight(self, hints: RoutingHints | None) -> float:
        if hints is not None and hints.overlap_score_weight is not None:
            if hints.overlap_score_weight < 0:
                raise ValueError(f"overlap_score_weight must be >= 0, got {hints.overlap_score_weight}")
            return hints.overlap_score_weight
        return self.config.overlap_score_weight

    def _cost_inputs(
        self,
        candidates: Sequence[WorkerKey],
        local: Sequence[int],
        isl: int,
        scores: OverlapScores,
        weight: float,
    ) -> CostInputs:
        active = self.active
        return CostInputs(
            candidates,
            RequestShape(isl, active.request_blocks(isl)),
            scores.scores,
            scores.tree_sizes,
            active.prefill_tokens,
            active.active_blocks,
            active.already_active(local),
            weight,
        )

    def _match(self, local: Sequence[int], weight: float) -> OverlapScores:
        # Weight 0 means pure load balancing: skip the index walk (Dynamo runs no indexer then).
        if weight == 0:
            return OverlapScores({}, [], self._index.tree_sizes())
        if self.approx is not None:
            return self.approx.find_matches(local, frequencies=False)
        assert self.indexer is not None
        return self.indexer.find_matches(local, frequencies=False)

    # ------------------------------------------------------------------ routing

    def best_worker(
        self,
        token_ids: Sequence[int],
        *,
        hints: RoutingHints | None = None,
        request_id: str | None = None,
        lora_name: str | None = None,
        block_hashes: Sequence[int] | None = None,
    ) -> RoutingDecision:
        """Choose a (worker, dp_rank) for the request; with ``request_id`` also book it.

        ``block_hashes``: the request's canonical local block hashes when the caller already has
        them (a prefill router and a decode router routing the same prompt hash it once).
        """
        t0 = _ns()
        isl = len(token_ids)
        if block_hashes is None:
            local: Sequence[int] = compute_local_block_hashes(token_ids, self.block_size, lora_name)
        elif len(block_hashes) != isl // self.block_size:
            raise ValueError(
                f"{len(block_hashes)} block hashes for {isl} tokens of block size {self.block_size}"
            )
        else:
            local = block_hashes
        t1 = _ns()

        weight = self._weight(hints)
        temperature = self.config.router_temperature
        candidates = self._candidates
        pinned = False
        if hints is not None:
            if hints.router_temperature is not None:
                if hints.router_temperature < 0:
                    raise ValueError(f"router_temperature must be >= 0, got {hints.router_temperature}")
                temperature = hints.router_temperature
            if hints.backend_instance_id is not None:
                wid = hints.backend_instance_id
                dp_size = self._workers.get(wid)
                if dp_size is None:
                    raise UnknownWorkerError(f"backend_instance_id {wid:x} is not a registered worker")
                dp = hints.dp_rank or 0
                if not 0 <= dp < dp_size:
                    raise ValueError(f"dp_rank {dp} out of range for worker {wid:x} (dp_size {dp_size})")
                candidates = [(wid, dp)]
                pinned = True
            elif hints.dp_rank is not None:
                candidates = [k for k in candidates if k[1] == hints.dp_rank]
        if not candidates:
            raise NoWorkersError("no workers registered with the KV router")

        if candidates is self._candidates and weight == self.config.overlap_score_weight:
            sel, t2 = self._select_all(local, isl, weight, temperature)
        else:
            scores = self._match(local, weight)
            t2 = _ns()
            sel = self.scheduler.select(self._cost_inputs(candidates, local, isl, scores, weight), temperature)
        t3 = _ns()
        key = (sel.worker_id, sel.dp_rank)
        if request_id is not None:
            self._book(request_id, key, local, isl, sel.overlap_blocks)
        decision = RoutingDecision(sel.worker_id, sel.dp_rank, sel.overlap_blocks, len(local), sel.prefill_tokens, pinned)
        m = self.metrics
        if m is not None:
            t4 = _ns()
            m.requests_total.inc()
            if local:
                m.kv_hit_rate.observe(sel.overlap_blocks / len(local))
            m.overhead_hashing_ms.observe((t1 - t0) / 1e6)
            m.overhead_find_matches_ms.observe((t2 - t1) / 1e6)
            m.overhead_scheduling_ms.observe((t3 - t2) / 1e6)
            m.overhead_total_ms.observe((t4 - t0) / 1e6)
        return decision

    def _select_all(
        self, local: Sequence[int], isl: int, weight: float, temperature: float
    ) -> tuple[Selection, int]:
        """Every registered candidate at the configured weight, as vectors (``KvScheduler.select``'s
        rule and result); also returns the time the index walk ended."""
        if self.approx is not None:
            self.approx.expire()
        index = self._index
        table = self._table
        levels = index.match_levels(local) if weight else []
        t2 = _ns()
        overlap = table.spread(levels, index)
        active = self.active
        shared = active.active_levels(local)
        if shared:
            # Blocks in flight there count as cached for the prefill term (see scheduler.py)
            # and are not new decode blocks.
            in_flight = table.spread(shared, active)
            overlap = np.maximum(overlap, in_flight)
            logits = table.base - weight * overlap - in_flight
        else:
            logits = table.base - weight * overlap if levels else table.base
        request_blocks = active.request_blocks(isl)
        const = weight / self.block_size * isl + request_blocks
        keys = table.keys
        i = self.scheduler.pick(
            logits, const, lambda ties: table.gather(index.slot_sizes, index, ties) - overlap[ties], temperature
        )
        key = keys[i]
        ov = int(overlap[i])
        if logger_kv_scheduler.isEnabledFor(logging.DEBUG):
            scores = index.find_matches(local, frequencies=False)
            self.scheduler.log_costs(self._cost_inputs(keys, local, isl, scores, weight), key)
        sel = Selection(key[0], key[1], ov, float(logits[i]) + const, max(isl - ov * self.block_size, 0))
        return sel, t2

    def _book(self, request_id: str, key: WorkerKey, local: Sequence[int], isl: int, overlap: int) -> None:
        self.active.add_request(request_id, key, local, isl, overlap)
        if self.approx is not None:
            self.approx.record(key, local)
        if self.sync_publisher is not None:
            self.sync_publisher.publish(
                SeqAdded(
                    router_id=self.router_id,
                    request_id=request_id,
                    worker_id=key[0],
                    dp_rank=key[1],
                    local_hashes=list(local),
                    isl=isl,
                    overlap_blocks=overlap,
                )
            )

    def mark_prefill_completed(self, request_id: str) -> bool:
        """The request's first token arrived: its prefill tokens no longer load the worker."""
        if not self.active.mark_prefill_completed(request_id):
            return False
        if self.sync_publisher is not None:
            self.sync_publisher.publish(SeqPrefillDone(router_id=self.router_id, request_id=request_id))
        return True

    def free(self, request_id: str) -> bool:
        """The request finished or was cancelled: release everything it holds."""
        if not self.active.free(request_id):
            return False
        if self.sync_publisher is not None:
            self.sync_publisher.publish(SeqFreed(router_id=self.router_id, request_id=request_id))
        return True

    def expire(self) -> int:
        """Drop requests older than the active-sequence TTL (and expired approximate blocks)."""
        n = self.active.expire()
        if self.approx is not None:
            self.approx.expire()
        return n

    # ------------------------------------------------------------------ replica sync

    def apply_remote(self, message: ReplicaSyncMessage) -> None:
        """Apply another router replica's active-sequence change (our own echoes are ignored)."""
        if message.router_id == self.router_id:
            return
        rid = f"{message.router_id:x}/{message.request_id}"
        if isinstance(message, SeqAdded):
            key = (message.worker_id, message.dp_rank)
            if message.worker_id in self._departed_set:
                return
            if rid in self.active:
                return
            self.active.add_request(rid, key, message.local_hashes, message.isl, message.overlap_blocks)
            if self.approx is not None:
                self.approx.record(key, message.local_hashes)
        elif isinstance(message, SeqPrefillDone):
            self.active.mark_prefill_completed(rid)
        elif isinstance(message, SeqFreed):
            self.active.free(rid)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown replica sync message {type(message).__name__}")

    # ------------------------------------------------------------------ gauges

    def _base_load(self, key: WorkerKey) -> float:
        """The request-independent part of a candidate's logit at the configured weight."""
        active = self.active
        return (
            self.config.overlap_score_weight / self.block_size * active.prefill_tokens.get(key, 0)
            + active.active_blocks.get(key, 0)
        )

    def _rebuild_candidates(self) -> None:
        """Every (worker, dp_rank) of the registered workers, and their loads as a table."""
        self._candidates = [(w, dp) for w, n in sorted(self._workers.items()) for dp in range(n)]
        self._table.reset(self._candidates, self._base_load)

    def _load_changed(self, key: WorkerKey) -> None:
        """The load of ``key`` changed: refresh the decision cache and the gauges."""
        self._table.set_base(key, self._base_load(key))
        if self.metrics is not None:
            load = self.active.load_of(key)
            self.metrics.set_worker_load(key[0], key[1], load.active_blocks, load.active_prefill_tokens)

    def refresh_gauges(self) -> None:
        if self.metrics is None:
            return
        for s in self.active.loads():
            self.metrics.set_worker_load(s.worker_id, s.dp_rank, s.active_blocks, s.active_prefill_tokens)
        for (wid, dp), size in self._index.tree_sizes().items():
            self.metrics.worker_cached_blocks.labels(f"{wid:x}", str(dp)).set(size)
