"""Push handlers (``start_serving(..., push_handler=...)``): items sent from callbacks, same stream
contract as a generator handler (order, credit window, errors, cancellation), TCP and NATS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from armature.runtime.context import Context
from armature.runtime.request_plane.base import ErrorKind, PlaneTimeouts, RequestPlaneError

from integration.runtime_core.planes import Plane

pytestmark = pytest.mark.integration


async def never_pulled(request: Any, context: Context):
    raise AssertionError("the push handler serves this endpoint")
    yield


async def collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_a_burst_beyond_the_window_arrives_whole_and_in_order(plane: Plane) -> None:
    window = 16

    async def burst(request: dict[str, Any], context: Context, emit: Callable[[Any], None]) -> None:
        for i in range(request["n"]):  # all at once, as an engine's step callback would
            emit(i)

    worker = plane.runtime()
    await worker.endpoint("test.push.burst").start_serving(never_pulled, push_handler=burst)
    caller = plane.runtime(timeouts=PlaneTimeouts(window=window))
    client = await caller.endpoint("test.push.burst").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({"n": 500})
    assert await stream.__anext__() == 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # a slow consumer: the rest waits on the worker's side
    assert stream.buffered <= window, f"{stream.buffered} items sent past a window of {window}"
    assert await collect(stream) == list(range(1, 500))


async def test_items_pushed_from_callbacks_then_an_error(plane: Plane) -> None:
    async def failing(request: dict[str, Any], context: Context, emit: Callable[[Any], None]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def tick(i: int) -> None:
            if i == 3:
                done.set_exception(RequestPlaneError(ErrorKind.HANDLER_ERROR, "engine exploded", migratable=True))
                return
            emit({"i": i})
            loop.call_soon(tick, i + 1)

        loop.call_soon(tick, 0)
        await done

    worker = plane.runtime()
    await worker.endpoint("test.push.fail").start_serving(never_pulled, push_handler=failing)
    client = await plane.runtime().endpoint("test.push.fail").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    got = []
    with pytest.raises(RequestPlaneError) as err:
        async for item in stream:
            got.append(item)
    assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert err.value.kind == ErrorKind.HANDLER_ERROR and err.value.migratable
    assert "engine exploded" in err.value.message


async def test_an_item_that_cannot_be_encoded_fails_the_stream(plane: Plane) -> None:
    async def bad(request: dict[str, Any], context: Context, emit: Callable[[Any], None]) -> None:
        emit({"ok": 1})
        emit({"not msgpack": object()})

    worker = plane.runtime()
    await worker.endpoint("test.push.bad").start_serving(never_pulled, push_handler=bad)
    client = await plane.runtime().endpoint("test.push.bad").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    assert await stream.__anext__() == {"ok": 1}
    with pytest.raises(RequestPlaneError) as err:
        await stream.__anext__()
    assert err.value.kind == ErrorKind.HANDLER_ERROR and "cannot be encoded" in err.value.message


async def test_a_killed_stream_cancels_the_push_handler(plane: Plane) -> None:
    cleaned = asyncio.Event()

    async def endless(request: dict[str, Any], context: Context, emit: Callable[[Any], None]) -> None:
        try:
            emit("first")
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    worker = plane.runtime()
    await worker.endpoint("test.push.kill").start_serving(never_pulled, push_handler=endless)
    client = await plane.runtime().endpoint("test.push.kill").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    assert await stream.__anext__() == "first"
    stream.context.kill()
    await asyncio.wait_for(cleaned.wait(), 5)
