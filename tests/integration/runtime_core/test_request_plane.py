"""Request-plane behaviour over TCP and over a real nats-server: streams, errors, cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from armature.runtime.context import Context
from armature.runtime.request_plane.base import ErrorKind, PlaneTimeouts, RequestPlaneError
from armature.runtime.request_plane.tcp import TcpServer

from integration.runtime_core.planes import Plane

pytestmark = pytest.mark.integration


async def count_up(request: dict[str, Any], context: Context):
    for i in range(request["n"]):
        yield {"stream": request.get("tag"), "i": i}
        if request.get("sleep"):
            await asyncio.sleep(request["sleep"])


class Prompt(msgspec.Struct):
    text: str
    repeat: int


class Piece(msgspec.Struct):
    index: int
    text: str


async def echo_typed(request: Prompt, context: Context):
    for i in range(request.repeat):
        yield Piece(i, request.text)


async def collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def test_round_robin_random_direct_reach_every_instance(plane: Plane) -> None:
    workers = [plane.runtime(), plane.runtime()]
    for w in workers:
        await w.endpoint("dyn://test.worker.count").start_serving(count_up)
    caller = plane.runtime()
    client = await caller.endpoint("test.worker.count").client()
    ids = await client.wait_for_instance_count(2, timeout_s=5)
    assert sorted(ids) == sorted(w.instance_id for w in workers)

    seen = set()
    for _ in range(4):
        stream = await client.round_robin({"n": 3})
        assert await collect(stream) == [{"stream": None, "i": i} for i in range(3)]
        seen.add(stream.instance_id)
    assert seen == set(ids)
    for instance_id in ids:
        stream = await client.direct({"n": 2, "tag": "d"}, instance_id)
        assert stream.instance_id == instance_id
        assert await collect(stream) == [{"stream": "d", "i": 0}, {"stream": "d", "i": 1}]
    stream = await client.random({"n": 1})
    assert stream.instance_id in ids
    assert await collect(stream) == [{"stream": None, "i": 0}]


async def test_typed_requests_and_responses(plane: Plane) -> None:
    worker = plane.runtime()
    await worker.namespace("test").component("typed").endpoint("echo").start_serving(echo_typed)
    client = await plane.runtime().endpoint("test.typed.echo").client(response_type=Piece)
    await client.wait_for_instances(5)
    items = await collect(await client.round_robin(Prompt("hi", 3)))
    assert items == [Piece(0, "hi"), Piece(1, "hi"), Piece(2, "hi")]

    # A request that does not match the handler's declared type fails that stream, clearly.
    with pytest.raises(RequestPlaneError) as err:
        await collect(await client.round_robin({"text": 5}))
    assert err.value.kind == ErrorKind.INVALID_REQUEST and not err.value.migratable
    assert "text" in err.value.message
    assert await collect(await client.round_robin(Prompt("ok", 1))) == [Piece(0, "ok")]


async def test_no_instances_and_unknown_direct_instance(plane: Plane) -> None:
    client = await plane.runtime().endpoint("test.nobody.here").client()
    with pytest.raises(RequestPlaneError) as err:
        await client.round_robin({})
    assert err.value.kind == ErrorKind.NO_INSTANCES
    with pytest.raises(RequestPlaneError) as err:
        await client.direct({}, 12345)
    assert err.value.kind == ErrorKind.ENDPOINT_NOT_FOUND


async def test_thousand_concurrent_streams_in_order_and_a_prompt_stop(plane: Plane) -> None:
    worker = plane.runtime()
    stop_seen: dict[str, float] = {}
    items_per_stream = 20

    async def handler(request: dict[str, Any], context: Context):
        if request.get("long"):
            # Called the moment the worker's context is stopped (not when the handler next runs).
            context.add_callback(lambda _: stop_seen.setdefault("at", time.perf_counter()))
            i = 0
            # Without a stop this would run for 30 s: far longer than the test.
            while not context.is_stopped() and i < 3000:
                yield i
                i += 1
                await asyncio.sleep(0.01)
            return
        for i in range(items_per_stream):
            yield [request["tag"], i]
            await asyncio.sleep(0)

    await worker.endpoint("test.many.streams").start_serving(handler)
    client = await plane.runtime().endpoint("test.many.streams").client()
    await client.wait_for_instances(5)

    long_stream = await client.round_robin({"long": True})
    first = await long_stream.__anext__()
    assert first == 0

    async def run(tag: int) -> list[Any]:
        return await collect(await client.round_robin({"tag": tag}))

    tasks = [asyncio.create_task(run(tag)) for tag in range(1000)]
    await asyncio.sleep(0.05)  # the short streams are in flight
    stopped_at = time.perf_counter()
    long_stream.stop()
    rest = await collect(long_stream)
    results = await asyncio.gather(*tasks)

    for tag, items in enumerate(results):
        assert items == [[tag, i] for i in range(items_per_stream)]
    assert "at" in stop_seen, "the handler never saw the stop"
    assert len(rest) < 3000 - 1, "the stream ran to its natural end: the stop did not arrive"
    print(f"\n[{plane.kind}] stop reached the handler after {(stop_seen['at'] - stopped_at) * 1e3:.2f} ms "
          f"with 1000 other streams in flight")  # fmt: skip
    if plane.kind == "tcp":
        server = worker._server
        assert isinstance(server, TcpServer)
        assert server.connection_count == 1


async def test_handler_exception_fails_only_its_stream(plane: Plane) -> None:
    worker = plane.runtime()

    async def flaky(request: dict[str, Any], context: Context):
        for i in range(request["n"]):
            if request.get("fail_at") == i:
                raise ValueError(f"boom at {i}")
            yield i
            await asyncio.sleep(0.001)

    await worker.endpoint("test.flaky.gen").start_serving(flaky)
    client = await plane.runtime().endpoint("test.flaky.gen").client()
    await client.wait_for_instances(5)

    good = asyncio.create_task(collect(await client.round_robin({"n": 50})))
    bad = await client.round_robin({"n": 50, "fail_at": 3})
    received = []
    with pytest.raises(RequestPlaneError) as err:
        async for item in bad:
            received.append(item)
    assert received == [0, 1, 2]
    assert err.value.kind == ErrorKind.HANDLER_ERROR and not err.value.migratable
    assert "ValueError: boom at 3" in err.value.message
    assert await good == list(range(50))
    assert await collect(await client.round_robin({"n": 2})) == [0, 1]


async def test_oversized_messages_fail_only_their_stream(plane: Plane) -> None:
    limit = 64 * 1024
    worker = plane.runtime(timeouts=PlaneTimeouts(max_message_bytes=limit))

    async def sized(request: dict[str, Any], context: Context):
        yield "x" * request["size"]
        yield "after"

    await worker.endpoint("test.big.gen").start_serving(sized)
    # The caller allows more than the worker: the worker itself must refuse the request.
    client = await plane.runtime(timeouts=PlaneTimeouts(max_message_bytes=4 * limit)).endpoint("test.big.gen").client()
    await client.wait_for_instances(5)

    ok = await client.round_robin({"size": 10})
    with pytest.raises(RequestPlaneError) as err:
        await collect(await client.round_robin({"size": 1, "pad": "y" * (2 * limit)}))
    assert err.value.kind == ErrorKind.MESSAGE_TOO_LARGE and "exceeds" in err.value.message

    # An item over the worker's limit: that stream fails, the worker keeps serving.
    big = await client.round_robin({"size": 2 * limit})
    with pytest.raises(RequestPlaneError) as err:
        await collect(big)
    assert err.value.kind == ErrorKind.MESSAGE_TOO_LARGE

    # The caller refuses to send what is over its own limit, before anything leaves.
    with pytest.raises(RequestPlaneError) as err:
        await client.round_robin({"pad": "z" * (5 * limit)})
    assert err.value.kind == ErrorKind.MESSAGE_TOO_LARGE
    assert await collect(ok) == ["x" * 10, "after"]
    assert await collect(await client.round_robin({"size": 3})) == ["xxx", "after"]


async def test_kill_cancels_the_handler_and_frees_it(plane: Plane) -> None:
    worker = plane.runtime()
    events: list[str] = []
    cleaned = asyncio.Event()

    async def endless(request: dict[str, Any], context: Context):
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.005)
        finally:
            events.append("killed" if context.is_killed() else "ended")
            cleaned.set()

    await worker.endpoint("test.endless.gen").start_serving(endless)
    client = await plane.runtime().endpoint("test.endless.gen").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    assert await stream.__anext__() == 0
    stream.kill()
    assert await collect(stream) == []  # iteration ends at once after a kill
    await asyncio.wait_for(cleaned.wait(), 5)
    assert events == ["killed"]
    await asyncio.sleep(0.05)
    assert not worker.dispatcher.streams


async def test_parent_context_cancels_linked_calls(plane: Plane) -> None:
    worker = plane.runtime()
    seen: list[tuple[str, str | None, bool]] = []
    done = asyncio.Event()

    async def endless(request: dict[str, Any], context: Context):
        try:
            while True:
                yield context.trace_id
                await asyncio.sleep(0.005)
        finally:
            seen.append((context.id(), context.parent_span_id, context.is_killed()))
            done.set()

    await worker.endpoint("test.linked.gen").start_serving(endless)
    client = await plane.runtime().endpoint("test.linked.gen").client()
    await client.wait_for_instances(5)
    parent = Context("req-1")
    stream = await client.round_robin({}, context=parent)
    assert await stream.__anext__() == parent.trace_id  # the trace crosses the request plane
    parent.kill()
    await asyncio.wait_for(done.wait(), 5)
    assert seen == [("req-1", stream.context.span_id, True)]
    assert stream.context.parent_span_id == parent.span_id


async def test_back_pressure_bounds_what_a_handler_runs_ahead(plane: Plane) -> None:
    window = 16
    worker = plane.runtime()
    produced = 0

    async def fast(request: dict[str, Any], context: Context):
        nonlocal produced
        for i in range(1000):
            produced += 1
            yield i

    await worker.endpoint("test.fast.gen").start_serving(fast)
    caller = plane.runtime(timeouts=PlaneTimeouts(window=window))
    client = await caller.endpoint("test.fast.gen").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    assert await stream.__anext__() == 0
    await asyncio.sleep(0.3)  # a slow consumer
    assert produced <= window + 1, f"handler ran {produced} items ahead of a consumer that read 1"
    rest = await collect(stream)
    assert rest == list(range(1, 1000))


async def test_unserved_endpoint_on_live_instance_is_migratable(plane: Plane) -> None:
    worker = plane.runtime()
    endpoint = worker.endpoint("test.gone.gen")
    await endpoint.start_serving(count_up)
    client = await plane.runtime().endpoint("test.gone.gen").client()
    [instance_id] = await client.wait_for_instances(5)
    instance = client.instances()[0]
    await endpoint.unregister_instance()
    await client.wait_for_instance_count(0, timeout_s=5)
    # A caller with a stale view still reaches the process: it answers "not here", migratable.
    transport = await client.runtime.client_transport()
    stream = await transport.open_stream(instance, msgspec.msgpack.encode({"n": 1}), Context(),
                                         msgspec.msgpack.Decoder())  # fmt: skip
    with pytest.raises(RequestPlaneError) as err:
        await collect(stream)
    assert err.value.kind == ErrorKind.ENDPOINT_NOT_FOUND and err.value.migratable
    assert instance.instance_id == instance_id


async def test_a_stream_dropped_half_read_cancels_its_handler(plane: Plane) -> None:
    import gc

    worker = plane.runtime()
    cleaned = asyncio.Event()

    async def endless(request: dict[str, Any], context: Context):
        try:
            while True:
                yield "tick"
                await asyncio.sleep(0.005)
        finally:
            cleaned.set()

    await worker.endpoint("test.dropped.gen").start_serving(endless)
    client = await plane.runtime().endpoint("test.dropped.gen").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    assert await stream.__anext__() == "tick"
    del stream
    gc.collect()
    await asyncio.wait_for(cleaned.wait(), 5)
    await asyncio.sleep(0.05)
    assert not worker.dispatcher.streams


async def test_endpoints_started_together_share_one_server(plane: Plane) -> None:
    worker = plane.runtime()
    await asyncio.gather(
        worker.endpoint("test.multi.a").start_serving(count_up),
        worker.endpoint("test.multi.b").start_serving(echo_typed),
    )
    caller = plane.runtime()
    a = await caller.endpoint("test.multi.a").client()
    b = await caller.endpoint("test.multi.b").client(response_type=Piece)
    await a.wait_for_instances(5)
    await b.wait_for_instances(5)
    assert a.instances()[0].transport == b.instances()[0].transport
    assert a.instance_ids() == b.instance_ids() == [worker.instance_id]
    assert await collect(await a.round_robin({"n": 2})) == [{"stream": None, "i": 0}, {"stream": None, "i": 1}]
    assert await collect(await b.round_robin(Prompt("z", 1))) == [Piece(0, "z")]


async def test_an_unencodable_item_fails_its_stream_only(plane: Plane) -> None:
    worker = plane.runtime()

    async def odd(request: dict[str, Any], context: Context):
        yield 1
        if request["bad"]:
            yield object()
        yield 2

    await worker.endpoint("test.odd.gen").start_serving(odd)
    client = await plane.runtime().endpoint("test.odd.gen").client()
    await client.wait_for_instances(5)
    good = await client.round_robin({"bad": False})
    bad = await client.round_robin({"bad": True})
    with pytest.raises(RequestPlaneError) as err:
        await collect(bad)
    assert err.value.kind == ErrorKind.HANDLER_ERROR and "cannot be encoded" in err.value.message
    assert await collect(good) == [1, 2]


async def test_take_buffered_hands_over_a_burst_and_keeps_the_credit_flowing(plane: Plane) -> None:
    window = 16
    worker = plane.runtime()

    async def fast(request: dict[str, Any], context: Context):
        for i in range(200):
            yield i

    await worker.endpoint("test.burst.gen").start_serving(fast)
    caller = plane.runtime(timeouts=PlaneTimeouts(window=window))
    client = await caller.endpoint("test.burst.gen").client()
    await client.wait_for_instances(5)
    stream = await client.round_robin({})
    got = [await stream.__anext__()]
    deadline = time.monotonic() + 5
    while stream.buffered < window - 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # a consumer that fell behind: the window fills up
    burst = stream.take_buffered()
    assert len(burst) >= window - 1 and stream.buffered == 0
    got += burst
    # Taking a burst returns credit like iterating does: the handler runs on to the end.
    while True:
        try:
            got.append(await asyncio.wait_for(stream.__anext__(), 5))
        except StopAsyncIteration:
            break
        got += stream.take_buffered()
    assert got == list(range(200))
