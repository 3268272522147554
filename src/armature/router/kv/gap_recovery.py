"""How the router reaches workers' local indexers to recover missed KV events.

``GapHandler`` is the interface the router calls; the request-plane client that queries a
remote worker's ``kv_indexer_query`` endpoint implements it in the runtime wiring.
``InProcessGapHandler`` serves workers living in the router's own process (``armature serve``,
the embedded single-process mode) straight from their ``LocalKvIndexer`` objects.
"""

from __future__ import annotations

from typing import Protocol

from armature.router.kv.local_indexer import LocalKvIndexer
from armature.router.kv.messages import EventRangeReply, WorkerSnapshot


class GapHandler(Protocol):
    async def fetch_events(self, worker_id: int, first: int, last: int) -> EventRangeReply:
        """The worker's events ``first..last`` inclusive (``complete`` False if not all kept)."""
        ...

    async def fetch_snapshot(self, worker_id: int) -> WorkerSnapshot:
        """The worker's whole current state."""
        ...


class InProcessGapHandler:
    def __init__(self) -> None:
        self._workers: dict[int, LocalKvIndexer] = {}

    def register(self, local: LocalKvIndexer) -> None:
        self._workers[local.worker_id] = local

    def unregister(self, worker_id: int) -> None:
        self._workers.pop(worker_id, None)

    def _get(self, worker_id: int) -> LocalKvIndexer:
        local = self._workers.get(worker_id)
        if local is None:
            raise LookupError(f"no local KV indexer for worker {worker_id:x} in this process")
        return local

    async def fetch_events(self, worker_id: int, first: int, last: int) -> EventRangeReply:
        return self._get(worker_id).events_between(first, last)

    async def fetch_snapshot(self, worker_id: int) -> WorkerSnapshot:
        return self._get(worker_id).snapshot()
