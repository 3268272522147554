"""TCP request plane (the default): one server per process, many streams per connection.

Both ends are ``asyncio.Protocol``s rather than streams: frames are parsed straight out of
``data_received`` and written into one ``bytearray`` per connection that is flushed once per
event-loop iteration, so a burst of items from many streams costs one ``send`` syscall.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

import msgspec

from armature.runtime.context import Context
from armature.runtime.request_plane.base import (
    ClientTransport,
    ErrorKind,
    Instance,
    PlaneTimeouts,
    RequestPlaneError,
    ServerTransport,
    StreamChannel,
    StreamSink,
)
from armature.runtime.request_plane.codec import (
    FrameKind,
    FrameReader,
    FrameTooLarge,
    ProtocolViolation,
    RequestHead,
    VersionMismatch,
    append_frame,
    append_item,
    decode_error,
    decode_int,
    decode_request_body,
    encode_error,
    encode_int,
    encode_request_body,
)
from armature.runtime.request_plane.dispatcher import Dispatcher, HandlerStream
from armature.runtime.request_plane.stream import ResponseStream, StreamTable

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# Plain ints for the per-frame dispatch (an IntEnum attribute lookup per frame adds up).
_REQUEST, _DATA, _END, _ERROR = int(FrameKind.REQUEST), int(FrameKind.DATA), int(FrameKind.END), int(FrameKind.ERROR)
_STOP, _KILL, _CREDIT, _ACK = int(FrameKind.STOP), int(FrameKind.KILL), int(FrameKind.CREDIT), int(FrameKind.ACK)
_EMPTY = b""
# Write buffer marks per connection: above HIGH the handlers wait (back-pressure to the engine).
WRITE_HIGH_WATER = 4 * 1024 * 1024
WRITE_LOW_WATER = 1024 * 1024


def tcp_host_from_env(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ARMATURE_TCP_RPC_HOST") or env.get("DYN_TCP_RPC_HOST") or DEFAULT_HOST


def tcp_port_from_env(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get("ARMATURE_TCP_RPC_PORT") or env.get("DYN_TCP_RPC_PORT") or "0"
    try:
        port = int(raw)
    except ValueError as e:
        raise ValueError(f"TCP RPC port {raw!r} is not an integer") from e
    if not 0 <= port <= 65535:
        raise ValueError(f"TCP RPC port {port} is out of range")
    return port


def advertise_host_for(bind_host: str, env: Mapping[str, str] | None = None) -> str:
    """The host callers should dial: explicit, else the bind host, else (wildcard bind) this host's IP."""
    env = os.environ if env is None else env
    explicit = env.get("ARMATURE_TCP_RPC_ADVERTISE_HOST")
    if explicit:
        return explicit
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


# An ACK only ends the caller's first-response timer (seconds long), so it waits up to this long
# for the stream's first item and leaves in the same write: one send and one wake-up of the
# caller less per request.
ACK_DELAY_S = 0.005


class _Connection(asyncio.Protocol):
    """Frame I/O shared by both ends: coalesced writes and write back-pressure."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.out = bytearray()
        self._flush_scheduled = False
        self._delayed_flush: asyncio.TimerHandle | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.reader = FrameReader(self._on_frame, self._on_oversize, limit)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have the same methods.
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except VersionMismatch as e:
            log.error("request plane: %s", e)
            self._on_version_mismatch(e)
            self.abort(str(e))
        except ProtocolViolation as e:
            log.warning("request plane: closing connection from %s: %s", self._peer(), e)
            self.abort(str(e))

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._delayed_flush is not None:
            self._delayed_flush.cancel()
            self._delayed_flush = None
        if self.out and self.transport is not None and not self.closed:
            data, self.out = self.out, bytearray()
            self.transport.write(data)

    def send(self, kind: FrameKind, stream_id: int, body: bytes = _EMPTY) -> None:
        if self.closed:
            return
        append_frame(self.out, kind, stream_id, body)
        self.schedule_flush()

    def send_soon(self, kind: FrameKind, stream_id: int, delay_s: float) -> None:
        """Queue a frame that may wait up to ``delay_s`` for the next write (it rides along)."""
        if self.closed:
            return
        append_frame(self.out, kind, stream_id, _EMPTY)
        if not self._flush_scheduled and self._delayed_flush is None:
            self._delayed_flush = self.loop.call_later(delay_s, self.flush)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def congested(self) -> bool:
        return self._paused

    async def wait_writable(self) -> None:
        if self._paused and not self.closed:
            w = self.loop.create_future()
            self._drain_waiters.append(w)
            await w

    def abort(self, reason: str) -> None:
        """Close after sending what is queued (an error frame, say)."""
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._lost(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "connection closed by peer")

    def _lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.out = bytearray()
        if self._delayed_flush is not None:
            self._delayed_flush.cancel()
            self._delayed_flush = None
        self.resume_writing()  # release handlers waiting to write; their sends are now dropped
        self.on_closed(reason)

    def _peer(self) -> str:
        return str(self.transport.get_extra_info("peername")) if self.transport else "?"

    # Subclass hooks
    def _on_frame(self, kind: FrameKind, stream_id: int, body: memoryview) -> None:
        raise NotImplementedError

    def _on_oversize(self, kind: FrameKind, stream_id: int, size: int) -> None:
        raise NotImplementedError

    def _on_version_mismatch(self, e: VersionMismatch) -> None:
        pass

    def on_closed(self, reason: str) -> None:
        pass


# --- server ----------------------------------------------------------------------------------


class _TcpSink(StreamSink):
    __slots__ = ("conn", "sid")

    def __init__(self, conn: _ServerConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid

    def send_ack(self) -> None:
        self.conn.send_soon(FrameKind.ACK, self.sid, ACK_DELAY_S)

    def send_item(self, item: object) -> int:
        conn = self.conn
        if conn.closed:
            return 0
        n = append_item(conn.out, self.sid, item, conn.limit)
        conn.schedule_flush()
        return n

    def send_end(self) -> None:
        self.conn.send(FrameKind.END, self.sid)
        self.conn.streams.pop(self.sid, None)

    def send_error(self, kind: str, message: str, migratable: bool) -> None:
        self.conn.send(FrameKind.ERROR, self.sid, encode_error(kind, message, migratable))
        self.conn.streams.pop(self.sid, None)

    def congested(self) -> bool:
        return self.conn._paused

    async def wait_writable(self) -> None:
        await self.conn.wait_writable()


class _ServerConnection(_Connection):
    def __init__(self, dispatcher: Dispatcher, limit: int, connections: set[_ServerConnection]) -> None:
        super().__init__(limit)
        self.dispatcher = dispatcher
        self.streams: dict[int, HandlerStream] = {}
        self.connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connections.add(self)

    def _on_frame(self, kind: FrameKind, stream_id: int, body: memoryview) -> None:
        if kind == _REQUEST:
            if stream_id in self.streams:
                raise ProtocolViolation(f"stream {stream_id} opened twice")
            try:
                head, payload = decode_request_body(body)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                self.send(
                    FrameKind.ERROR, stream_id, encode_error(ErrorKind.PROTOCOL_ERROR, f"bad request head: {e}", False)
                )
                return
            stream = self.dispatcher.dispatch(head, payload, _TcpSink(self, stream_id), head.window)
            if stream is not None and stream.task is not None and not stream.task.done():
                self.streams[stream_id] = stream
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # control for a stream that already ended: normal race
        if kind == _CREDIT:
            stream.add_credit(decode_int(body))
        elif kind == _STOP:
            stream.stop()
        elif kind == _KILL:
            self.streams.pop(stream_id, None)
            stream.kill()
        else:
            raise ProtocolViolation(f"a caller may not send {FrameKind(kind).name} frames")

    def _on_oversize(self, kind: FrameKind, stream_id: int, size: int) -> None:
        if kind != FrameKind.REQUEST:
            raise ProtocolViolation(f"{kind.name} frame of {size} bytes")
        self.send(
            FrameKind.ERROR,
            stream_id,
            encode_error(
                ErrorKind.MESSAGE_TOO_LARGE,
                f"request of {size} bytes exceeds the request plane's limit of {self.limit} bytes",
                False,
            ),
        )

    def _on_version_mismatch(self, e: VersionMismatch) -> None:
        self.send(FrameKind.ERROR, e.stream_id, encode_error(ErrorKind.VERSION_MISMATCH, str(e), False))

    def on_closed(self, reason: str) -> None:
        self.connections.discard(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.connection_lost()


class TcpServer(ServerTransport):
    kind = "tcp"

    def __init__(
        self, dispatcher: Dispatcher, host: str | None = None, port: int | None = None, limit: int | None = None
    ) -> None:
        self.dispatcher = dispatcher
        self.host = host or tcp_host_from_env()
        self.port = tcp_port_from_env() if port is None else port
        self.limit = limit or PlaneTimeouts.from_env().max_message_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self.dispatcher, self.limit, self._connections), self.host, self.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("request plane (tcp) listening on %s", self.address)

    @property
    def address(self) -> str:
        """What the instance record advertises (a wildcard bind advertises this host's IP)."""
        advertised = advertise_host_for(self.host)
        host = f"[{advertised}]" if ":" in advertised else advertised
        return f"{host}:{self.port}"

    @property
    def connection_count(self) -> int:
        """Callers connected right now (each pools one connection per server)."""
        return len(self._connections)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.abort("server closing")
        await self._server.wait_closed()
        self._server = None


# --- client ----------------------------------------------------------------------------------


class _ClientConnection(_Connection, StreamChannel):
    def __init__(self, address: str, limit: int, on_gone: Callable[[_ClientConnection], None]) -> None:
        super().__init__(limit)
        self.address = address
        self.streams = StreamTable()
        self._next_sid = 0
        self._on_gone = on_gone

    def next_stream_id(self) -> int:
        # u32 on the wire; skip ids still open after a wrap-around.
        while True:
            self._next_sid = (self._next_sid + 1) & 0xFFFFFFFF
            if self._next_sid and self._next_sid not in self.streams:
                return self._next_sid

    def _on_frame(self, kind: FrameKind, stream_id: int, body: memoryview) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # items for a stream the caller killed: drop
        if kind == _DATA:
            stream.on_data(body)
        elif kind == _ACK:
            stream.on_ack()
        elif kind == _END:
            stream.on_end()
        elif kind == _ERROR:
            e = decode_error(body)
            stream.on_error(RequestPlaneError(e.kind, e.message, e.migratable))
        else:
            raise ProtocolViolation(f"a server may not send {FrameKind(kind).name} frames")

    def _on_oversize(self, kind: FrameKind, stream_id: int, size: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        self.send_control(stream_id, FrameKind.KILL)
        stream.on_error(
            RequestPlaneError(
                ErrorKind.MESSAGE_TOO_LARGE,
                f"response frame of {size} bytes exceeds this caller's limit of {self.limit} bytes",
                False,
            )
        )

    def _on_version_mismatch(self, e: VersionMismatch) -> None:
        error = RequestPlaneError(ErrorKind.VERSION_MISMATCH, str(e), False)
        for stream in self.streams.live():
            stream.on_error(error)

    def on_closed(self, reason: str) -> None:
        self._on_gone(self)
        error = RequestPlaneError(ErrorKind.DISCONNECTED, f"connection to {self.address} failed: {reason}", True)
        for _, stream in self.streams.drain():
            stream.on_error(error)

    # StreamChannel
    def send_control(self, stream_key: int, kind: int, amount: int = 0) -> None:
        if stream_key in self.streams:
            self.send(FrameKind(kind), stream_key, encode_int(amount) if kind == FrameKind.CREDIT else _EMPTY)

    def forget(self, stream_key: int) -> None:
        self.streams.pop(stream_key)


class TcpClient(ClientTransport):
    """Opens streams to TCP instances, one pooled connection per address."""

    kind = "tcp"

    def __init__(self, timeouts: PlaneTimeouts | None = None) -> None:
        self.timeouts = timeouts or PlaneTimeouts.from_env()
        self._pool: dict[str, _ClientConnection] = {}
        self._connecting: dict[str, asyncio.Future[_ClientConnection]] = {}

    async def _connection(self, address: str) -> _ClientConnection:
        conn = self._pool.get(address)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_ClientConnection] = asyncio.get_running_loop().create_future()
        self._connecting[address] = fut
        try:
            conn = await self._connect(address)
            self._pool[address] = conn
            fut.set_result(conn)
            return conn
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            self._connecting.pop(address, None)

    async def _connect(self, address: str) -> _ClientConnection:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ClientConnection(address, self.timeouts.max_message_bytes, self._gone), host, int(port)
                ),
                self.timeouts.connect_s,
            )
        except TimeoutError as e:
            raise RequestPlaneError(
                ErrorKind.CONNECTION_TIMEOUT, f"connecting to {address} took over {self.timeouts.connect_s:g} s", True
            ) from e
        except OSError as e:
            raise RequestPlaneError(ErrorKind.CANNOT_CONNECT, f"cannot connect to {address}: {e}", True) from e
        return conn

    def _gone(self, conn: _ClientConnection) -> None:
        if self._pool.get(conn.address) is conn:
            del self._pool[conn.address]

    async def open_stream(
        self, instance: Instance, payload: bytes, context: Context, decoder: msgspec.msgpack.Decoder
    ) -> ResponseStream:
        limit = self.timeouts.max_message_bytes
        if len(payload) > limit:
            raise RequestPlaneError(ErrorKind.MESSAGE_TOO_LARGE, str(FrameTooLarge(len(payload), limit)), False)
        conn = await self._connection(instance.transport.address)
        sid = conn.next_stream_id()
        head = RequestHead(
            instance.path, instance.instance_id, context.id(), context.trace_id, context.span_id, self.timeouts.window
        )
        stream = ResponseStream(
            conn, sid, context, decoder, instance.instance_id, self.timeouts.window, self.timeouts.first_response_s
        )
        if not stream.finished:  # a caller context killed before the call sends nothing
            conn.streams.add(sid, stream)
            conn.send(FrameKind.REQUEST, sid, encode_request_body(head, payload))
        return stream

    async def close(self) -> None:
        for conn in list(self._pool.values()):
            conn.abort("client closing")
        self._pool.clear()
