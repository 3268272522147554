"""Server-sent events framing and an ASGI response that stops its producer on disconnect.

One ``data: …\\n\\n`` write per chunk. Uvicorn keeps accepting writes after a client has gone,
so the response watches ``receive`` for ``http.disconnect`` and cancels the producing task: the
producer's ``finally`` then cancels the request all the way down to the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

DONE = b"data: [DONE]\n\n"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectWatch:
    """Cancel the current task if the client disconnects; use as an async context manager."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self.disconnected = False

    async def __aenter__(self) -> DisconnectWatch:
        owner = asyncio.current_task()
        self._task = asyncio.ensure_future(_wait_disconnect(self._receive))

        def on_done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is None:
                self.disconnected = True
                if owner is not None:
                    owner.cancel()

        self._task.add_done_callback(on_done)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class StreamResponse:
    """An ASGI response streaming ``body`` (already framed bytes) until done or disconnected."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        media_type: str = "text/event-stream",
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self._body = body
        self._media_type = media_type
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", self._media_type.encode() + b"; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        watch = DisconnectWatch(receive)
        try:
            async with watch:
                done = False
                async for chunk in self._body:
                    # The chunk that carries [DONE] also ends the body: one write, not two.
                    # The producer ends right after it (running it to its end keeps its bookkeeping).
                    done = chunk.endswith(DONE)
                    await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                if not done:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if self._on_disconnect is not None:
                self._on_disconnect()
        finally:
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
