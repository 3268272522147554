"""The NATS request plane across a nats-server restart."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from armature.runtime.context import Context
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.request_plane.base import RequestPlaneError
from armature.runtime.runtime import DistributedRuntime

pytestmark = pytest.mark.integration


async def count(request: dict[str, Any], context: Context):
    for i in range(request["n"]):
        yield i
        await asyncio.sleep(request.get("interval", 0))


async def test_request_plane_recovers_after_nats_server_restart(nats_server: Any) -> None:
    state = MemoryState()
    worker = DistributedRuntime(MemoryStore(state), "nats", nats_url=nats_server.url)
    caller = DistributedRuntime(MemoryStore(state), "nats", nats_url=nats_server.url)
    try:
        await worker.endpoint("test.nats.count").start_serving(count)
        client = await caller.endpoint("test.nats.count").client()
        await client.wait_for_instances(5)
        assert [i async for i in await client.round_robin({"n": 3})] == [0, 1, 2]

        in_flight = await client.round_robin({"n": 100_000, "interval": 0.01})
        assert await in_flight.__anext__() == 0
        await asyncio.to_thread(nats_server.restart, 0.5)

        # A stream cut by the outage ends with a migratable error; it does not hang.
        with pytest.raises(RequestPlaneError) as err:
            async with asyncio.timeout(15):
                async for _ in in_flight:
                    pass
        assert err.value.migratable

        deadline = time.monotonic() + 15
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(3):
                    items = [i async for i in await client.round_robin({"n": 5})]
                assert items == [0, 1, 2, 3, 4]
                break
            except (RequestPlaneError, TimeoutError) as e:
                last_error = e
                await asyncio.sleep(0.2)
        else:
            pytest.fail(f"no successful request within 15 s of the restart: {last_error}")
    finally:
        await caller.shutdown(grace_period_s=0)
        await worker.shutdown(grace_period_s=0)
