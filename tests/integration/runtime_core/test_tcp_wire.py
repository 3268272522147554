"""The TCP plane against bad peers: garbage bytes, another protocol version, silent servers."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec
import pytest

from armature.protocols.version import PROTOCOL_VERSION
from armature.runtime.context import Context
from armature.runtime.discovery.base import instance_key
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.request_plane.base import ErrorKind, Instance, PlaneTimeouts, RequestPlaneError, TransportInfo
from armature.runtime.request_plane.codec import (
    FrameKind,
    FrameReader,
    RequestHead,
    decode_error,
    encode_request_body,
    frame_bytes,
)
from armature.runtime.runtime import DistributedRuntime

pytestmark = pytest.mark.integration


async def slow_counter(request: dict[str, Any], context: Context):
    try:
        for i in range(request["n"]):
            yield i
            await asyncio.sleep(request.get("sleep", 0))
    finally:
        if context.is_killed():
            KILLED.append(context.id())


KILLED: list[str] = []  # request ids of handlers that were cancelled


async def read_frames(reader: asyncio.StreamReader, timeout: float = 5.0) -> list[tuple[FrameKind, int, bytes]]:
    """Every frame the server sends until it closes the connection."""
    frames: list[tuple[FrameKind, int, bytes]] = []
    parser = FrameReader(lambda k, s, b: frames.append((k, s, bytes(b))), lambda *a: None)
    while True:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            return frames
        parser.feed(data)


@pytest.fixture
async def worker() -> Any:
    state = MemoryState()
    rt = DistributedRuntime(MemoryStore(state))
    await rt.endpoint("test.wire.count").start_serving(slow_counter)
    caller = DistributedRuntime(MemoryStore(state))
    yield rt, caller
    await caller.shutdown(grace_period_s=0)
    await rt.shutdown(grace_period_s=0)


def request_frame(rt: DistributedRuntime, sid: int, payload: Any) -> bytes:
    head = RequestHead("test.wire.count", rt.instance_id, f"raw-{sid}", "t" * 32, "s" * 16, 64)
    return frame_bytes(FrameKind.REQUEST, sid, encode_request_body(head, msgspec.msgpack.encode(payload)))


async def test_garbage_closes_only_that_connection(worker: Any) -> None:
    rt, caller = worker
    host, port = rt._server.address.rsplit(":", 1)
    client = await caller.endpoint("test.wire.count").client()
    await client.wait_for_instances(5)
    healthy = await client.round_robin({"n": 40, "sleep": 0.01})

    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_frame(rt, 1, {"n": 1000, "sleep": 0.01}))
    await writer.drain()
    await asyncio.sleep(0.1)  # the raw connection's stream is running
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    frames = await read_frames(reader)
    writer.close()
    kinds = {k for k, _, _ in frames}
    assert FrameKind.ACK in kinds and FrameKind.DATA in kinds
    assert FrameKind.END not in kinds  # the connection was closed mid-stream
    await asyncio.sleep(0.05)
    assert "raw-1" in KILLED  # its handler was cancelled, not left running

    assert [i async for i in healthy] == list(range(40))
    assert [i async for i in await client.round_robin({"n": 3})] == [0, 1, 2]


async def test_version_mismatch_is_a_clear_error(worker: Any) -> None:
    rt, _ = worker
    host, port = rt._server.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    frame = bytearray(request_frame(rt, 7, {"n": 1}))
    struct.pack_into(">H", frame, 4, PROTOCOL_VERSION + 1)
    writer.write(bytes(frame))
    await writer.drain()
    frames = await read_frames(reader)
    writer.close()
    assert len(frames) == 1
    kind, sid, body = frames[0]
    error = decode_error(body)
    assert (kind, sid, error.kind) == (FrameKind.ERROR, 7, ErrorKind.VERSION_MISMATCH)
    assert f"version {PROTOCOL_VERSION + 1}" in error.message and f"version {PROTOCOL_VERSION}" in error.message


async def test_silent_server_hits_first_response_timeout() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads requests, never answers

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = MemoryState()
    store = MemoryStore(state)
    caller = DistributedRuntime(MemoryStore(state), timeouts=PlaneTimeouts(first_response_s=0.3))
    try:
        await store.start()
        record = Instance("test", "silent", "gen", 0xABC, TransportInfo("tcp", f"127.0.0.1:{port}"))
        await store.put(instance_key("test", "silent", "gen", 0xABC), msgspec.json.encode(record))
        client = await caller.endpoint("test.silent.gen").client()
        await client.wait_for_instances(5)
        stream = await client.round_robin({})
        with pytest.raises(RequestPlaneError) as err:
            await stream.__anext__()
        assert err.value.kind == ErrorKind.CONNECTION_TIMEOUT and err.value.migratable

        # Nobody listening at all: cannot_connect, migratable, raised by the call itself.
        server.close()
        await server.wait_closed()
        await (await caller.client_transport()).close()  # drop the pooled connection
        with pytest.raises(RequestPlaneError) as err:
            await client.round_robin({})
        assert err.value.kind == ErrorKind.CANNOT_CONNECT and err.value.migratable
    finally:
        await caller.shutdown(grace_period_s=0)
        await store.close()
