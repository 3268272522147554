"""Worker → event plane: engine load metrics and KV cache events; load also into ``/metrics``.

* Load: every ``interval_s`` the engine's ``LoadMetrics`` become an ``ActiveLoad`` on the event
  plane (the router's busy detection and the planner read it) and ``armature_worker_*`` gauges.
  Unchanged load is re-sent only every ``heartbeat_s`` so idle workers stay quiet but visible.
* KV events: the engine publishes SGLang's ZMQ wire format (3 frames ``[topic, seq u64 BE,
  msgpack EventBatch]``); a SUB socket reads them and relays each as an Armature ``RouterEvent``
  with the canonical block hash recomputed from the token ids (``protocols.hashing``, so routers
  never depend on the engine's own hash function) and a per-worker monotonically increasing
  ``event_id`` (routers detect gaps from it). An engine in this process (native, mocker) without
  ``--kv-events-config`` hands its batches over directly instead (``KvEventSource``): the same
  relay, no socket and no publisher thread in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Gauge

from armature.engine.api import Engine, KvEventSource, LoadMetrics
from armature.protocols.hashing import compute_local_block_hashes
from armature.protocols.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvCacheEvent,
    KvCleared,
    KvRemoved,
    KvStored,
    RouterEvent,
    StoredBlock,
    decode_event_batch,
)
from armature.protocols.load import LOAD_TOPIC, ActiveLoad
from armature.router.kv.local_indexer import LocalKvIndexer

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv-events"
WORKER_METRIC_PREFIX = "armature_worker"

# publish(topic, payload): the event plane, component scope.
PublishFn = Callable[[str, bytes], Awaitable[None]]

_encoder = msgspec.msgpack.Encoder()


class KvEventConverter:
    """SGLang ``EventBatch`` → Armature ``RouterEvent``s, numbering events for this worker."""

    def __init__(self, worker_id: int, block_size: int) -> None:
        self.worker_id = worker_id
        self.block_size = block_size
        self.next_event_id = 0
        self.dropped = 0

    def _event(self, data: KvStored | KvRemoved | KvCleared, dp_rank: int) -> RouterEvent:
        event = KvCacheEvent(event_id=self.next_event_id, data=data, dp_rank=dp_rank)
        self.next_event_id += 1
        return RouterEvent(worker_id=self.worker_id, event=event)

    def convert(self, batch: EventBatch) -> list[RouterEvent]:
        dp_rank = batch.attn_dp_rank or 0
        out: list[RouterEvent] = []
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                stored = self._stored(ev)
                if stored is not None:
                    out.append(self._event(stored, dp_rank))
            elif isinstance(ev, BlockRemoved):
                out.append(self._event(KvRemoved(block_hashes=list(ev.block_hashes)), dp_rank))
            elif isinstance(ev, AllBlocksCleared):
                out.append(self._event(KvCleared(), dp_rank))
        return out

    def _stored(self, ev: BlockStored) -> KvStored | None:
        block_size = ev.block_size or self.block_size
        n = len(ev.block_hashes)
        if len(ev.token_ids) != n * block_size:
            # A router indexing wrong hashes would route on fiction; drop the event and count it.
            self.dropped += 1
            log.warning(
                "dropping BlockStored with %d blocks of %d tokens but %d token ids",
                n, block_size, len(ev.token_ids),
            )
            return None
        local = compute_local_block_hashes(ev.token_ids, block_size)
        blocks = [StoredBlock(block_hash=h, tokens_hash=t) for h, t in zip(ev.block_hashes, local, strict=True)]
        return KvStored(parent_hash=ev.parent_block_hash, blocks=blocks)


def engine_binds(endpoint: str) -> bool:
    """SGLang's rule: the engine's PUB binds wildcard and ipc/inproc endpoints, else connects."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    return any(w in endpoint for w in ("*", "::", "0.0.0.0"))


def local_address(endpoint: str) -> str:
    """Where a SUB on this host reaches a PUB bound to a wildcard endpoint."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard):]
    for wildcard in ("tcp://[::]:", "tcp://:::"):
        if endpoint.startswith(wildcard):
            return "tcp://[::1]:" + endpoint[len(wildcard):]
    return endpoint


def encode_router_event(event: RouterEvent) -> bytes:
    return _encoder.encode(event)


def to_active_load(worker_id: int, m: LoadMetrics) -> ActiveLoad:
    return ActiveLoad(
        worker_id=worker_id,
        dp_rank=m.dp_rank,
        active_decode_blocks=m.kv_active_blocks,
        active_prefill_tokens=0,
        kv_total_blocks=m.kv_total_blocks,
        num_running_reqs=m.num_running_reqs,
        num_waiting_reqs=m.num_waiting_reqs,
        cache_hit_rate=m.cache_hit_rate,
    )


@dataclass
class WorkerGauges:
    """``armature_worker_*`` on the runtime's registry (served at the status server's /metrics)."""

    running: Gauge
    waiting: Gauge
    active_blocks: Gauge
    cached_blocks: Gauge
    total_blocks: Gauge
    cache_usage: Gauge
    cache_hit_rate: Gauge
    kv_events: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerGauges:
        labels = ("model", "component", "dp_rank")

        def g(name: str, doc: str) -> Gauge:
            return Gauge(f"{WORKER_METRIC_PREFIX}_{name}", doc, labels, registry=registry)

        return cls(
            running=g("num_running_requests", "Requests the engine is running"),
            waiting=g("num_waiting_requests", "Requests queued in the engine"),
            active_blocks=g("kv_active_blocks", "KV blocks locked by running requests"),
            cached_blocks=g("kv_cached_blocks", "KV blocks held by the prefix cache (evictable)"),
            total_blocks=g("kv_total_blocks", "KV blocks in the engine's pool"),
            cache_usage=g("gpu_cache_usage_percent", "Fraction (0-1) of KV blocks locked by running requests"),
            cache_hit_rate=g("cache_hit_rate", "Cached prompt tokens / prompt tokens since start"),
            kv_events=g("kv_events_published", "KV events relayed onto the event plane"),
        )

    def update(self, labels: tuple[str, str, str], m: LoadMetrics) -> None:
        self.running.labels(*labels).set(m.num_running_reqs)
        self.waiting.labels(*labels).set(m.num_waiting_reqs)
        self.active_blocks.labels(*labels).set(m.kv_active_blocks)
        self.cached_blocks.labels(*labels).set(m.kv_cached_blocks)
        self.total_blocks.labels(*labels).set(m.kv_total_blocks)
        self.cache_usage.labels(*labels).set(m.kv_active_blocks / m.kv_total_blocks if m.kv_total_blocks else 0.0)
        self.cache_hit_rate.labels(*labels).set(m.cache_hit_rate)


class WorkerPublisher:
    """Runs the load loop and (when the engine publishes KV events) the KV-event relay."""

    def __init__(
        self,
        engine: Engine,
        worker_id: int,
        publish: PublishFn,
        registry: CollectorRegistry,
        *,
        model: str,
        component: str,
        interval_s: float = 0.25,
        heartbeat_s: float = 5.0,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.publish = publish
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.gauges = WorkerGauges.create(registry)
        self.labels = (model, component, "0")
        self.converter = KvEventConverter(worker_id, engine.info.page_size)
        # The worker's own index and event log: routers that missed events ask it to fill the gap.
        self.local_indexer = LocalKvIndexer(worker_id)
        self.kv_events_relayed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._zmq: zmq.asyncio.Context | None = None

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._load_loop(), name="load-publisher"))
        endpoint = self.engine.info.kv_events_endpoint
        if endpoint:
            self._tasks.append(asyncio.create_task(self._kv_loop(endpoint), name="kv-event-relay"))
        elif isinstance(self.engine, KvEventSource):
            # In this process: batches come straight from the step loop, no socket, no thread.
            batches: asyncio.Queue[EventBatch] = asyncio.Queue()
            self.engine.add_kv_event_listener(batches.put_nowait)
            self._tasks.append(asyncio.create_task(self._kv_local_loop(batches), name="kv-event-relay"))

    async def publish_load_now(self) -> None:
        m = self.engine.load_metrics()
        self.gauges.update(self.labels, m)
        await self.publish(LOAD_TOPIC, _encoder.encode(to_active_load(self.worker_id, m)))

    async def _load_loop(self) -> None:
        last: ActiveLoad | None = None
        last_sent = 0.0
        while True:
            try:
                m = self.engine.load_metrics()
                self.gauges.update(self.labels, m)
                load = to_active_load(self.worker_id, m)
                now = time.monotonic()
                if load != last or now - last_sent >= self.heartbeat_s:
                    await self.publish(LOAD_TOPIC, _encoder.encode(load))
                    last, last_sent = load, now
            except asyncio.CancelledError:
                raise
            except Exception:
                # A transient event-plane failure must not end load reporting for good.
                log.exception("publishing load metrics failed")
            await asyncio.sleep(self.interval_s)

    async def _kv_loop(self, endpoint: str) -> None:
        self._zmq = zmq.asyncio.Context()
        sock = self._zmq.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if engine_binds(endpoint):
            sock.connect(local_address(endpoint))
        else:
            # The engine connects to a non-wildcard address: someone must bind it, and it is us.
            sock.bind(endpoint)
        log.info("relaying KV events from %s", endpoint)
        last_seq: int | None = None
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    log.warning("ignoring KV event message with %d frames (expected 3)", len(frames))
                    continue
                _topic, seq_raw, payload = frames
                (seq,) = struct.unpack(">Q", seq_raw) if len(seq_raw) == 8 else (None,)
                if seq is not None and last_seq is not None and seq != last_seq + 1:
                    log.warning("KV event sequence gap: %d after %d", seq, last_seq)
                last_seq = seq if seq is not None else last_seq
                try:
                    batch = decode_event_batch(payload)
                except msgspec.DecodeError as exc:
                    log.warning("undecodable KV event batch: %s", exc)
                    continue
                await self._relay(batch)
        finally:
            sock.close(0)

    async def _kv_local_loop(self, batches: asyncio.Queue[EventBatch]) -> None:
        while True:
            await self._relay(await batches.get())

    async def _relay(self, batch: EventBatch) -> None:
        """One engine batch onto the event plane as router events, and into the local index."""
        for event in self.converter.convert(batch):
            self.local_indexer.append(event)
            await self.publish(KV_EVENTS_TOPIC, encode_router_event(event))
            self.kv_events_relayed += 1
        self.gauges.kv_events.labels(*self.labels).set(self.kv_events_relayed)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None
