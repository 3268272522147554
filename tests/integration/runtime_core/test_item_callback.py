"""``ResponseStream.on_item``: a caller that takes items where they arrive, with no task wake-up.

Same stream contract as iterating (order, credit window, errors), TCP and NATS: the callback gets
the items that arrive while the caller waits with nothing queued; an item it declines, and every
one after it, is iterated instead; a callback that raises fails its own stream and no other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from armature.runtime.context import Context
from armature.runtime.request_plane.base import ErrorKind, PlaneTimeouts, RequestPlaneError

from integration.runtime_core.planes import Plane

pytestmark = pytest.mark.integration

WINDOW = 8


async def counting(request: dict[str, Any], context: Context) -> AsyncIterator[int]:
    await asyncio.sleep(0.05)  # the caller sets its callback before the first item
    for i in range(request["n"]):
        yield i
        if i % 5 == 0:
            await asyncio.sleep(0)  # items arrive one by one, while the caller waits


async def serving(plane: Plane, name: str):  # type: ignore[no-untyped-def]
    worker = plane.runtime()
    await worker.endpoint(name).start_serving(counting)
    client = await plane.runtime(timeouts=PlaneTimeouts(window=WINDOW)).endpoint(name).client()
    await client.wait_for_instances(5)
    return client


async def test_items_taken_where_they_arrive_then_the_rest_iterated(plane: Plane) -> None:
    client = await serving(plane, "test.callback.split")
    n, decline_from = 200, 150  # far past the window: credit must flow for taken items too
    stream = await client.round_robin({"n": n})
    taken: list[int] = []

    def take(item: int) -> bool:
        if item >= decline_from:
            return False
        taken.append(item)
        return True

    stream.on_item = take
    iterated = [item async for item in stream]
    assert taken + iterated == list(range(n))  # nothing lost, nothing twice, in order
    assert taken == list(range(decline_from))  # each arrived while the caller waited


async def test_a_callback_that_raises_fails_its_stream_only(plane: Plane) -> None:
    client = await serving(plane, "test.callback.raise")
    bad = await client.round_robin({"n": 1000})
    good = await client.round_robin({"n": 50})

    def explode(item: int) -> bool:
        if item == 3:
            raise ValueError("consumer bug")
        return True

    bad.on_item = explode
    with pytest.raises(RequestPlaneError) as err:
        async for _ in bad:
            pass
    assert err.value.kind == ErrorKind.CALLER_ERROR and "consumer bug" in err.value.message
    assert [item async for item in good] == list(range(50))
