"""Router metrics as Prometheus exposes them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from router_kv_tools import BS, SimWorker, tokens

from armature.router.kv import KvRouter, RouterMetrics


async def test_decisions_and_load_show_up_in_metrics() -> None:
    registry = CollectorRegistry()
    router = KvRouter(block_size=BS, metrics=RouterMetrics(registry))
    worker = SimWorker(0xA)
    router.register_worker(0xA)
    router.register_worker(0xB)
    for ev in worker.store(tokens(*"ABCD")):
        await router.on_event(ev)
    d = router.best_worker(tokens(*"ABCDEF"), request_id="r")
    assert d.worker_id == 0xA and d.overlap_blocks == 4
    get = registry.get_sample_value
    assert get("armature_router_requests_total") == 1
    assert get("armature_router_kv_hit_rate_sum") == 4 / 6
    for phase in ("hashing", "find_matches", "scheduling", "total"):
        assert get(f"armature_router_overhead_{phase}_ms_count") == 1
    labels = {"worker_id": "a", "dp_rank": "0"}
    assert get("armature_router_worker_active_decode_blocks", labels) == 6
    assert get("armature_router_worker_active_prefill_tokens", labels) == 2 * BS
    router.mark_prefill_completed("r")
    assert get("armature_router_worker_active_prefill_tokens", labels) == 0
    router.free("r")
    assert get("armature_router_worker_active_decode_blocks", labels) == 0
    assert get("armature_router_kv_events_applied_total", {"event_type": "stored"}) == 1
    router.refresh_gauges()
    assert get("armature_router_worker_cached_blocks", labels) == 4
    router.remove_worker(0xA)
    assert b'worker_id="a"' not in generate_latest(registry)
