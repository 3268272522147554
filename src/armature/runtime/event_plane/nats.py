"""Event plane on NATS core subjects (``namespace.{ns}.component.{comp}.{topic}``).

One NATS connection per plane. nats-py reconnects by itself after the server goes away
(forever, every 0.5 s here) and re-sends the subscriptions, so subscribers recover without
help; what is published while no server is up waits in the client's pending buffer (2 MiB)
and is flushed after the reconnect. Like ZMQ, core NATS has no replay: a subscriber sees what
is published while it is subscribed, and sequence numbers show any gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client as NatsConnection
from nats.aio.subscription import Subscription

from armature.runtime.event_plane.base import (
    DEFAULT_NATS_URL,
    EventEnvelope,
    EventPlane,
    EventPlaneError,
    EventPublisher,
    EventScope,
    EventSubscriber,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_NATS_URL", "NatsEventPlane", "NatsEventPublisher", "NatsEventSubscriber"]
# A subscriber this far behind is a slow consumer; NATS then drops for it (and logs).
PENDING_MSGS_LIMIT = 100_000


class NatsEventPlane(EventPlane["NatsEventPublisher", "NatsEventSubscriber"]):
    name = "nats"

    def __init__(self, url: str = DEFAULT_NATS_URL, *, connect_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._nc: NatsConnection | None = None
        self._connect_lock = asyncio.Lock()

    def _new_publisher(self, scope: EventScope, topic: str, publisher_id: int | None) -> NatsEventPublisher:
        return NatsEventPublisher(self, scope, topic, publisher_id)

    def _new_subscriber(self, scope: EventScope, topic: str) -> NatsEventSubscriber:
        return NatsEventSubscriber(self, scope, topic)

    async def connection(self) -> NatsConnection:
        self._check_open()
        async with self._connect_lock:
            if self._nc is None:
                self._nc = await self._connect()
            return self._nc

    async def _connect(self) -> NatsConnection:
        async def on_disconnect() -> None:
            log.warning("event plane: lost NATS at %s; reconnecting", self.url)

        async def on_reconnect() -> None:
            log.info("event plane: reconnected to NATS at %s", self.url)

        async def on_error(exc: Exception) -> None:
            log.debug("event plane: NATS error: %s", exc)

        try:
            # max_reconnect_attempts applies to the first connect too; a bounded first
            # attempt gives a clear error when the server was never there.
            return await asyncio.wait_for(
                nats.connect(
                    self.url,
                    name="armature-events",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]
                    connect_timeout=2,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    error_cb=on_error,
                ),
                timeout=self._connect_timeout_s,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            raise EventPlaneError(f"cannot reach NATS at {self.url}: {exc or type(exc).__name__}") from exc

    async def _close_transport(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()


class NatsEventPublisher(EventPublisher):
    def __init__(self, plane: NatsEventPlane, scope: EventScope, topic: str, publisher_id: int | None) -> None:
        super().__init__(scope, topic, publisher_id)
        self._plane = plane
        self.subject = scope.subject(topic)
        self._nc: NatsConnection | None = None

    async def start(self) -> None:
        if self._nc is None:
            self._nc = await self._plane.connection()

    @property
    def started(self) -> bool:
        return self._nc is not None

    async def _send(self, data: bytes) -> None:
        assert self._nc is not None
        try:
            await self._nc.publish(self.subject, data)
        except nats.errors.Error as exc:  # closed connection, or the pending buffer is full
            raise EventPlaneError(f"publish on {self.subject} failed: {exc}") from exc

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._plane._members.discard(self)
        if nc is not None and nc.is_connected:
            with contextlib.suppress(Exception):
                await nc.flush(timeout=2)


class NatsEventSubscriber(EventSubscriber):
    def __init__(self, plane: NatsEventPlane, scope: EventScope, topic: str) -> None:
        super().__init__(scope, topic)
        self._plane = plane
        self.subject = scope.subject(topic)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        if self._sub is not None:
            return
        nc = await self._plane.connection()
        self._sub = await nc.subscribe(self.subject, pending_msgs_limit=PENDING_MSGS_LIMIT)
        # The SUB reaches the server with the flush; after it, publishes from anyone are seen.
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)

    async def _iterate(self) -> AsyncIterator[EventEnvelope]:
        if self._sub is None:
            raise EventPlaneError("subscriber not started")
        try:
            async for msg in self._sub.messages:
                envelope = self._decode(msg.data, self.subject)
                if envelope is not None:
                    yield envelope
        except nats.errors.Error:
            return  # the subscription was closed

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        self._plane._members.discard(self)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
