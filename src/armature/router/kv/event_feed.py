"""The KV router on the event plane: workers' KV events in, replica-sync messages in and out.

Topics (component scope, Dynamo's names): workers publish ``RouterEvent``s on ``kv-events``;
router replicas share active-sequence changes on ``active_sequences_events``. A malformed or
foreign-version payload is logged and skipped; it never stops the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable
from typing import Any

import msgspec

from armature.protocols.kv_events import RouterEvent
from armature.router.kv.messages import ProtocolMismatch, ReplicaSyncMessage, decode_sync, encode_sync
from armature.router.kv.service import KvRouter

logger = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv-events"
REPLICA_SYNC_TOPIC = "active_sequences_events"

_router_event_decoder = msgspec.msgpack.Decoder(RouterEvent)


async def consume_kv_events(router: KvRouter, envelopes: AsyncIterable[Any]) -> None:
    """Feed every ``RouterEvent`` of a ``kv-events`` subscription into the router."""
    async for envelope in envelopes:
        try:
            event = _router_event_decoder.decode(envelope.payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("skipping an undecodable KV event from publisher %x: %s", envelope.publisher_id, exc)
            continue
        await router.on_event(event)


async def consume_replica_sync(router: KvRouter, envelopes: AsyncIterable[Any]) -> None:
    """Apply other replicas' active-sequence changes (this router's own are ignored)."""
    async for envelope in envelopes:
        try:
            message = decode_sync(envelope.payload)
        except (msgspec.DecodeError, msgspec.ValidationError, ProtocolMismatch) as exc:
            logger.warning("skipping a replica-sync message from publisher %x: %s", envelope.publisher_id, exc)
            continue
        router.apply_remote(message)


class EventPlaneSyncPublisher:
    """``SyncPublisher`` for ``KvRouter``: queues messages and publishes them in order.

    ``publish`` is called on the routing path, so it only enqueues; a background task owns the
    event-plane publisher. The queue is bounded: if the event plane stalls that long, messages
    are dropped with a warning (peers then under-count this router's load until its requests
    finish or expire) rather than growing memory without limit.
    """

    def __init__(self, publisher: Any, max_queue: int = 65536) -> None:
        self._publisher = publisher
        self._queue: asyncio.Queue[ReplicaSyncMessage] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def start(self) -> None:
        if self._task is None:
            await self._publisher.start()
            self._task = asyncio.create_task(self._run(), name="kv-router-replica-sync")

    def publish(self, message: ReplicaSyncMessage) -> None:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("replica-sync queue full: %d messages dropped", self.dropped)

    async def flush(self) -> None:
        """Wait until every queued message has been handed to the event plane."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self._publisher.publish(encode_sync(message))
            except Exception:
                logger.exception("publishing a replica-sync message failed")
            finally:
                self._queue.task_done()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._publisher.close()
