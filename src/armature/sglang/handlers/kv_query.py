"""Answers the KV router's recovery queries from the worker's local index.

A router that sees a gap in this worker's ``event_id``s asks ``kv_indexer_query`` for the
missing range; one that meets the worker for the first time (or whose gap is older than the
log) asks ``kv_indexer_snapshot`` for the whole state. Both live next to the generate endpoint
(same namespace and component), on the same instance id the events carry as ``worker_id``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from armature.router.kv.local_indexer import LocalKvIndexer
from armature.router.kv.messages import EventRangeQuery, EventRangeReply, WorkerSnapshot
from armature.runtime.context import Context
from armature.runtime.request_plane.base import ErrorKind, RequestPlaneError

QUERY_ENDPOINT = "kv_indexer_query"
SNAPSHOT_ENDPOINT = "kv_indexer_snapshot"


class KvQueryHandler:
    def __init__(self, local: LocalKvIndexer) -> None:
        self.local = local

    async def events(self, request: EventRangeQuery, context: Context) -> AsyncIterator[EventRangeReply]:
        if request.worker_id != self.local.worker_id:
            raise RequestPlaneError(
                ErrorKind.INVALID_REQUEST,
                f"asked worker {self.local.worker_id:x} for the events of worker {request.worker_id:x}",
                migratable=False,
            )
        yield self.local.events_between(request.first, request.last)

    async def snapshot(self, request: Any, context: Context) -> AsyncIterator[WorkerSnapshot]:
        yield self.local.snapshot()
