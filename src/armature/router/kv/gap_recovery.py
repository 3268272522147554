"""How the router reaches workers' local indexers to recover missed KV events.

``GapHandler`` is the interface the router calls. ``RequestPlaneGapHandler`` asks a worker's
``kv_indexer_query`` / ``kv_indexer_snapshot`` endpoints (served next to its generate endpoint,
on the instance id its events carry as ``worker_id``). ``InProcessGapHandler`` serves workers
living in the router's own process straight from their ``LocalKvIndexer`` objects.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from armature.router.kv.local_indexer import LocalKvIndexer
from armature.router.kv.messages import EventRangeQuery, EventRangeReply, WorkerSnapshot

if TYPE_CHECKING:
    from armature.runtime.runtime import Client, DistributedRuntime

QUERY_ENDPOINT = "kv_indexer_query"
SNAPSHOT_ENDPOINT = "kv_indexer_snapshot"


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


class RequestPlaneGapHandler:
    """Fetches missed events and snapshots from workers over the request plane."""

    def __init__(
        self, runtime: DistributedRuntime, namespace: str, component: str, discovery_wait_s: float = 5.0
    ) -> None:
        self._runtime = runtime
        self.discovery_wait_s = discovery_wait_s
        self._paths = (f"{namespace}.{component}.{QUERY_ENDPOINT}", f"{namespace}.{component}.{SNAPSHOT_ENDPOINT}")
        self._query: Client | None = None
        self._snapshot: Client | None = None

    async def start(self) -> None:
        if self._query is None:
            self._query = await self._runtime.endpoint(self._paths[0]).client(EventRangeReply)
            self._snapshot = await self._runtime.endpoint(self._paths[1]).client(WorkerSnapshot)

    async def close(self) -> None:
        for client in (self._query, self._snapshot):
            if client is not None:
                await client.close()

    async def _one(self, client: Client, request: Any, worker_id: int) -> Any:
        # A worker just discovered through its generate endpoint may not yet be visible on its
        # query endpoints: give discovery a moment before calling it unknown.
        for _ in range(int(self.discovery_wait_s / 0.05)):
            if worker_id in client.instance_ids():
                break
            await asyncio.sleep(0.05)
        async with await client.direct(request, worker_id) as stream:
            async for item in stream:
                return item
        raise LookupError(f"worker {worker_id:x} answered its KV indexer query with nothing")

    async def fetch_events(self, worker_id: int, first: int, last: int) -> EventRangeReply:
        await self.start()
        assert self._query is not None
        reply = await self._one(self._query, EventRangeQuery(worker_id=worker_id, first=first, last=last), worker_id)
        if reply.worker_id != worker_id:
            raise ValueError(f"worker {worker_id:x} answered for worker {reply.worker_id:x}")
        return reply  # type: ignore[no-any-return]

    async def fetch_snapshot(self, worker_id: int) -> WorkerSnapshot:
        await self.start()
        assert self._snapshot is not None
        snap = await self._one(self._snapshot, None, worker_id)
        if snap.worker_id != worker_id:
            raise ValueError(f"worker {worker_id:x} sent the snapshot of worker {snap.worker_id:x}")
        return snap  # type: ignore[no-any-return]
