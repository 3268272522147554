"""Brokerless event plane: ZMQ PUB/SUB, addresses found through discovery.

Each publisher binds its own PUB socket on a free port of ``host`` (loopback unless asked) and
registers ``{"address": "tcp://host:port"}`` under
``v1/event_channels/{ns}/{component}/{topic}/{publisher_id:x}`` on the process lease. A
subscriber watches that prefix and connects its one SUB socket to every publisher it sees,
disconnecting when the key goes (the publisher closed, or died and its lease expired).

Delivery is ZMQ's: per-publisher order, no broker, and no replay. A subscriber misses what a
publisher sent before the connection was up, and a publisher drops messages for a subscriber
more than ``hwm`` messages behind; sequence numbers in the envelopes show both as gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from armature.runtime.discovery.base import DEFAULT_LEASE_TTL_S, KeyValueStore, WatchEventKind
from armature.runtime.event_plane.base import (
    EventEnvelope,
    EventPlane,
    EventPlaneError,
    EventPublisher,
    EventScope,
    EventSubscriber,
)

log = logging.getLogger(__name__)

DEFAULT_HWM = 10_000


class ChannelRecord(msgspec.Struct):
    """The discovery value a ZMQ publisher registers."""

    address: str
    publisher_id: int
    topic: str


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(ChannelRecord)


class ZmqEventPlane(EventPlane["ZmqEventPublisher", "ZmqEventSubscriber"]):
    """ZMQ publishers/subscribers that find each other through ``discovery``."""

    name = "zmq"

    def __init__(
        self,
        discovery: KeyValueStore,
        *,
        lease_id: int | None = None,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        if host in ("0.0.0.0", "::", "*") and not advertise_host:
            raise ValueError(f"binding the event plane to {host} needs an advertise_host that peers can reach")
        super().__init__()
        self.discovery = discovery
        self.host = host
        self.advertise_host = advertise_host or host
        self.hwm = hwm
        self._lease_id = lease_id
        self._own_lease = False
        self._lease_lock = asyncio.Lock()
        self._ctx = zmq.asyncio.Context()

    def _new_publisher(self, scope: EventScope, topic: str, publisher_id: int | None) -> ZmqEventPublisher:
        return ZmqEventPublisher(self, scope, topic, publisher_id)

    def _new_subscriber(self, scope: EventScope, topic: str) -> ZmqEventSubscriber:
        return ZmqEventSubscriber(self, scope, topic)

    async def lease(self) -> int:
        """The lease publishers register on: the runtime's, or one of our own."""
        async with self._lease_lock:
            if self._lease_id is None:
                await self.discovery.start()
                self._lease_id = await self.discovery.grant_lease(DEFAULT_LEASE_TTL_S)
                self._own_lease = True
            return self._lease_id

    async def _close_transport(self) -> None:
        if self._own_lease and self._lease_id is not None:
            with contextlib.suppress(Exception):
                await self.discovery.revoke_lease(self._lease_id)
        self._ctx.term()


class ZmqEventPublisher(EventPublisher):
    def __init__(self, plane: ZmqEventPlane, scope: EventScope, topic: str, publisher_id: int | None) -> None:
        super().__init__(scope, topic, publisher_id)
        self._plane = plane
        self._socket: zmq.asyncio.Socket | None = None
        self._topic_frame = self.topic.encode()
        self.address: str | None = None
        self.key = f"{scope.channel_prefix(topic)}{self.publisher_id:x}"

    async def start(self) -> None:
        if self._socket is not None:
            return
        self._plane._check_open()
        sock = self._plane._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self._plane.hwm)
        sock.setsockopt(zmq.LINGER, 0)
        host = self._plane.host
        bind_host = f"[{host}]" if ":" in host else host
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            port = sock.bind_to_random_port(f"tcp://{bind_host}")
        except zmq.ZMQError as exc:
            sock.close()
            raise EventPlaneError(f"cannot bind the event publisher on {host}: {exc}") from exc
        adv = self._plane.advertise_host
        self.address = f"tcp://[{adv}]:{port}" if ":" in adv else f"tcp://{adv}:{port}"
        self._socket = sock
        record = ChannelRecord(address=self.address, publisher_id=self.publisher_id, topic=self.topic)
        await self._plane.discovery.put(self.key, _record_encoder.encode(record), await self._plane.lease())
        log.debug("event publisher %x on %s: %s", self.publisher_id, self.key, self.address)

    @property
    def started(self) -> bool:
        return self._socket is not None

    async def _send(self, data: bytes) -> None:
        assert self._socket is not None
        # PUB never blocks: at the high-water mark ZMQ drops for that subscriber only.
        await self._socket.send_multipart((self._topic_frame, data))

    async def close(self) -> None:
        sock, self._socket = self._socket, None
        self._plane._members.discard(self)
        if sock is None:
            return
        # Leave discovery first, so subscribers disconnect now rather than at lease expiry.
        with contextlib.suppress(Exception):
            await self._plane.discovery.delete(self.key)
        sock.close(linger=0)


class ZmqEventSubscriber(EventSubscriber):
    def __init__(self, plane: ZmqEventPlane, scope: EventScope, topic: str) -> None:
        super().__init__(scope, topic)
        self._plane = plane
        self._socket: zmq.asyncio.Socket | None = None
        self._connected: dict[str, str] = {}  # discovery key -> address
        self._watch_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._first_sync = asyncio.Event()

    @property
    def publishers(self) -> dict[str, str]:
        """Discovery key -> address of every publisher this subscriber is connected to."""
        return dict(self._connected)

    async def start(self) -> None:
        if self._socket is not None:
            return
        self._plane._check_open()
        await self._plane.discovery.start()
        sock = self._plane._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self._plane.hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        self._socket = sock
        self._closed = asyncio.get_running_loop().create_future()
        self._watch_task = asyncio.create_task(self._follow_publishers(), name=f"zmq-sub-{self.topic}")
        # Connect to the publishers that exist now before start() returns.
        waiter = asyncio.ensure_future(self._first_sync.wait())
        await asyncio.wait({waiter, self._watch_task}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()

    async def _follow_publishers(self) -> None:
        prefix = self.scope.channel_prefix(self.topic)
        watch = self._plane.discovery.watch_prefix(prefix)
        # Existing keys arrive first; once a get shows nothing newer is pending we are synced.
        existing = set((await self._plane.discovery.get_prefix(prefix)).keys())
        if not existing:
            self._first_sync.set()
        async for event in watch:
            if self._socket is None:
                return
            if event.kind is WatchEventKind.PUT and event.value is not None:
                self._connect(event.key, event.value)
            else:
                self._disconnect(event.key)
            existing.discard(event.key)
            if not existing:
                self._first_sync.set()

    def _connect(self, key: str, value: bytes) -> None:
        assert self._socket is not None
        try:
            record = _record_decoder.decode(value)
        except msgspec.DecodeError:
            log.error("event channel %s: unreadable record %r", key, value[:200])
            return
        old = self._connected.get(key)
        if old == record.address:
            return
        if old is not None:
            self._disconnect(key)
        try:
            self._socket.connect(record.address)
        except zmq.ZMQError as exc:
            log.error("event channel %s: cannot connect to %s: %s", key, record.address, exc)
            return
        self._connected[key] = record.address
        log.debug("subscriber %s connected to %s", self.topic, record.address)

    def _disconnect(self, key: str) -> None:
        address = self._connected.pop(key, None)
        if address is not None and self._socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.disconnect(address)

    async def _iterate(self) -> AsyncIterator[EventEnvelope]:
        if self._socket is None or self._closed is None:
            raise EventPlaneError("subscriber not started")
        closed = self._closed
        while self._socket is not None:
            # pyzmq types recv_multipart as a bare Awaitable though it returns an asyncio Future;
            # ensure_future hands that Future back unchanged, typed as one we can cancel.
            recv = asyncio.ensure_future(self._socket.recv_multipart())
            waiters: set[asyncio.Future[Any]] = {recv, closed}
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                return
            try:
                frames = recv.result()
            except zmq.ZMQError:
                if self._socket is None:
                    return
                raise
            if len(frames) != 2:
                self.rejected += 1
                log.error("event subscriber %s: dropped a message of %d frames", self.topic, len(frames))
                continue
            envelope = self._decode(frames[1], self.topic)
            if envelope is not None:
                yield envelope

    async def close(self) -> None:
        sock, self._socket = self._socket, None
        self._plane._members.discard(self)
        if sock is None:
            return
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        await asyncio.sleep(0)  # let a pending recv see the close before the socket goes
        sock.close(linger=0)
