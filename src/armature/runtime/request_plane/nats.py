"""NATS request plane: the TCP plane's frames and semantics over NATS subjects.

Subjects, per serving process (instance id ``I``):
    armature_rpc.I        REQUEST frames; the message's reply subject names the response stream
    armature_rpc.I.ctl    STOP / KILL / CREDIT frames; reply subject = the stream they are for
    armature_rpc.I.ping   liveness probe (request/reply)
A caller subscribes once to ``<its inbox>.*``; stream ``n`` answers on ``<its inbox>.n``.

Frames of one stream produced in the same loop iteration travel in one NATS message (a message
holds whole frames back to back), which keeps the per-item cost close to the TCP plane's.
NATS has no connection per stream, so a caller watches the instances it has streams open to:
it pings them every second and fails their streams as ``disconnected`` when nobody answers
(the process died, or the NATS server went away and came back without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

import msgspec
import nats
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

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
    HEADER,
    RequestHead,
    HEADER_SIZE,
    FrameKind,
    FrameTooLarge,
    ProtocolViolation,
    append_frame,
    append_item,
    decode_error,
    decode_int,
    decode_request_body,
    encode_error,
    encode_int,
    encode_request_body,
    parse_frame,
)
from armature.runtime.request_plane.dispatcher import Dispatcher, HandlerStream
from armature.runtime.request_plane.stream import ResponseStream, StreamTable

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "armature_rpc"
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
PING_FAILURES = 2  # consecutive timeouts before streams fail; "no responders" fails at once
# One NATS message carries at most this many bytes of frames (well under the 1 MiB default).
MESSAGE_CHUNK = 256 * 1024
_EMPTY = b""


def instance_subject(instance_id: int) -> str:
    return f"{SUBJECT_PREFIX}.{instance_id:x}"


def split_frames(data: bytes) -> list[tuple[FrameKind, int, memoryview]]:
    """The frames packed back to back in one NATS message."""
    frames = []
    view = memoryview(data)
    off = 0
    while off < len(data):
        if len(data) - off < HEADER_SIZE:
            raise ProtocolViolation("truncated frame in NATS message")
        (length,) = HEADER.unpack_from(data, off)[:1]
        end = off + 4 + length
        if end > len(data):
            raise ProtocolViolation("truncated frame in NATS message")
        frames.append(parse_frame(view[off:end]))
        off = end
    return frames


class NatsLink:
    """The process's NATS connection plus an ordered, batching publisher."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: NatsConnection | None = None
        self._lock = asyncio.Lock()
        self._buffers: dict[str, bytearray] = {}  # subject -> frames not yet published
        self._ready: list[tuple[str, bytes]] = []
        self._wakeup: asyncio.Event | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._failures: dict[str, Callable[[Exception], None]] = {}
        self.max_payload = 1024 * 1024
        self._closing = False
        self._disconnect_listeners: list[Callable[[], None]] = []

    async def connect(self) -> NatsConnection:
        async with self._lock:
            if self.nc is None:
                try:
                    self.nc = await nats.connect(
                        servers=[self.url],
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.25,
                        connect_timeout=5,
                        allow_reconnect=True,
                        name=f"armature-{secrets.token_hex(4)}",
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    )
                except Exception as e:  # noqa: BLE001 - nats raises several kinds here
                    raise RequestPlaneError(
                        ErrorKind.CANNOT_CONNECT, f"cannot connect to NATS at {self.url}: {e}", False
                    ) from e
                self.max_payload = self.nc.max_payload or self.max_payload
                self._wakeup = asyncio.Event()
                self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())
            return self.nc

    async def _on_error(self, e: Exception) -> None:
        log.debug("nats: %s", e)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        log.warning("nats: disconnected from %s; reconnecting", self.url)
        # Core NATS is at-most-once: frames in flight during the outage may be gone, so every
        # open stream fails now (migratable) rather than go on with a silent gap.
        for listener in list(self._disconnect_listeners):
            listener()

    def on_disconnect(self, listener: Callable[[], None]) -> None:
        self._disconnect_listeners.append(listener)

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected to %s", self.url)

    def buffer(self, subject: str) -> bytearray:
        """The pending frames for ``subject``; the caller appends and then calls ``mark``."""
        buf = self._buffers.get(subject)
        if buf is None:
            buf = self._buffers[subject] = bytearray()
        return buf

    def mark(self, subject: str) -> None:
        buf = self._buffers.get(subject)
        if buf is not None and len(buf) >= MESSAGE_CHUNK:
            self._ready.append((subject, bytes(buf)))
            buf.clear()
        if self._wakeup is not None:
            self._wakeup.set()

    def send(self, subject: str, kind: FrameKind, stream_id: int, body: bytes = _EMPTY) -> None:
        append_frame(self.buffer(subject), kind, stream_id, body)
        self.mark(subject)

    def on_failure(self, subject: str, callback: Callable[[Exception], None] | None) -> None:
        """Tell ``callback`` if publishing to ``subject`` fails (the stream it belongs to then fails)."""
        if callback is None:
            self._failures.pop(subject, None)
        else:
            self._failures[subject] = callback

    async def publish_now(self, subject: str, data: bytes, reply: str = "") -> None:
        """Publish after everything queued before it (keeps a stream's frames in order)."""
        await self._drain()
        assert self.nc is not None
        await self.nc.publish(subject, data, reply=reply)

    async def _drain(self) -> None:
        nc = self.nc
        if nc is None:
            return
        for subject, buf in list(self._buffers.items()):
            if buf:
                self._ready.append((subject, bytes(buf)))
            del self._buffers[subject]
        ready, self._ready = self._ready, []
        for subject, data in ready:
            try:
                await nc.publish(subject, data)
            except Exception as e:  # noqa: BLE001 - outbound buffer full while reconnecting, closed, ...
                callback = self._failures.get(subject)
                if callback is not None:
                    callback(e)
                else:
                    log.warning("nats: publish to %s failed: %s", subject, e)

    async def _publish_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._drain()

    async def close(self) -> None:
        if self.nc is None:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await self._drain()
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        with contextlib.suppress(Exception):
            await self.nc.drain()
        with contextlib.suppress(Exception):
            await self.nc.close()
        self.nc = None


# --- server ------------------------------------------------------------------------------------


class _NatsSink(StreamSink):
    __slots__ = ("server", "subject", "sid")

    def __init__(self, server: NatsServer, subject: str, sid: int) -> None:
        self.server = server
        self.subject = subject
        self.sid = sid

    def send_ack(self) -> None:
        self.server.link.send(self.subject, FrameKind.ACK, self.sid)

    def send_item(self, item: object) -> int:
        link = self.server.link
        n = append_item(link.buffer(self.subject), self.sid, item, self.server.limit)
        link.mark(self.subject)
        return n

    def send_end(self) -> None:
        self.server.link.send(self.subject, FrameKind.END, self.sid)
        self.server.forget(self.subject)

    def send_error(self, kind: str, message: str, migratable: bool) -> None:
        self.server.link.send(self.subject, FrameKind.ERROR, self.sid, encode_error(kind, message, migratable))
        self.server.forget(self.subject)

    def congested(self) -> bool:
        return False  # the credit window bounds what a stream has in flight

    async def wait_writable(self) -> None:
        return None


class NatsServer(ServerTransport):
    kind = "nats"

    def __init__(self, dispatcher: Dispatcher, link: NatsLink, limit: int) -> None:
        self.dispatcher = dispatcher
        self.link = link
        self.subject = instance_subject(dispatcher.instance_id)
        self.limit = limit
        self.streams: dict[str, HandlerStream] = {}
        self._subs: list[object] = []

    @property
    def address(self) -> str:
        return self.subject

    async def start(self) -> None:
        if self._subs:
            return
        nc = await self.link.connect()
        self.link.on_disconnect(self._drop_streams)
        # Leave room for the frame header and NATS protocol overhead within max_payload.
        self.limit = min(self.limit, self.link.max_payload - 1024)
        self._subs = [
            await nc.subscribe(self.subject, cb=self._on_request),
            await nc.subscribe(f"{self.subject}.ctl", cb=self._on_control),
            await nc.subscribe(f"{self.subject}.ping", cb=self._on_ping),
        ]
        log.info("request plane (nats) serving on %s via %s", self.subject, self.link.url)

    def forget(self, subject: str) -> None:
        self.streams.pop(subject, None)
        self.link.on_failure(subject, None)

    async def _on_request(self, msg: Msg) -> None:
        reply = msg.reply
        try:
            kind, sid, body = parse_frame(msg.data)
            if kind != FrameKind.REQUEST:
                raise ProtocolViolation(f"{kind.name} frame on the request subject")
        except ProtocolViolation as e:
            log.warning("nats request plane: dropping a malformed request: %s", e)
            if reply:
                kind_name = ErrorKind.VERSION_MISMATCH if "version" in str(e) else ErrorKind.PROTOCOL_ERROR
                self.link.send(reply, FrameKind.ERROR, 0, encode_error(kind_name, str(e), False))
            return
        if not reply:
            return
        if len(body) > self.limit:
            self.link.send(reply, FrameKind.ERROR, sid, encode_error(ErrorKind.MESSAGE_TOO_LARGE, str(FrameTooLarge(len(body), self.limit)), False))
            return
        try:
            head, payload = decode_request_body(body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            self.link.send(reply, FrameKind.ERROR, sid, encode_error(ErrorKind.PROTOCOL_ERROR, f"bad request head: {e}", False))
            return
        stream = self.dispatcher.dispatch(head, payload, _NatsSink(self, reply, sid), head.window)
        if stream is not None and stream.task is not None and not stream.task.done():
            self.streams[reply] = stream
            self.link.on_failure(reply, lambda _exc: stream.connection_lost())

    async def _on_control(self, msg: Msg) -> None:
        stream = self.streams.get(msg.reply)
        if stream is None:
            return
        try:
            frames = split_frames(msg.data)
        except ProtocolViolation as e:
            log.warning("nats request plane: bad control message: %s", e)
            return
        for kind, _sid, body in frames:
            if kind == FrameKind.CREDIT:
                stream.add_credit(decode_int(body))
            elif kind == FrameKind.STOP:
                stream.stop()
            elif kind == FrameKind.KILL:
                self.forget(msg.reply)
                stream.kill()

    def _drop_streams(self) -> None:
        streams, self.streams = self.streams, {}
        for subject, stream in streams.items():
            self.link.on_failure(subject, None)
            stream.connection_lost()

    async def _on_ping(self, msg: Msg) -> None:
        if msg.reply and self.link.nc is not None:
            await self.link.nc.publish(msg.reply, b"")

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs = []
        with contextlib.suppress(Exception):
            await self.link._drain()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.connection_lost()


# --- client --------------------------------------------------------------------------------------


class _InstanceChannel(StreamChannel):
    """The caller's streams to one instance, and the liveness watch over it."""

    def __init__(self, client: NatsClient, instance: Instance) -> None:
        self.client = client
        self.instance = instance
        self.subject = instance.transport.address
        self.streams = StreamTable()
        self.monitor: asyncio.Task[None] | None = None

    def send_control(self, stream_key: int, kind: int, amount: int = 0) -> None:
        if stream_key not in self.streams:
            return
        body = encode_int(amount) if kind == FrameKind.CREDIT else _EMPTY
        data = bytearray()
        append_frame(data, FrameKind(kind), stream_key, body)
        reply = self.client.reply_subject(stream_key)
        # Control rides behind queued frames on the same publisher, so CREDIT never overtakes.
        asyncio.get_running_loop().create_task(self._publish_control(bytes(data), reply))

    async def _publish_control(self, data: bytes, reply: str) -> None:
        try:
            await self.client.link.publish_now(f"{self.subject}.ctl", data, reply=reply)
        except Exception as e:  # noqa: BLE001 - the stream's liveness watch reports the outage
            log.debug("nats: control message to %s failed: %s", self.subject, e)

    def forget(self, stream_key: int) -> None:
        self.streams.pop(stream_key)
        self.client.streams.pop(stream_key)

    def ensure_monitor(self) -> None:
        if self.monitor is None or self.monitor.done():
            self.monitor = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        failures = 0
        nc = self.client.link.nc
        while self.streams and nc is not None:
            await asyncio.sleep(PING_INTERVAL_S)
            if not self.streams:
                break
            reason = await self._probe(nc)
            if reason is None:
                failures = 0
                continue
            failures += 1
            if reason == "no responders" or failures >= PING_FAILURES:
                self.fail_all(f"instance {self.instance.instance_id:x} at {self.subject}: {reason}")
                return

    async def _probe(self, nc: NatsConnection) -> str | None:
        try:
            await nc.request(f"{self.subject}.ping", b"", timeout=PING_TIMEOUT_S)
            return None
        except NoRespondersError:
            return "no responders"
        except (NatsTimeoutError, TimeoutError):
            return "no answer to a liveness ping"
        except Exception as e:  # noqa: BLE001 - disconnected / reconnecting
            return f"liveness ping failed: {e}"

    def fail_all(self, reason: str) -> None:
        error = RequestPlaneError(ErrorKind.DISCONNECTED, reason, True)
        for key, stream in self.streams.drain():
            self.client.streams.pop(key)
            stream.on_error(error)


class NatsClient(ClientTransport):
    kind = "nats"

    def __init__(self, link: NatsLink, timeouts: PlaneTimeouts | None = None) -> None:
        self.link = link
        self.timeouts = timeouts or PlaneTimeouts.from_env()
        self.inbox = ""
        self.streams = StreamTable()
        self._channels: dict[int, _InstanceChannel] = {}
        self._next_sid = 0
        self._sub: object | None = None
        self._lock = asyncio.Lock()

    def reply_subject(self, sid: int) -> str:
        return f"{self.inbox}.{sid}"

    async def _start(self) -> NatsConnection:
        nc = await self.link.connect()
        async with self._lock:
            if self._sub is None:
                self.link.on_disconnect(self._drop_streams)
                self.inbox = nc.new_inbox()
                self._sub = await nc.subscribe(f"{self.inbox}.*", cb=self._on_response)
        return nc

    async def _on_response(self, msg: Msg) -> None:
        try:
            sid = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        stream = self.streams.get(sid)
        if stream is None:
            return
        try:
            frames = split_frames(msg.data)
        except ProtocolViolation as e:
            error_kind = ErrorKind.VERSION_MISMATCH if "version" in str(e) else ErrorKind.PROTOCOL_ERROR
            stream.on_error(RequestPlaneError(error_kind, str(e), False))
            return
        for kind, _sid, body in frames:
            if kind == FrameKind.DATA:
                stream.on_data(body)
            elif kind == FrameKind.ACK:
                stream.on_ack()
            elif kind == FrameKind.END:
                stream.on_end()
            elif kind == FrameKind.ERROR:
                err = decode_error(body)
                stream.on_error(RequestPlaneError(err.kind, err.message, err.migratable))

    def _channel(self, instance: Instance) -> _InstanceChannel:
        channel = self._channels.get(instance.instance_id)
        if channel is None or channel.subject != instance.transport.address:
            channel = self._channels[instance.instance_id] = _InstanceChannel(self, instance)
        return channel

    async def open_stream(
        self, instance: Instance, payload: bytes, context: Context, decoder: msgspec.msgpack.Decoder
    ) -> ResponseStream:
        await self._start()
        limit = min(self.timeouts.max_message_bytes, self.link.max_payload - 1024)
        if len(payload) > limit:
            raise RequestPlaneError(ErrorKind.MESSAGE_TOO_LARGE, str(FrameTooLarge(len(payload), limit)), False)
        self._next_sid = self._next_sid % 0xFFFFFFFF + 1  # u32 in the frame header
        sid = self._next_sid
        channel = self._channel(instance)
        head = RequestHead(
            instance.path, instance.instance_id, context.id(), context.trace_id, context.span_id, self.timeouts.window
        )
        stream = ResponseStream(
            channel, sid, context, decoder, instance.instance_id, self.timeouts.window, self.timeouts.first_response_s
        )
        if stream.finished:
            return stream
        self.streams.add(sid, stream)
        channel.streams.add(sid, stream)
        data = bytearray()
        append_frame(data, FrameKind.REQUEST, sid, encode_request_body(head, payload))
        try:
            await self.link.publish_now(channel.subject, bytes(data), reply=self.reply_subject(sid))
        except Exception as e:  # noqa: BLE001
            channel.forget(sid)
            context.detach()
            raise RequestPlaneError(ErrorKind.CANNOT_CONNECT, f"cannot publish to {channel.subject}: {e}", True) from e
        channel.ensure_monitor()
        return stream

    def _drop_streams(self) -> None:
        for channel in self._channels.values():
            channel.fail_all(f"lost the connection to NATS at {self.link.url}")

    def instance_removed(self, instance_id: int) -> None:
        channel = self._channels.get(instance_id)
        if channel is not None and channel.streams:
            channel.ensure_monitor()

    async def close(self) -> None:
        for channel in self._channels.values():
            if channel.monitor is not None:
                channel.monitor.cancel()
            channel.fail_all("client closing")
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()  # type: ignore[attr-defined]
            self._sub = None
