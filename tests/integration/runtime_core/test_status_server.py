"""The system status server: health follows serving and shutdown, metrics follow requests."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import msgspec
import pytest

from armature.protocols.model_card import ModelCard, ModelType
from armature.runtime.context import Context
from armature.runtime.discovery.base import model_card_key
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime
from armature.runtime.status import CanaryConfig

pytestmark = pytest.mark.integration


async def echo(request: dict[str, Any], context: Context):
    for _ in range(request["n"]):
        yield request["text"]


async def test_health_metrics_and_engine_routes() -> None:
    state = MemoryState()
    worker = DistributedRuntime(MemoryStore(state), system_port=0)
    caller = DistributedRuntime(MemoryStore(state))
    flushed: list[dict[str, Any]] = []

    async def flush_cache(body: dict[str, Any]) -> dict[str, Any]:
        flushed.append(body)
        return {"flushed": True, "args": body}

    async def broken(body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("engine says no")

    worker.register_engine_route("flush_cache", flush_cache)
    worker.register_engine_route("broken", broken)
    try:
        await worker.start()
        assert worker.status is not None and worker.status.host == "127.0.0.1"
        async with httpx.AsyncClient(base_url=worker.status.url, timeout=5) as http:
            r = await http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "notready"
            assert (await http.get("/live")).status_code == 200

            await worker.endpoint("test.status.echo").start_serving(echo)
            r = await http.get("/health")
            assert r.status_code == 200
            assert r.json()["status"] == "ready"
            assert r.json()["endpoints"] == {"test.status.echo": "ready"}

            client = await caller.endpoint("test.status.echo").client()
            await client.wait_for_instances(5)
            for _ in range(3):
                assert [x async for x in await client.round_robin({"n": 4, "text": "abc"})] == ["abc"] * 4

            text = (await http.get("/metrics")).text
            labels = 'component="status",endpoint="echo",namespace="test"'
            assert f"armature_component_requests_total{{{labels}}} 3.0" in text
            assert f"armature_component_inflight_requests{{{labels}}} 0.0" in text
            assert f"armature_component_request_duration_seconds_count{{{labels}}} 3.0" in text
            # Each item "abc" is 4 bytes of msgpack; 3 streams × 4 items.
            assert f"armature_component_response_bytes_total{{{labels}}} 48.0" in text
            assert f"armature_component_request_bytes_total{{{labels}}}" in text
            assert "armature_component_uptime_seconds" in text

            r = await http.post("/engine/flush_cache", json={"deep": True})
            assert r.status_code == 200 and r.json() == {"flushed": True, "args": {"deep": True}}
            r = await http.get("/engine/flush_cache?x=1")
            assert r.json() == {"flushed": True, "args": {"x": "1"}}
            assert flushed == [{"deep": True}, {"x": "1"}]
            r = await http.post("/engine/broken", json={})
            assert r.status_code == 500 and "engine says no" in r.json()["error"]
            assert (await http.post("/engine/flush_cache", content=b"{nope")).status_code == 400
            assert (await http.get("/engine/missing")).status_code == 404
            assert (await http.get("/nothing")).status_code == 404

            shutdown = asyncio.ensure_future(worker.shutdown(grace_period_s=0))
            await asyncio.sleep(0)
            await shutdown
        assert worker.health.body(worker.health.ready())["status"] == "notready"
    finally:
        await caller.shutdown(grace_period_s=0)
        await worker.shutdown(grace_period_s=0)


async def test_model_card_registration_lives_on_the_lease() -> None:
    state = MemoryState()
    worker = DistributedRuntime(MemoryStore(state))
    observer = MemoryStore(state)
    await observer.start()
    try:
        endpoint = worker.endpoint("dyn://test.backend.generate")
        card = ModelCard(
            name="tiny", model_types=[ModelType.CHAT], tokenizer_path="/tmp/tok", context_length=128,
            kv_cache_block_size=16,
        )  # fmt: skip
        await endpoint.register_model(card)
        key = model_card_key("test", "backend", "generate", worker.instance_id)
        stored = msgspec.json.decode(await observer.get(key), type=ModelCard)
        assert stored.name == "tiny" and stored.endpoint == "test.backend.generate"
        await endpoint.unregister_model()
        assert await observer.get(key) is None
        await endpoint.register_model(card)
        await worker.shutdown(grace_period_s=0)  # the lease goes, and the card with it
        assert await observer.get(key) is None
    finally:
        await worker.shutdown(grace_period_s=0)
        await observer.close()


async def test_canary_health_check_marks_a_hung_endpoint_notready_and_recovers() -> None:
    state = MemoryState()
    worker = DistributedRuntime(
        MemoryStore(state), system_port=0, canary=CanaryConfig(enabled=True, wait_s=0.2, timeout_s=0.3)
    )
    engine_hung = asyncio.Event()
    canaries: list[dict[str, Any]] = []

    async def generate(request: dict[str, Any], context: Context):
        if request.get("canary"):
            canaries.append(request)
            if engine_hung.is_set():
                await asyncio.sleep(3600)  # an engine that stopped answering
        yield "token"

    async def health(http: httpx.AsyncClient, want: str) -> None:
        for _ in range(100):
            r = await http.get("/health")
            if r.json()["endpoints"].get("test.canary.gen") == want:
                assert (r.status_code == 200) == (want == "ready")
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"endpoint never became {want}")

    try:
        await worker.endpoint("test.canary.gen").start_serving(generate, health_check_payload={"canary": True})
        assert worker.status is not None
        async with httpx.AsyncClient(base_url=worker.status.url, timeout=5) as http:
            await health(http, "ready")
            engine_hung.set()
            await health(http, "notready")
            assert canaries, "no canary request was sent"
            engine_hung.clear()
            await health(http, "ready")
    finally:
        await worker.shutdown(grace_period_s=0)

