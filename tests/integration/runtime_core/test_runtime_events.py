"""The runtime hands out its event plane, built on its own discovery and lease."""

from __future__ import annotations

import asyncio

import pytest

from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.event_plane.base import EventScope
from armature.runtime.runtime import DistributedRuntime

pytestmark = pytest.mark.integration


async def test_runtime_event_plane_reaches_another_process_runtime() -> None:
    state = MemoryState()
    publisher_rt = DistributedRuntime(MemoryStore(state))
    subscriber_rt = DistributedRuntime(MemoryStore(state))
    try:
        scope = EventScope("test", "events")
        subscriber = (await subscriber_rt.events()).subscriber(scope, "load")
        await subscriber.start()
        publisher = (await publisher_rt.events()).publisher(scope, "load")
        await publisher.start()
        received = []

        async def first() -> None:
            async for envelope in subscriber:
                received.append(envelope)
                return

        reader = asyncio.ensure_future(first())
        for _ in range(100):  # zmq subscribers join a moment after the publisher appears
            await publisher.publish(b"busy")
            await asyncio.sleep(0.05)
            if reader.done():
                break
        await asyncio.wait_for(reader, 5)
        assert received[0].payload == b"busy"
    finally:
        await publisher_rt.shutdown(grace_period_s=0)
        await subscriber_rt.shutdown(grace_period_s=0)
