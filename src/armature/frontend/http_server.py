"""The frontend's HTTP/1.1 server: an ``asyncio.Protocol`` over httptools' parser.

The generate routes stream one SSE event per token to many clients at once; through uvicorn's
ASGI cycle each event is a message dict, a few awaits and checks, plus a disconnect-watching task
per request. Here a request is parsed straight out of ``data_received`` and a stream's bytes go
from the producer to ``transport.write``, chunk-framed, at most one write per
``stream_write_interval_s`` per connection (events that come sooner ride with the next write).

What it keeps from uvicorn: keep-alive (HTTP/1.1 default, ``Connection: close`` honoured), chunked
request bodies, ``Expect: 100-continue``, a body limit answered (413) as soon as it is known to
be exceeded — from ``Content-Length`` before reading any of the body — write back-pressure,
TLS, an idle keep-alive timeout, and a graceful shutdown: stop accepting, let running requests
finish within the grace period, then cut the rest. A client that disconnects cancels its
request's task (and the stream's ``on_disconnect``), which stops the request down to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
import httptools

log = logging.getLogger(__name__)

KEEP_ALIVE_TIMEOUT_S = 5.0
HEAD_DELAY_S = 0.05
# A stream's events go out at most this often per connection; what comes sooner waits (at most
# this long) and goes out with the next. Under load this halves the frontend's and the client's
# CPU per stream; below one event per interval it changes nothing.
STREAM_WRITE_INTERVAL_S = 0.003
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n"
)
_DONE = b"data: [DONE]\n\n"
_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 413: "Payload Too Large", 422: "Unprocessable Entity", 499: "Client Closed Request",
    500: "Internal Server Error", 503: "Service Unavailable",
}  # fmt: skip


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(slots=True)
class Reply:
    """A complete response."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class _PacedWriter:
    """One stream's writes, at most one per ``interval`` (``final`` ones at once, with what waits)."""

    __slots__ = ("_transport", "_loop", "_interval", "_pending", "_last", "_timer")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._transport = transport
        self._loop = loop
        self._interval = interval
        self._pending: list[bytes] = []
        self._last = -interval  # the first write goes at once
        self._timer: asyncio.TimerHandle | None = None

    def send(self, data: bytes, final: bool = False) -> None:
        self._pending.append(data)
        if final:
            self.flush()
        elif self._timer is None:
            due = self._last + self._interval
            if self._loop.time() >= due:
                self.flush()
            else:
                self._timer = self._loop.call_at(due, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)
            self._last = self._loop.time()

    def drop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()


@dataclass(slots=True)
class StreamReply:
    """A ``text/event-stream`` response: ``chunks`` are already SSE-framed bytes.

    The chunk that ends with ``data: [DONE]`` also ends the body (one write, not two).
    ``on_disconnect`` runs when the client goes away before the end.
    """

    chunks: AsyncIterator[bytes]
    on_disconnect: Callable[[], None] | None = None
    sink: SseSink | None = None


class SseSink:
    """Lets a stream's producer write an event at once, from a callback: ``ready()`` says whether
    the connection can take it now (streaming, head sent, not paused, open), ``write`` sends it."""

    __slots__ = ("ready", "write")

    def __init__(self) -> None:
        self.ready: Callable[[], bool] = _not_ready
        self.write: Callable[[bytes], None] = _drop


def _not_ready() -> bool:
    return False


def _drop(_: bytes) -> None:
    return None


class Application:
    """What the server serves: turns a request into a reply (never raises for bad input)."""

    body_limit_bytes: int

    async def handle(self, request: HttpRequest) -> Reply | StreamReply:
        raise NotImplementedError

    def error_reply(self, status: int, message: str) -> Reply:
        """An error the server answers by itself (413 before the body is read), in the app's format."""
        return Reply(status, json.dumps({"error": {"message": message}}).encode())


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n".encode()


class HttpConnection(asyncio.Protocol):
    """One client connection: requests in order, one at a time."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._app = server.app
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # The request being parsed.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._rejected = False
        # Parsed requests waiting for the one being answered (pipelining), and that one's task.
        self._pending: deque[tuple[HttpRequest, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._on_disconnect: Callable[[], None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closing_after = False  # server shutting down: close once the current reply is done
        self._head = b""  # a stream's response head not written yet

    # --- transport events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's are not asyncio.Transport subclasses
        self._server.connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request("protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._bad_request(f"invalid HTTP request: {exc}")

    def _bad_request(self, why: str) -> None:
        if self._rejected or self._task is not None:
            # The rest of a body already answered with 413, or garbage behind a request still
            # being answered (a 400 now would land inside that response): just hang up.
            self._close()
            return
        self._reply_and_close(Reply(400, why.encode() + b"\n", "text/plain"))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._wake_writer()
        self._pending.clear()
        task = self._task
        if task is not None and not task.done():
            on_disconnect, self._on_disconnect = self._on_disconnect, None
            if on_disconnect is not None:
                on_disconnect()
            task.cancel()

    def pause_writing(self) -> None:
        self._paused = True

    @property
    def paused(self) -> bool:
        """The transport's buffer is past its high-water mark: writes wait for the reader."""
        return self._paused

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._rejected = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key not in self._headers:  # the first of repeated headers counts, as in Starlette
            self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        limit = self._app.body_limit_bytes
        declared = self._headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Answered before reading the body: a huge body is never pulled into memory.
            self._reject(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._body_size += len(body)
        limit = self._app.body_limit_bytes
        if self._body_size > limit:
            self._body = []
            self._reject(f"request body exceeds the limit of {limit} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._rejected:
            return
        parser = self._parser
        path = self._url.partition(b"?")[0].decode("latin-1") or "/"
        method = parser.get_method().decode("ascii")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = HttpRequest(method, path, self._headers, body)
        keep_alive = parser.should_keep_alive() and not self._server.shutting_down
        if self._task is None:
            self._start(request, keep_alive)
        else:
            self._pending.append((request, keep_alive))
            if self.transport is not None:
                self.transport.pause_reading()

    # --- answering ----------------------------------------------------------------------------

    def _reject(self, why: str) -> None:
        self._rejected = True
        reply = self._app.error_reply(413, why)
        if self._task is None:
            self._write_reply(reply, keep_alive=True)
        else:  # a pipelined request behind one still being answered: hang up
            self._pending.clear()
            self._close()

    def _start(self, request: HttpRequest, keep_alive: bool) -> None:
        self._task = self._loop.create_task(self._run(request, keep_alive))

    async def _run(self, request: HttpRequest, keep_alive: bool) -> None:
        server = self._server
        server.active += 1
        try:
            try:
                reply = await self._app.handle(request)
            except asyncio.CancelledError:
                return  # the client went away (or the server was stopped) while we worked
            if self.closed:
                if isinstance(reply, StreamReply):
                    await _close_quietly(reply.chunks, reply.on_disconnect)
                return
            if isinstance(reply, StreamReply):
                keep_alive = await self._stream(reply, keep_alive)
            else:
                self._write_reply(reply, keep_alive, head_only=request.method == "HEAD")
        except Exception:  # noqa: BLE001 - the app already turns errors into replies; this is a bug
            log.exception("HTTP request %s %s failed", request.method, request.path)
            if not self.closed:
                self._reply_and_close(Reply(500, b'{"error":{"message":"internal error"}}'))
        finally:
            server.active -= 1
            self._task = None
            self._on_disconnect = None
            server.request_done()
        if self.closed:
            return
        if not keep_alive or self._closing_after:
            self._close()
        elif self._pending:
            self._start(*self._pending.popleft())
            if not self._pending and self.transport is not None:
                self.transport.resume_reading()
        else:
            self._arm_idle_timer()

    def _write_reply(self, reply: Reply, keep_alive: bool, head_only: bool = False) -> None:
        if self.transport is None or self.closed:
            return
        head = [_status_line(reply.status)]
        head.append(f"content-type: {reply.content_type}\r\ncontent-length: {len(reply.body)}\r\n".encode())
        for name, value in reply.headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if not head_only:  # HEAD: the GET's headers (its length included), no body
            head.append(reply.body)
        self.transport.write(b"".join(head))

    def _reply_and_close(self, reply: Reply) -> None:
        self._write_reply(reply, keep_alive=False)
        self._close()

    async def _stream(self, reply: StreamReply, keep_alive: bool) -> bool:
        """Write an SSE stream; returns whether the connection may carry another request."""
        transport = self.transport
        assert transport is not None
        self._on_disconnect = reply.on_disconnect
        chunks = reply.chunks
        sink = reply.sink
        out = _PacedWriter(transport, self._loop, self._server.stream_write_interval_s)
        if sink is not None:

            def ready() -> bool:
                return not (self.closed or self._paused or self._head)

            def write(data: bytes) -> None:
                out.send(b"%x\r\n%b\r\n" % (len(data), data))

            sink.ready, sink.write = ready, write
        # The head goes out with the first event (one write, not two) unless that event takes
        # longer than HEAD_DELAY_S: then alone, so the client sees the 200 during a long prefill.
        self._head = _STREAM_HEAD + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        timer = self._loop.call_later(HEAD_DELAY_S, self._flush_head)
        done = False
        try:
            async for chunk in chunks:
                if self.closed:
                    break
                if not chunk:  # an empty chunk would read as the end of the body
                    continue
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                if chunk.endswith(_DONE):
                    # The producer ends right after [DONE]; running it to its end keeps its bookkeeping.
                    data += b"0\r\n\r\n"
                    done = True
                if self._head:  # the first event: at once (it is the client's time to first token)
                    out.send(self._take_head() + data, final=True)
                else:
                    out.send(data, final=done)
                if self._paused:
                    await self._writable()
            if not done and not self.closed:
                out.send(self._take_head() + b"0\r\n\r\n", final=True)
        finally:
            out.drop()
            if sink is not None:
                sink.ready, sink.write = _not_ready, _drop
            timer.cancel()
            self._on_disconnect = None
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return keep_alive

    def _take_head(self) -> bytes:
        head, self._head = self._head, b""
        return head

    def _flush_head(self) -> None:
        if self._head and self.transport is not None and not self.closed:
            self.transport.write(self._take_head())

    async def _writable(self) -> None:
        while self._paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    # --- closing ------------------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(KEEP_ALIVE_TIMEOUT_S, self._close)

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """The server is stopping: close now when idle, else after the current reply."""
        if self._task is None:
            self._close()
        else:
            self._closing_after = True
            self._pending.clear()

    def abort(self) -> None:
        """The grace period is over: cut the request that is still running."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._close()


async def _close_quietly(chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None] | None) -> None:
    if on_disconnect is not None:
        on_disconnect()
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def tls_context(cert_path: str | None, key_path: str | None) -> ssl.SSLContext | None:
    if not cert_path:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


class HttpServer:
    """Listens, serves ``app`` and shuts down gracefully (SIGTERM/SIGINT when ``serve`` runs)."""

    def __init__(
        self,
        app: Application,
        host: str = "127.0.0.1",
        port: int = 8000,
        ssl_context: ssl.SSLContext | None = None,
        graceful_timeout_s: float = 5.0,
        reuse_port: bool = False,
        stream_write_interval_s: float = STREAM_WRITE_INTERVAL_S,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self.graceful_timeout_s = graceful_timeout_s
        self.reuse_port = reuse_port  # other processes listen on the same port (--http-processes)
        self.stream_write_interval_s = stream_write_interval_s
        self.connections: set[HttpConnection] = set()
        self.active = 0
        self.shutting_down = False
        self.started = False
        self._server: asyncio.base_events.Server | None = None
        self._stop = asyncio.Event()
        self._idle: asyncio.Event | None = None

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), self.host, self.port, ssl=self._ssl, reuse_address=True,
            reuse_port=self.reuse_port or None, backlog=2048,
        )  # fmt: skip
        self.started = True

    def request_stop(self) -> None:
        self._stop.set()

    async def stop_requested(self) -> None:
        """Returns once a stop was asked for (SIGTERM, SIGINT or ``request_stop``)."""
        await self._stop.wait()

    @property
    def should_exit(self) -> bool:
        """uvicorn's name for ``request_stop``, for callers written against ``uvicorn.Server``."""
        return self._stop.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self.request_stop()

    async def serve(
        self, install_signal_handlers: bool = True, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Serve until ``request_stop`` (or SIGTERM/SIGINT), then shut down gracefully."""
        if not self.started:
            await self.start()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signal_handlers:
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
        try:
            await self._stop.wait()
        finally:
            for sig in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.shutdown()

    def _on_signal(self, sig: int) -> None:
        log.info("shutting down on signal %s", signal.Signals(sig).name)
        self.request_stop()

    def request_done(self) -> None:
        if self._idle is not None and self.active == 0:
            self._idle.set()

    async def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), self.graceful_timeout_s)
            except TimeoutError:
                log.warning("%d requests still running after %.1f s; cutting them", self.active, self.graceful_timeout_s)
        for conn in list(self.connections):
            conn.abort()
        # Let the cut requests run their cleanup (engine aborts) before the caller tears down.
        for _ in range(3):
            await asyncio.sleep(0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

