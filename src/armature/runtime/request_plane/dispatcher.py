"""The handler side of the request plane, shared by every transport.

A transport decodes a REQUEST frame and calls ``Dispatcher.dispatch``; the dispatcher finds the
endpoint, decodes the payload into the handler's request type, and runs the handler's async
generator in its own task, pushing each item to the transport's ``StreamSink`` under the
stream's credit window. Control frames (STOP, KILL, CREDIT) come back through ``HandlerStream``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from armature.runtime.context import Context
from armature.runtime.metrics import EndpointMetrics
from armature.runtime.request_plane.base import ErrorKind, RequestPlaneError, StreamSink
from armature.runtime.request_plane.codec import FrameTooLarge, RequestHead

log = logging.getLogger(__name__)

RequestHandler = Callable[[Any, Context], AsyncIterator[Any]]
# The same requests, served by pushing: ``emit(item)`` sends an item as soon as it exists (no task
# wake-up per item, e.g. from an engine's output callback); the stream ends when the coroutine
# returns, and fails with what it raises, exactly as a generator handler's would.
PushHandler = Callable[[Any, Context, Callable[[Any], None]], Awaitable[None]]


@dataclass
class ServedEndpoint:
    namespace: str
    component: str
    endpoint: str
    handler: RequestHandler
    decoder: msgspec.msgpack.Decoder
    metrics: EndpointMetrics | None = None
    push: PushHandler | None = None  # preferred over ``handler`` when set
    streams: set[HandlerStream] = field(default_factory=set)
    last_activity: float = field(default_factory=time.monotonic)  # for idle-time canary checks

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"


class HandlerStream:
    """One request being served: its context, its task and its credit."""

    __slots__ = (
        "served", "context", "sink", "credits", "task", "shutting_down", "_credit_waiter", "_dispatcher", "_backlog",
        "_sent",
    )  # fmt: skip

    def __init__(self, dispatcher: Dispatcher, served: ServedEndpoint, context: Context, sink: StreamSink, window: int):
        self._dispatcher = dispatcher
        self.served = served
        self.context = context
        self.sink = sink
        self.credits = window
        self.task: asyncio.Task[None] | None = None
        self.shutting_down = False
        self._credit_waiter: asyncio.Future[None] | None = None
        self._backlog: deque[Any] = deque()  # pushed items waiting for credit
        self._sent = 0

    # Control from the caller ------------------------------------------------------------------

    def add_credit(self, n: int) -> None:
        self.credits += n
        backlog = self._backlog
        while backlog and self.credits > 0:
            self.credits -= 1
            try:
                self._sent += self.sink.send_item(backlog.popleft())
            except _UNSENDABLE as e:
                self._fail(*_unsendable_error(e))
                return
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stop(self) -> None:
        self.context.stop_generating()

    def _fail(self, kind: str, message: str) -> None:
        """A held-back item could not be sent: end the stream with that error, stop the handler."""
        self._backlog.clear()
        self.sink.send_error(kind, message, False)
        self.context.kill()
        if self.task is not None:
            self.task.cancel()

    def kill(self) -> None:
        """The caller wants nothing more: cancel the handler (its ``finally`` blocks still run)."""
        self.context.kill()
        if self.task is not None:
            self.task.cancel()

    def connection_lost(self) -> None:
        self.kill()

    def shutdown(self) -> None:
        """The process is going away: end the stream with a migratable ``engine_shutdown``."""
        self.shutting_down = True
        self.kill()

    # The handler loop -------------------------------------------------------------------------

    async def run(self, request: Any, request_bytes: int) -> None:
        served = self.served
        metrics = served.metrics
        started = metrics.started(request_bytes) if metrics is not None else 0.0
        sink = self.sink
        sent = 0
        agen: AsyncIterator[Any] | None = None
        try:
            if served.push is not None:
                try:
                    await served.push(request, self.context, self._emit)
                    await self._drain_backlog()
                except _UNSENDABLE as e:
                    sink.send_error(*_unsendable_error(e), False)
                    return
                agen = None
            else:
                agen = served.handler(request, self.context)
            async for item in agen or _NOTHING:
                if self.credits <= 0:
                    await self._wait_credit()
                self.credits -= 1
                try:
                    sent += sink.send_item(item)
                except _UNSENDABLE as e:
                    sink.send_error(*_unsendable_error(e), False)
                    return
                if sink.congested():
                    await sink.wait_writable()
            if self.shutting_down:
                # The handler saw the shutdown and returned early: its output is cut, not complete.
                sink.send_error(ErrorKind.ENGINE_SHUTDOWN, "the worker shut down during generation", True)
            else:
                sink.send_end()
        except asyncio.CancelledError:
            if self.shutting_down:
                sink.send_error(ErrorKind.ENGINE_SHUTDOWN, "the worker shut down during generation", True)
            # Otherwise the caller killed the stream or its connection is gone: nobody to tell.
        except RequestPlaneError as e:
            sink.send_error(e.kind, e.message, e.migratable)
        except GeneratorExit:
            # Dynamo's convention: a handler raising GeneratorExit means its engine is gone.
            sink.send_error(ErrorKind.ENGINE_SHUTDOWN, "the engine shut down during generation", True)
        except Exception as e:  # noqa: BLE001 - any handler failure becomes that stream's error
            log.exception("handler of %s failed (request %s)", served.path, self.context.id())
            sink.send_error(ErrorKind.HANDLER_ERROR, f"{type(e).__name__}: {e}", False)
        finally:
            if agen is not None and hasattr(agen, "aclose"):
                try:
                    await agen.aclose()
                except BaseException:  # noqa: BLE001 - cleanup of an already failed generator
                    pass
            served.streams.discard(self)
            served.last_activity = time.monotonic()
            self._dispatcher._finished(self)
            if metrics is not None:
                metrics.finished(started, sent + self._sent)

    def _emit(self, item: Any) -> None:
        """A push handler's item: sent now, or held until the caller grants credit."""
        if self._backlog or self.credits <= 0:
            self._backlog.append(item)
            return
        self.credits -= 1
        self._sent += self.sink.send_item(item)

    async def _drain_backlog(self) -> None:
        while self._backlog:
            await self._wait_credit()
            self.add_credit(0)

    async def _wait_credit(self) -> None:
        while self.credits <= 0:
            self._credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._credit_waiter
            finally:
                self._credit_waiter = None


class _Nothing:
    """An empty async iterator: a push handler's stream has no items left to pull."""

    def __aiter__(self) -> _Nothing:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


_NOTHING = _Nothing()

# What a response item that cannot go on the wire raises: the stream ends with an error frame.
_UNSENDABLE = (FrameTooLarge, TypeError, msgspec.EncodeError)


def _unsendable_error(e: Exception) -> tuple[str, str]:
    """The error kind and message that end a stream whose item raised ``e`` on its way out."""
    if isinstance(e, FrameTooLarge):
        return ErrorKind.MESSAGE_TOO_LARGE, f"response item: {e}"
    return ErrorKind.HANDLER_ERROR, f"response item cannot be encoded: {e}"


class Dispatcher:
    """Routes accepted streams of one process (one instance id) to its served endpoints."""

    def __init__(self, instance_id: int) -> None:
        self.instance_id = instance_id
        self.endpoints: dict[str, ServedEndpoint] = {}
        self.streams: set[HandlerStream] = set()
        self._idle: asyncio.Event | None = None

    def add(self, served: ServedEndpoint) -> None:
        if served.path in self.endpoints:
            raise ValueError(f"endpoint {served.path} is already served by this process")
        self.endpoints[served.path] = served

    def remove(self, path: str) -> ServedEndpoint | None:
        """Stop accepting new streams for ``path``; streams already running go on."""
        return self.endpoints.pop(path, None)

    def dispatch(
        self, head: RequestHead, payload: memoryview | bytes, sink: StreamSink, window: int
    ) -> HandlerStream | None:
        if head.instance_id != self.instance_id:
            sink.send_error(
                ErrorKind.ENDPOINT_NOT_FOUND,
                f"this process is instance {self.instance_id:x}, not {head.instance_id:x}",
                True,
            )
            return None
        served = self.endpoints.get(head.endpoint)
        if served is None:
            sink.send_error(
                ErrorKind.ENDPOINT_NOT_FOUND, f"instance {self.instance_id:x} does not serve {head.endpoint}", True
            )
            return None
        try:
            request = served.decoder.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            sink.send_error(ErrorKind.INVALID_REQUEST, f"{head.endpoint}: {e}", False)
            return None
        served.last_activity = time.monotonic()
        context = Context(head.request_id, trace_id=head.trace_id, parent_span_id=head.span_id)
        stream = HandlerStream(self, served, context, sink, head.window)
        served.streams.add(stream)
        self.streams.add(stream)
        sink.send_ack()
        stream.task = asyncio.get_running_loop().create_task(stream.run(request, len(payload)))
        return stream

    def _finished(self, stream: HandlerStream) -> None:
        self.streams.discard(stream)
        if not self.streams and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stream is open (or the timeout passes); True if idle."""
        if not self.streams:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return not self.streams
        finally:
            self._idle = None

    async def shutdown_streams(self, timeout_s: float = 5.0) -> None:
        """End every open stream with ``engine_shutdown`` and wait for their tasks."""
        streams = list(self.streams)
        for stream in streams:
            stream.shutdown()
        tasks = [s.task for s in streams if s.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
