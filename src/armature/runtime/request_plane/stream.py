"""The caller's side of one stream: an async iterator of response items.

The transport feeds it frames (``on_ack``/``on_data``/``on_end``/``on_error``); the caller
iterates it and may ``stop()`` or ``kill()`` it. The buffer is bounded by the credit window: the
handler may run at most ``window`` items ahead, and credit flows back as the caller consumes.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from armature.runtime.context import Context
from armature.runtime.request_plane.base import ErrorKind, RequestPlaneError, StreamChannel
from armature.runtime.request_plane.codec import FrameKind

log = logging.getLogger(__name__)


class ResponseStream:
    """``async for item in stream`` yields items; errors raise ``RequestPlaneError``."""

    def __init__(
        self,
        channel: StreamChannel,
        key: int,
        context: Context,
        decoder: msgspec.msgpack.Decoder,
        instance_id: int,
        window: int,
        first_response_s: float,
    ) -> None:
        self._channel = channel
        self._key = key
        self.context = context
        self.instance_id = instance_id
        self._decoder = decoder
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # Set by a consumer that can take an item right where it arrives (no task wake-up);
        # returns False to have it queued for iteration instead.
        self.on_item: Callable[[Any], bool] | None = None
        self._error: RequestPlaneError | None = None
        self._finished = False  # no more frames will come (END, error, kill, or lost)
        self._released = False
        self._credit_every = max(1, window // 2)
        self._consumed = 0
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            first_response_s, self._first_response_timeout, first_response_s
        )
        # Weakly: a linked parent context must not keep a stream its caller dropped alive.
        ref = weakref.ref(self)

        def on_context(ctx: Context) -> None:
            stream = ref()
            if stream is not None:
                stream._on_context(ctx)

        self._context_callback = on_context
        context.add_callback(on_context)
        if context.is_killed():
            self._on_context(context)

    # --- caller side -------------------------------------------------------------------------

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._items:
                item = self._items.popleft()
                if not self._finished:
                    self._credit(1)
                return item
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._finished:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def buffered(self) -> int:
        """Items that have arrived and not been taken yet."""
        return len(self._items)

    def take_buffered(self) -> list[Any]:
        """Every item that has already arrived, without waiting (empty when none).

        A consumer that fell behind handles the burst in one go (one write for several items)
        instead of one ``__anext__`` round per item; credit flows back as for iteration.
        Errors and the end of the stream still surface through ``__anext__``.
        """
        items = self._items
        if not items:
            return []
        out = list(items)
        items.clear()
        if not self._finished:
            self._credit(len(out))
        return out

    def stop(self) -> None:
        """Ask the handler to finish early; items it still sends keep arriving."""
        self.context.stop_generating()

    def kill(self) -> None:
        """Abandon the stream: the handler is cancelled and iteration ends at once."""
        self.context.kill()

    @property
    def finished(self) -> bool:
        return self._finished

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._finished:
            self.kill()

    def __del__(self) -> None:
        # A caller that drops a stream half-read must not leave a handler generating forever.
        if not self._finished and not self._released:
            try:
                self._channel.send_control(self._key, FrameKind.KILL)
                self._channel.forget(self._key)
            except Exception:  # noqa: BLE001 - interpreter or loop may be going away
                pass

    # --- transport side ----------------------------------------------------------------------

    def on_ack(self) -> None:
        self._cancel_timer()

    def _credit(self, consumed: int) -> None:
        """``consumed`` more items are the caller's: return credit every half window."""
        self._consumed += consumed
        if self._consumed >= self._credit_every:
            self._channel.send_control(self._key, FrameKind.CREDIT, self._consumed)
            self._consumed = 0

    def on_data(self, body: memoryview | bytes) -> None:
        if self._finished:
            return
        if self._timer is not None:
            self._cancel_timer()
        try:
            item = self._decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            self._channel.send_control(self._key, FrameKind.KILL)
            self.on_error(RequestPlaneError(ErrorKind.INVALID_RESPONSE, f"cannot decode a response item: {e}", False))
            return
        waiter = self._waiter
        push = self.on_item
        # Only while the caller waits with nothing queued: items never overtake each other.
        if push is not None and waiter is not None and not self._items:
            try:
                taken = push(item)
            except Exception as e:  # the caller's bug must not reach the connection's other streams
                log.exception("a response item's consumer failed")
                self.on_item = None
                self._channel.send_control(self._key, FrameKind.KILL)
                self.on_error(RequestPlaneError(ErrorKind.CALLER_ERROR, f"the caller failed on an item: {e!r}", False))
                return
            if taken:
                self._credit(1)
                return
        self._items.append(item)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_end(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._release()
        self._wake()

    def on_error(self, error: RequestPlaneError) -> None:
        if self._finished:
            return
        self._finished = True
        self._error = error
        self._release()
        self._wake()

    # --- internals ---------------------------------------------------------------------------

    def _on_context(self, context: Context) -> None:
        if self._finished:
            return
        if context.is_killed():
            self._channel.send_control(self._key, FrameKind.KILL)
            self._finished = True
            self._items.clear()
            self._release()
            self._wake()
        else:
            self._channel.send_control(self._key, FrameKind.STOP)

    def _first_response_timeout(self, seconds: float) -> None:
        self._timer = None
        if self._finished:
            return
        self._channel.send_control(self._key, FrameKind.KILL)
        self.on_error(
            RequestPlaneError(
                ErrorKind.CONNECTION_TIMEOUT,
                f"instance {self.instance_id:x} did not accept the request within {seconds:g} s",
                True,
            )
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._cancel_timer()
        self.context.remove_callback(self._context_callback)
        self.context.detach()
        self._channel.forget(self._key)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class StreamTable:
    """A transport's open caller streams by key, held weakly.

    A stream whose caller dropped it half-read is collected; its ``__del__`` then kills the
    handler. Frames that still arrive for it find nothing and are dropped.
    """

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[ResponseStream]] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, key: int, stream: ResponseStream) -> None:
        self._refs[key] = weakref.ref(stream)

    def get(self, key: int) -> ResponseStream | None:
        ref = self._refs.get(key)
        return None if ref is None else ref()

    def pop(self, key: int) -> None:
        self._refs.pop(key, None)

    def drain(self) -> list[tuple[int, ResponseStream]]:
        """Remove and return every live stream."""
        refs, self._refs = self._refs, {}
        return [(key, stream) for key, ref in refs.items() if (stream := ref()) is not None]

    def live(self) -> list[ResponseStream]:
        return [stream for ref in list(self._refs.values()) if (stream := ref()) is not None]
