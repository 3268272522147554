"""The KV router fed over the real (zmq) event plane: worker events in, replica sync between routers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from pathlib import Path

import msgspec
import pytest

from armature.router.kv import InProcessGapHandler, KvRouter, KvRouterConfig
from armature.router.kv.event_feed import (
    KV_EVENTS_TOPIC,
    REPLICA_SYNC_TOPIC,
    EventPlaneSyncPublisher,
    consume_kv_events,
    consume_replica_sync,
)
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.event_plane.base import EventScope
from armature.runtime.runtime import DistributedRuntime

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "router_kv"))
from router_kv_tools import BS, SimWorker, held_paths, tokens  # noqa: E402

pytestmark = pytest.mark.integration


async def until(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout_s)


async def test_two_routers_share_events_and_load_over_the_event_plane() -> None:
    state = MemoryState()
    runtimes = [DistributedRuntime(MemoryStore(state), tcp_host="127.0.0.1") for _ in range(3)]
    wrt, art, brt = runtimes
    scope = EventScope("ns", "backend")
    tasks: list[asyncio.Task[None]] = []
    syncs: list[EventPlaneSyncPublisher] = []
    try:
        worker = SimWorker(0x77)
        local = InProcessGapHandler()
        local.register(worker.local)
        kv_pub = (await wrt.events()).publisher(scope, KV_EVENTS_TOPIC)
        await kv_pub.start()
        routers = []
        for rt in (art, brt):
            plane = await rt.events()
            sync = EventPlaneSyncPublisher(plane.publisher(scope, REPLICA_SYNC_TOPIC))
            await sync.start()
            syncs.append(sync)
            router = KvRouter(
                KvRouterConfig(router_replica_sync=True), block_size=BS, sync_publisher=sync, gap_handler=local
            )
            await router.add_worker(worker.worker_id)
            router.register_worker(0x88)
            kv_sub = plane.subscriber(scope, KV_EVENTS_TOPIC)
            sync_sub = plane.subscriber(scope, REPLICA_SYNC_TOPIC)
            await kv_sub.start()
            await sync_sub.start()
            tasks.append(asyncio.create_task(consume_kv_events(router, kv_sub)))
            tasks.append(asyncio.create_task(consume_replica_sync(router, sync_sub)))
            routers.append(router)
        a, b = routers

        # zmq subscribers join a moment after publishers appear: wait until a probe gets through
        # each way before the real traffic.
        probe = iter(range(10_000))
        while not all(len(r.active) for r in routers):
            n = next(probe)
            a.best_worker(tokens("probe"), request_id=f"pa{n}")
            b.best_worker(tokens("probe"), request_id=f"pb{n}")
            await asyncio.sleep(0.05)
        for r in (a, b):
            for rid in [f"p{x}{n}" for x in "ab" for n in range(10_000)]:
                r.free(rid)

        rng = random.Random(5)
        events = [ev for _ in range(30) for ev in worker.store(tokens(*rng.choices("ABCDEF", k=4)))]
        # Events published before a subscription joined are lost; the routers recover them
        # from the worker's local indexer as the gap shows up.
        for ev in events:
            await kv_pub.publish(msgspec.msgpack.encode(ev))
        last = events[-1].event.event_id
        await until(lambda: all(r.indexer.last_event_id(worker.worker_id) == last for r in routers))
        for r in routers:
            await r.drain()

        for i in range(20):
            r = (a, b)[i % 2]
            r.best_worker(tokens(*rng.choices("ABCDEF", k=5)), request_id=f"r{i}")
            if i % 3 == 0:
                r.mark_prefill_completed(f"r{i}")
        for s in syncs:
            await s.flush()

        def loads(r: KvRouter) -> list[tuple[int, int, int, int]]:
            return [(x.worker_id, x.dp_rank, x.active_decode_blocks, x.active_prefill_tokens) for x in r.active_loads()]

        await until(lambda: loads(a) == loads(b))
        assert sum(x[2] for x in loads(a)) > 0
        assert held_paths(a.dump_events()) == held_paths(b.dump_events()) == held_paths(worker.local.snapshot().events)
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in syncs:
            with contextlib.suppress(Exception):
                await s.close()
        for rt in runtimes:
            await rt.shutdown(grace_period_s=0)
