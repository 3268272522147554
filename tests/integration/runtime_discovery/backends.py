"""Build discovery stores that share one backing store, for each backend under test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from armature.runtime.discovery.base import KeyValueStore, WatchEvent, WatchEventKind
from armature.runtime.discovery.factory import create_store
from armature.runtime.discovery.mem import MemoryState

DISCOVERY_BACKENDS = ("mem", "file", "etcd")

# A short TTL keeps expiry tests fast; etcd rounds TTLs up to whole seconds, 2 s is its floor here.
TEST_TTL_S = 2.0


def store_maker(backend: str, tmp_path: Path, etcd_url: str | None) -> Callable[[], KeyValueStore]:
    """A function that makes a new (unstarted) store on the same backing store each call.

    Each store stands for one process: mem stores share one ``MemoryState`` made for this
    test, file stores one folder, etcd stores one server.
    """
    if backend == "mem":
        state = MemoryState()
        return lambda: create_store("mem", state=state)
    if backend == "file":
        root = tmp_path / "kv"
        return lambda: create_store("file", root=root)
    assert etcd_url is not None
    return lambda: create_store("etcd", endpoints=[etcd_url])


class WatchView:
    """Follows a watch in the background and keeps the view it implies, plus every event."""

    def __init__(self, events: AsyncIterator[WatchEvent]) -> None:
        self.events: list[WatchEvent] = []
        self.view: dict[str, bytes] = {}
        self._changed = asyncio.Condition()
        self._source = events
        self.ended = False
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for event in self._source:
            async with self._changed:
                self.events.append(event)
                if event.kind is WatchEventKind.PUT:
                    assert event.value is not None
                    self.view[event.key] = event.value
                else:
                    self.view.pop(event.key, None)
                self._changed.notify_all()
        async with self._changed:
            self.ended = True
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[WatchView], bool], timeout: float) -> None:
        """Wait until ``predicate(self)`` holds; TimeoutError names what was seen instead."""

        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise TimeoutError(f"watch condition not met in {timeout} s; events: {self.events}") from None

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
