"""Gap recovery over the real request plane: the worker's kv_indexer endpoints answer the router."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest

from armature.protocols.hashing import compute_local_block_hashes
from armature.router.kv import KvRouter
from armature.router.kv.gap_recovery import QUERY_ENDPOINT, SNAPSHOT_ENDPOINT, RequestPlaneGapHandler
from armature.router.kv.messages import EventRangeQuery
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime
from armature.sglang.handlers.kv_query import KvQueryHandler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "router_kv"))
from router_kv_tools import BS, SimWorker, held_paths, tokens  # noqa: E402

pytestmark = pytest.mark.integration


async def test_router_recovers_missed_events_and_snapshots_over_tcp() -> None:
    state = MemoryState()
    wrt = DistributedRuntime(MemoryStore(state), tcp_host="127.0.0.1")
    rrt = DistributedRuntime(MemoryStore(state), tcp_host="127.0.0.1")
    await wrt.start()
    await rrt.start()
    handler = RequestPlaneGapHandler(rrt, "ns", "backend")
    try:
        worker = SimWorker(wrt.instance_id)
        queries = KvQueryHandler(worker.local)
        await wrt.endpoint(f"ns.backend.{QUERY_ENDPOINT}").start_serving(queries.events, request_type=EventRangeQuery)
        await wrt.endpoint(f"ns.backend.{SNAPSHOT_ENDPOINT}").start_serving(queries.snapshot)

        rng = random.Random(1)
        before = [ev for _ in range(10) for ev in worker.store(tokens(*rng.choices("ABCDE", k=4)))]
        router = KvRouter(block_size=BS, gap_handler=handler, recovery_timeout_s=10)
        await router.add_worker(worker.worker_id)  # snapshot of what it published before
        assert router.indexer.last_event_id(worker.worker_id) == before[-1].event.event_id

        after = [ev for _ in range(20) for ev in worker.store(tokens(*rng.choices("ABCDEFG", k=5)))]
        after += worker.evict_tail(tokens(*"ABCDE"), 2)
        for i, ev in enumerate(after):
            if i % 4 != 1:  # every fourth event is lost on the way
                await router.on_event(ev)
        await asyncio.wait_for(router.drain(), 20)

        wid = worker.worker_id
        assert router.indexer.stats.gaps > 0
        assert held_paths(router.indexer.dump_worker(wid)) == held_paths(worker.local.snapshot().events)
        q = tokens(*"ABCDE")
        assert router.find_matches(q).scores == worker.local.index.find_matches(compute_local_block_hashes(q, BS)).scores
    finally:
        await handler.close()
        await rrt.shutdown(grace_period_s=0.0)
        await wrt.shutdown(grace_period_s=0.0)
