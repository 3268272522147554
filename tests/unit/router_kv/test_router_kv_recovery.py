"""Gap recovery: dropped KV events are fetched from the worker's local indexer."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry
from router_kv_tools import BS, SimWorker, held_paths, tokens

from armature.protocols.hashing import compute_local_block_hashes
from armature.router.kv import InProcessGapHandler, KvRouter, LocalKvIndexer, RouterMetrics
from armature.router.kv.messages import EventRangeReply, WorkerSnapshot


def traffic(worker: SimWorker, rng: random.Random, n: int) -> list:
    """A realistic event stream: prefixes stored, extended, tails evicted, once a clear."""
    events = []
    seqs: list[list[int]] = []
    for i in range(n):
        r = rng.random()
        if seqs and r < 0.3:
            s = rng.choice(seqs)
            events += worker.evict_tail(s, rng.randint(1, 2))
        elif r < 0.33 and i > n // 2:
            events += worker.clear()
        else:
            labels = [rng.choice("ABCDEFGH") for _ in range(rng.randint(1, 6))]
            s = tokens(*labels)
            seqs.append(s)
            events += worker.store(s)
    return events


def router_with(handler: InProcessGapHandler) -> tuple[KvRouter, CollectorRegistry]:
    registry = CollectorRegistry()
    return KvRouter(block_size=BS, gap_handler=handler, metrics=RouterMetrics(registry)), registry


def assert_converged(router: KvRouter, worker: SimWorker) -> None:
    assert held_paths(router.indexer.dump_worker(worker.worker_id)) == held_paths(worker.local.snapshot().events)
    assert router.indexer.last_event_id(worker.worker_id) == worker.local.last_event_id
    for labels in ("ABC", "AAA", "HGF", "B"):
        q = tokens(*labels)
        assert router.find_matches(q).scores == worker.local.index.find_matches(
            compute_local_block_hashes(q, BS)
        ).scores


async def test_dropped_events_are_fetched_and_the_index_converges() -> None:
    worker = SimWorker(7)
    handler = InProcessGapHandler()
    handler.register(worker.local)
    router, registry = router_with(handler)
    router.register_worker(7)
    events = traffic(worker, random.Random(3), 80)
    assert len(events) > 40
    dropped = {5, 6, 7, 20, 41}
    for i, ev in enumerate(events):
        if i not in dropped:
            await router.on_event(ev)
    await router.drain()
    assert router.indexer.stats.gaps >= 3
    assert registry.get_sample_value("armature_router_kv_event_gaps_total") >= 3
    assert registry.get_sample_value("armature_router_kv_recoveries_total", {"kind": "range", "outcome": "ok"}) >= 3
    assert router.indexer.open_gap(7) is None
    assert_converged(router, worker)


async def test_events_during_recovery_are_buffered_and_applied_in_order() -> None:
    worker = SimWorker(8)
    handler = InProcessGapHandler()
    handler.register(worker.local)
    router, _ = router_with(handler)
    router.register_worker(8)
    events = traffic(worker, random.Random(4), 60)
    for ev in events[:10]:
        await router.on_event(ev)
    # events[10] is lost; the rest arrive before the recovery task gets to run.
    for ev in events[11:]:
        router.apply_event(ev)
    assert router.indexer.open_gap(8) is not None
    await router.on_event(events[11])  # a duplicate that triggers the recovery
    await router.drain()
    assert_converged(router, worker)


async def test_gap_older_than_the_log_falls_back_to_a_snapshot() -> None:
    worker = SimWorker(9)
    worker.local = LocalKvIndexer(9, max_log_events=4)
    handler = InProcessGapHandler()
    handler.register(worker.local)
    router, registry = router_with(handler)
    router.register_worker(9)
    events = traffic(worker, random.Random(5), 50)
    await router.on_event(events[0])
    await router.on_event(events[-1])  # everything between was lost and is no longer logged
    await router.drain()
    assert registry.get_sample_value("armature_router_kv_recoveries_total", {"kind": "snapshot", "outcome": "ok"}) == 1
    assert_converged(router, worker)


async def test_new_worker_state_is_loaded_on_discovery() -> None:
    worker = SimWorker(10)
    handler = InProcessGapHandler()
    handler.register(worker.local)
    traffic(worker, random.Random(6), 30)  # published before this router existed
    router, _ = router_with(handler)
    await router.add_worker(10)
    assert_converged(router, worker)
    for ev in traffic(worker, random.Random(7), 10):
        await router.on_event(ev)
    await router.drain()
    assert_converged(router, worker)
    assert router.indexer.stats.gaps == 0


async def test_unreachable_worker_restarts_empty_instead_of_stalling() -> None:
    worker = SimWorker(11)
    handler = InProcessGapHandler()  # the worker's local indexer is not reachable
    router, registry = router_with(handler)
    router.register_worker(11)
    events = traffic(worker, random.Random(8), 30)
    await router.on_event(events[0])
    await router.on_event(events[2])
    await router.drain()
    assert router.indexer.open_gap(11) is None
    assert registry.get_sample_value("armature_router_kv_recoveries_total", {"kind": "snapshot", "outcome": "error"}) == 1
    # Later events keep applying.
    for ev in events[3:]:
        await router.on_event(ev)
    assert router.indexer.last_event_id(11) == events[-1].event.event_id


class SilentWorker:
    """A GapHandler whose worker never answers (hung process, partitioned network)."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def fetch_events(self, worker_id: int, first: int, last: int) -> EventRangeReply:
        await self.never.wait()
        raise AssertionError("unreachable")

    async def fetch_snapshot(self, worker_id: int) -> WorkerSnapshot:
        await self.never.wait()
        raise AssertionError("unreachable")


async def test_a_hung_worker_times_out_and_indexing_resumes() -> None:
    worker = SimWorker(12)
    router = KvRouter(block_size=BS, gap_handler=SilentWorker(), recovery_timeout_s=0.05)
    router.register_worker(12)
    events = traffic(worker, random.Random(9), 20)
    await router.on_event(events[0])
    await router.on_event(events[3])
    await asyncio.wait_for(router.drain(), 5)
    assert router.indexer.open_gap(12) is None
    assert router.indexer.last_event_id(12) == events[3].event.event_id
