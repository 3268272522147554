"""What every engine-backed handler shares: the readiness gate, request ids and cancellation.

Cancellation is wired before the engine sees the request: the handler picks the engine ``rid``
itself, so a stop, kill or worker shutdown can abort the request while it is still queued
(Dynamo only learns SGLang's id from the first output and cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
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

    async def wait_ready(self) -> None:
        """Requests that arrive before the model card is registered wait here."""
        if not self.ready.is_set():
            await self.ready.wait()

    @contextlib.asynccontextmanager
    async def cancellation_monitor(self, rid: str, context: Context) -> AsyncIterator[CancelState]:
        """Abort ``rid`` in the engine when the caller stops/kills it or the worker shuts down."""
        state = CancelState()

        async def watch() -> None:
            stop = asyncio.ensure_future(context.async_killed_or_stopped())
            down = asyncio.ensure_future(self.shutdown_event.wait())
            try:
                await asyncio.wait({stop, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                down.cancel()
            state.stopped = context.is_stopped()
            state.shutdown = self.shutdown_event.is_set() and not state.stopped
            log.debug("aborting %s (%s)", rid, "shutdown" if state.shutdown else "stopped by caller")
            await self.engine.abort(rid)

        self.inflight.add(rid)
        task = asyncio.create_task(watch(), name=f"cancel-monitor-{rid}")
        try:
            yield state
        finally:
            self.inflight.discard(rid)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cleanup(self) -> None:
        await self.engine.shutdown()
