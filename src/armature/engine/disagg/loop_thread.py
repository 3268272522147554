"""An asyncio event loop on its own daemon thread (the bootstrap server's and the KV puller's).

The engine's step loop must never wait on a socket, and the worker's own event loop must not
carry KV bytes either: both hand work to this loop with ``submit``/``call_soon``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed: the engine is shutting down and nobody waits any more
            pass

    def stop(
        self, cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None, timeout: float = 5.0
    ) -> None:
        if self.loop.is_closed():
            return
        if cleanup is not None and self._thread.is_alive():
            try:
                self.submit(cleanup()).result(timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
