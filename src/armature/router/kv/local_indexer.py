"""A worker's own KV index and event log: numbers its events and answers the router's recovery.

The worker's publisher passes every engine event through ``record``, which assigns the next
per-worker ``event_id``, applies it to this worker's own radix tree and keeps it in a bounded
log. A router that sees a gap asks for ``events_between(first, last)``; a router that meets the
worker for the first time (or whose gap is older than the log) asks for ``snapshot()``.
"""

from __future__ import annotations

from collections import deque

from armature.protocols.kv_events import KvCacheEvent, KvCleared, KvRemoved, KvStored, RouterEvent
from armature.router.kv.indexer import KvIndexer
from armature.router.kv.messages import EventRangeReply, WorkerSnapshot


class LocalKvIndexer:
    def __init__(self, worker_id: int, max_log_events: int = 65536) -> None:
        if max_log_events <= 0:
            raise ValueError(f"max_log_events must be positive, got {max_log_events}")
        self.worker_id = worker_id
        self.index = KvIndexer()
        self._log: deque[RouterEvent] = deque(maxlen=max_log_events)
        self._next_id = 0

    @property
    def last_event_id(self) -> int | None:
        return self._next_id - 1 if self._next_id else None

    def record(self, data: KvStored | KvRemoved | KvCleared, dp_rank: int = 0) -> RouterEvent:
        """Number, apply and log one event; returns what the publisher sends to routers."""
        event = RouterEvent(
            worker_id=self.worker_id,
            event=KvCacheEvent(event_id=self._next_id, data=data, dp_rank=dp_rank),
        )
        self.append(event)
        return event

    def append(self, event: RouterEvent) -> None:
        """Keep an event numbered elsewhere (the worker's publisher); ids must be consecutive."""
        if event.worker_id != self.worker_id:
            raise ValueError(f"event of worker {event.worker_id:x} given to the local indexer of {self.worker_id:x}")
        eid = event.event.event_id
        if self._next_id and eid != self._next_id:
            raise ValueError(f"worker {self.worker_id:x}: event {eid} follows {self._next_id - 1}")
        gap = self.index.apply_event(event)
        assert gap is None
        self._next_id = eid + 1
        self._log.append(event)

    def events_between(self, first: int, last: int) -> EventRangeReply:
        """Logged events ``first..last`` (inclusive); ``complete`` is False if some were dropped."""
        if first > last:
            return EventRangeReply(worker_id=self.worker_id, events=[], complete=True)
        log = self._log
        if not log or last > log[-1].event.event_id:
            return EventRangeReply(worker_id=self.worker_id, events=[], complete=False)
        oldest = log[0].event.event_id
        if first < oldest:
            return EventRangeReply(worker_id=self.worker_id, events=[], complete=False)
        # Ids in the log are consecutive, so the range is a slice.
        start = first - oldest
        events = [log[i] for i in range(start, start + (last - first) + 1)]
        return EventRangeReply(worker_id=self.worker_id, events=events, complete=True)

    def snapshot(self) -> WorkerSnapshot:
        last = self.last_event_id
        return WorkerSnapshot(
            worker_id=self.worker_id,
            last_event_id=last,
            events=self.index.dump_worker(self.worker_id, last if last is not None else 0),
        )
