"""The event-plane contract over ZMQ (with each discovery backend) and a real nats-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from armature.runtime.discovery.base import KeyValueStore
from armature.runtime.event_plane.base import (
    EVENT_PROTOCOL_VERSION,
    EventEnvelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscriber,
)
from armature.runtime.event_plane.factory import create_event_plane
from fixtures.servers import NatsServer
from integration.runtime_discovery.backends import store_maker

pytestmark = pytest.mark.integration

PLANES = ("zmq-mem", "zmq-file", "zmq-etcd", "nats")


class Inbox:
    """Drains a subscriber in the background."""

    def __init__(self, subscriber: EventSubscriber) -> None:
        self.envelopes: list[EventEnvelope] = []
        self._new = asyncio.Event()
        self.ended = False
        self._task = asyncio.create_task(self._drain(subscriber))

    async def _drain(self, subscriber: EventSubscriber) -> None:
        async for envelope in subscriber:
            self.envelopes.append(envelope)
            self._new.set()
        self.ended = True
        self._new.set()

    def payloads(self, publisher_id: int | None = None) -> list[bytes]:
        return [e.payload for e in self.envelopes if publisher_id is None or e.publisher_id == publisher_id]

    async def wait_for(self, predicate: Callable[[Inbox], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"inbox condition not met in {timeout} s; got {len(self.envelopes)} events")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def until_connected(pub: EventPublisher, inbox: Inbox, timeout: float = 10) -> None:
    """Publish warm-up events until one arrives: PUB/SUB drops what precedes the connection."""
    deadline = time.monotonic() + timeout
    while not any(e.payload == b"warm-up" and e.publisher_id == pub.publisher_id for e in inbox.envelopes):
        if time.monotonic() > deadline:
            raise TimeoutError("subscriber never connected to the publisher")
        await pub.publish(b"warm-up")
        await asyncio.sleep(0.05)


@dataclass
class PlaneSet:
    """Planes standing for separate processes on one backing discovery / NATS server."""

    make: Callable[[], EventPlane]
    planes: list[EventPlane]
    stores: list[KeyValueStore]

    def new(self) -> EventPlane:
        plane = self.make()
        self.planes.append(plane)
        return plane


@pytest.fixture(params=PLANES)
async def plane_set(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PlaneSet]:
    kind = str(request.param)
    stores: list[KeyValueStore] = []
    if kind == "nats":
        url = request.getfixturevalue("nats_server_shared").url

        def make() -> EventPlane:
            return create_event_plane("nats", nats_server=url)

    else:
        backend = kind.split("-", 1)[1]
        etcd_url = request.getfixturevalue("etcd_server_shared").url if backend == "etcd" else None
        new_store = store_maker(backend, tmp_path, etcd_url)

        def make() -> EventPlane:
            store = new_store()
            stores.append(store)
            return create_event_plane("zmq", discovery=store)

    ps = PlaneSet(make, [], stores)
    yield ps
    for plane in ps.planes:
        await plane.close()
    for store in stores:
        await store.close()


@pytest.fixture
def scope() -> EventScope:
    return EventScope(f"ns{uuid.uuid4().hex[:8]}", "backend")


async def test_events_arrive_in_order_with_envelope(plane_set: PlaneSet, scope: EventScope) -> None:
    pub_plane, sub_plane = plane_set.new(), plane_set.new()
    sub = sub_plane.subscriber(scope, "kv-events")
    await sub.start()
    inbox = Inbox(sub)
    pub = pub_plane.publisher(scope, "kv-events")
    await pub.start()
    try:
        await until_connected(pub, inbox)
        before_ms = int(time.time() * 1000)
        first_seq = await pub.publish(b"event-0")
        for i in range(1, 200):
            await pub.publish(f"event-{i}".encode())
        await inbox.wait_for(lambda b: b"event-199" in b.payloads())
        events = [e for e in inbox.envelopes if e.payload.startswith(b"event-")]
        assert [e.payload for e in events] == [f"event-{i}".encode() for i in range(200)]
        assert [e.sequence for e in events] == list(range(first_seq, first_seq + 200))
        # Once connected nothing is lost: sequence numbers (from 1, warm-ups first) have no holes.
        seqs = [e.sequence for e in inbox.envelopes]
        assert seqs[0] >= 1 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert {e.publisher_id for e in events} == {pub.publisher_id}
        assert {e.topic for e in events} == {"kv-events"}
        assert {e.version for e in events} == {EVENT_PROTOCOL_VERSION}
        assert before_ms - 1000 <= events[0].published_at_ms <= int(time.time() * 1000) + 1000
    finally:
        await inbox.stop()


async def test_scopes_and_topics_do_not_cross(plane_set: PlaneSet, scope: EventScope) -> None:
    pub_plane, sub_plane = plane_set.new(), plane_set.new()
    other_component = EventScope(scope.namespace, "prefill")
    namespace_scope = EventScope(scope.namespace)
    sub = sub_plane.subscriber(scope, "kv-events")
    ns_sub = sub_plane.subscriber(namespace_scope, "kv_metrics")
    await sub.start()
    await ns_sub.start()
    inbox, ns_inbox = Inbox(sub), Inbox(ns_sub)
    right = pub_plane.publisher(scope, "kv-events")
    wrong_component = pub_plane.publisher(other_component, "kv-events")
    wrong_topic = pub_plane.publisher(scope, "kv_metrics")
    ns_pub = pub_plane.publisher(namespace_scope, "kv_metrics")
    for p in (right, wrong_component, wrong_topic, ns_pub):
        await p.start()
    try:
        await until_connected(right, inbox)
        await until_connected(ns_pub, ns_inbox)
        await wrong_component.publish(b"wrong component")
        await wrong_topic.publish(b"wrong topic")
        await right.publish(b"right")
        await ns_pub.publish(b"namespace load")
        await inbox.wait_for(lambda b: b"right" in b.payloads())
        await ns_inbox.wait_for(lambda b: b"namespace load" in b.payloads())
        assert set(inbox.payloads()) == {b"warm-up", b"right"}
        assert set(ns_inbox.payloads()) == {b"warm-up", b"namespace load"}
    finally:
        await inbox.stop()
        await ns_inbox.stop()


async def test_publishers_that_come_and_go(plane_set: PlaneSet, scope: EventScope) -> None:
    sub_plane = plane_set.new()
    sub = sub_plane.subscriber(scope, "kv-events")
    await sub.start()
    inbox = Inbox(sub)
    try:
        # Publishers started after the subscriber are found (through discovery for ZMQ).
        pubs = [plane_set.new().publisher(scope, "kv-events") for _ in range(3)]
        for pub in pubs:
            await pub.start()
            await until_connected(pub, inbox)
        for round_ in range(20):
            for pub in pubs:
                await pub.publish(f"{pub.publisher_id:x}:{round_}".encode())
        for pub in pubs:
            want = [f"{pub.publisher_id:x}:{r}".encode() for r in range(20)]
            await inbox.wait_for(lambda b, p=pub, w=want: [x for x in b.payloads(p.publisher_id) if x != b"warm-up"] == w)
        # A publisher that leaves is let go; the others keep flowing.
        await pubs[0].close()
        await pubs[1].publish(b"after one left")
        await inbox.wait_for(lambda b: b"after one left" in b.payloads())
        if hasattr(sub, "publishers"):
            left_key = scope.channel_prefix("kv-events") + f"{pubs[0].publisher_id:x}"
            deadline = time.monotonic() + 10
            while left_key in sub.publishers and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert left_key not in sub.publishers
            assert len(sub.publishers) == 2
    finally:
        await inbox.stop()


async def test_subscriber_close_ends_iteration(plane_set: PlaneSet, scope: EventScope) -> None:
    plane = plane_set.new()
    sub = plane.subscriber(scope, "kv-events")
    await sub.start()
    inbox = Inbox(sub)
    await asyncio.sleep(0.1)
    await sub.close()
    await inbox.wait_for(lambda b: b.ended, 5)


async def test_nats_subscription_recovers_after_server_restart(nats_server: NatsServer) -> None:
    scope = EventScope("restart", "backend")
    pub_plane = create_event_plane("nats", nats_server=nats_server.url)
    sub_plane = create_event_plane("nats", nats_server=nats_server.url)
    try:
        sub = sub_plane.subscriber(scope, "kv-events")
        await sub.start()
        inbox = Inbox(sub)
        pub = pub_plane.publisher(scope, "kv-events")
        await pub.start()
        await pub.publish(b"before")
        await inbox.wait_for(lambda b: b"before" in b.payloads())

        await asyncio.to_thread(nats_server.restart, 1.0)
        # Both clients reconnect on their own; the subscription is re-sent by the subscriber's
        # client. Publish until one gets through, then a numbered burst must arrive whole.
        await until_connected(pub, inbox, timeout=20)
        for i in range(50):
            await pub.publish(f"after-{i}".encode())
        await inbox.wait_for(lambda b: b"after-49" in b.payloads())
        after = [p for p in inbox.payloads() if p.startswith(b"after-")]
        assert after == [f"after-{i}".encode() for i in range(50)]
        await inbox.stop()
    finally:
        await pub_plane.close()
        await sub_plane.close()
