"""What every engine-backed handler shares: the readiness gate, request ids and cancellation.

Cancellation is wired before the engine sees the request: the handler picks the engine ``rid``
itself, so a stop, kill or worker shutdown can abort the request while it is still queued
(Dynamo only learns SGLang's id from the first output and cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from armature.engine.api import Engine
from armature.runtime.context import Context

log = logging.getLogger(__name__)


@dataclass
class CancelState:
    """Why a request is being cut short, if it is."""

    stopped: bool = False
    shutdown: bool = False


class BaseWorkerHandler:
    def __init__(self, engine: Engine, ready: asyncio.Event, shutdown_event: asyncio.Event) -> None:
        self.engine = engine
        self.ready = ready
        self.shutdown_event = shutdown_event
        self.inflight: set[str] = set()
        self._monitors: dict[str, Callable[[], None]] = {}
        self._shutdown_watch: asyncio.Future[None] | None = None

    async def wait_ready(self) -> None:
        """Requests that arrive before the model card is registered wait here."""
        if not self.ready.is_set():
            await self.ready.wait()

    @contextlib.asynccontextmanager
    async def cancellation_monitor(self, rid: str, context: Context) -> AsyncIterator[CancelState]:
        """Abort ``rid`` in the engine when the caller stops/kills it or the worker shuts down.

        Callbacks, not a watcher task per request: the context calls back on stop/kill, and one
        task per handler waits for the shutdown event and calls back every open request.
        """
        state = CancelState()
        loop = asyncio.get_running_loop()
        abort: asyncio.Task[None] | None = None

        def trigger(_: Context | None = None) -> None:
            nonlocal abort
            if abort is not None:
                return
            state.stopped = context.is_stopped()
            state.shutdown = self.shutdown_event.is_set() and not state.stopped
            log.debug("aborting %s (%s)", rid, "shutdown" if state.shutdown else "stopped by caller")
            abort = loop.create_task(self.engine.abort(rid), name=f"abort-{rid}")

        self.inflight.add(rid)
        self._monitors[rid] = trigger
        context.add_callback(trigger)
        self._watch_shutdown()
        if context.is_stopped() or self.shutdown_event.is_set():
            trigger()
        try:
            yield state
        finally:
            context.remove_callback(trigger)
            self._monitors.pop(rid, None)
            self.inflight.discard(rid)
            if abort is not None and not abort.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(abort)

    def _watch_shutdown(self) -> None:
        if self._shutdown_watch is None:
            self._shutdown_watch = asyncio.ensure_future(self._on_shutdown())

    async def _on_shutdown(self) -> None:
        await self.shutdown_event.wait()
        for trigger in list(self._monitors.values()):
            trigger()

    async def cleanup(self) -> None:
        if self._shutdown_watch is not None:
            self._shutdown_watch.cancel()
        await self.engine.shutdown()
