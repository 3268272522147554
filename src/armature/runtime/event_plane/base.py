"""The event-plane contract: topic publish/subscribe at namespace or component scope.

An event is fire-and-forget, like NATS core or ZMQ PUB/SUB: a subscriber sees what is published
while it is connected, in order per publisher. Every event travels in an ``EventEnvelope``
carrying the publisher's id and a per-publisher sequence number (starting at 1), so a consumer
that needs completeness (the KV router's index) can see a gap and ask for a resync.
"""

from __future__ import annotations

import abc
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

import msgspec

log = logging.getLogger(__name__)

EVENT_PROTOCOL_VERSION = 1
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

# Names become NATS subject tokens and discovery key parts: no dots, slashes, wildcards, spaces.
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class EventPlaneError(RuntimeError):
    """The event plane could not connect, or was used after close."""


class EventEnvelope(msgspec.Struct, array_like=True, frozen=True):
    """What travels on the wire for every event (msgpack, positional)."""

    version: int
    publisher_id: int
    sequence: int
    published_at_ms: int
    topic: str
    payload: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventEnvelope)


def encode_envelope(envelope: EventEnvelope) -> bytes:
    return _encoder.encode(envelope)


def decode_envelope(data: bytes) -> EventEnvelope:
    """Decode an envelope; a different protocol version is a clear error, not a garbled event."""
    try:
        envelope = _decoder.decode(data)
    except msgspec.DecodeError:
        # Tell "another version" apart from "garbage": versions lead the array.
        try:
            head = msgspec.msgpack.decode(data)
        except msgspec.DecodeError as exc:
            raise EventPlaneError(f"undecodable event ({len(data)} bytes): {exc}") from exc
        if isinstance(head, list) and head and isinstance(head[0], int) and head[0] != EVENT_PROTOCOL_VERSION:
            raise EventPlaneError(
                f"event protocol version {head[0]} from a peer; this process speaks {EVENT_PROTOCOL_VERSION}"
            ) from None
        raise EventPlaneError(f"malformed event envelope ({len(data)} bytes)") from None
    if envelope.version != EVENT_PROTOCOL_VERSION:
        raise EventPlaneError(
            f"event protocol version {envelope.version} from publisher {envelope.publisher_id:x}; "
            f"this process speaks {EVENT_PROTOCOL_VERSION}"
        )
    return envelope


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be letters, digits, '_' or '-' (it names a subject)")
    return value


# Discovery keys need a component part; namespace-scoped topics use this one.
NAMESPACE_SCOPE_COMPONENT = "_"


@dataclass(frozen=True)
class EventScope:
    """Where a topic lives: a whole namespace, or one component of it."""

    namespace: str
    component: str | None = None

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        if self.component is not None:
            check_name("component", self.component)

    def subject(self, topic: str) -> str:
        """The NATS subject (Dynamo's layout)."""
        check_name("topic", topic)
        if self.component is None:
            return f"namespace.{self.namespace}.{topic}"
        return f"namespace.{self.namespace}.component.{self.component}.{topic}"

    def channel_prefix(self, topic: str) -> str:
        """The discovery prefix under which ZMQ publishers of ``topic`` register."""
        check_name("topic", topic)
        component = self.component if self.component is not None else NAMESPACE_SCOPE_COMPONENT
        return f"v1/event_channels/{self.namespace}/{component}/{topic}/"


class EventEndpoint(abc.ABC):
    """A publisher or a subscriber of one topic in one scope; also an async context manager."""

    def __init__(self, scope: EventScope, topic: str) -> None:
        self.scope = scope
        self.topic = check_name("topic", topic)

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class EventPublisher(EventEndpoint):
    """Publishes payloads on one topic; numbers them 1, 2, 3, ..."""

    def __init__(self, scope: EventScope, topic: str, publisher_id: int | None = None) -> None:
        super().__init__(scope, topic)
        self.publisher_id = publisher_id if publisher_id is not None else secrets.randbits(63) or 1
        self._sequence = 0

    def _next_envelope(self, payload: bytes) -> EventEnvelope:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"event payload must be bytes, not {type(payload).__name__}")
        self._sequence += 1
        return EventEnvelope(
            version=EVENT_PROTOCOL_VERSION,
            publisher_id=self.publisher_id,
            sequence=self._sequence,
            published_at_ms=int(time.time() * 1000),
            topic=self.topic,
            payload=bytes(payload),
        )

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind/connect and become visible to subscribers; idempotent."""

    async def publish(self, payload: bytes) -> int:
        """Send ``payload``; returns its sequence number."""
        if not self.started:
            raise EventPlaneError("publisher not started (or closed)")
        envelope = self._next_envelope(payload)
        await self._send(encode_envelope(envelope))
        return envelope.sequence

    @property
    @abc.abstractmethod
    def started(self) -> bool:
        """``start`` has run and ``close`` has not."""

    @abc.abstractmethod
    async def _send(self, data: bytes) -> None:
        """Put one encoded envelope on the wire."""


class EventSubscriber(EventEndpoint):
    """Receives every publisher's events on one topic, as an async iterator of envelopes.

    Iteration ends after ``close()``.
    """

    def __init__(self, scope: EventScope, topic: str) -> None:
        super().__init__(scope, topic)
        self.rejected = 0  # events that failed to decode (logged and dropped)

    @abc.abstractmethod
    async def start(self) -> None:
        """Subscribe; idempotent. Events published before this returns may be missed."""

    def __aiter__(self) -> AsyncIterator[EventEnvelope]:
        return self._iterate()

    @abc.abstractmethod
    def _iterate(self) -> AsyncIterator[EventEnvelope]: ...

    def _decode(self, data: bytes, source: str) -> EventEnvelope | None:
        """The envelope in ``data``; None (counted and logged) when it cannot be read."""
        try:
            return decode_envelope(data)
        except EventPlaneError as exc:
            self.rejected += 1
            log.error("event subscriber %s: dropped an event: %s", source, exc)
            return None


PublisherT = TypeVar("PublisherT", bound=EventPublisher)
SubscriberT = TypeVar("SubscriberT", bound=EventSubscriber)


class EventPlane(abc.ABC, Generic[PublisherT, SubscriberT]):
    """Makes publishers and subscribers on one transport; one per process.

    The plane keeps every member it made, so ``close`` can close them all.
    """

    name: str

    def __init__(self) -> None:
        self._members: set[PublisherT | SubscriberT] = set()
        self._closed = False

    def publisher(self, scope: EventScope, topic: str, publisher_id: int | None = None) -> PublisherT:
        self._check_open()
        pub = self._new_publisher(scope, topic, publisher_id)
        self._members.add(pub)
        return pub

    def subscriber(self, scope: EventScope, topic: str) -> SubscriberT:
        self._check_open()
        sub = self._new_subscriber(scope, topic)
        self._members.add(sub)
        return sub

    async def close(self) -> None:
        """Close every publisher and subscriber made by this plane, then the transport."""
        if self._closed:
            return
        # Closed first, so nothing made while the members close escapes being closed.
        self._closed = True
        for member in list(self._members):
            await member.close()
        await self._close_transport()

    def _check_open(self) -> None:
        if self._closed:
            raise EventPlaneError("event plane is closed")

    @abc.abstractmethod
    def _new_publisher(self, scope: EventScope, topic: str, publisher_id: int | None) -> PublisherT: ...

    @abc.abstractmethod
    def _new_subscriber(self, scope: EventScope, topic: str) -> SubscriberT: ...

    @abc.abstractmethod
    async def _close_transport(self) -> None: ...
