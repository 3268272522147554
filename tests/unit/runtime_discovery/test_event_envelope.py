"""Event envelopes and scopes: the wire format and the names subjects are built from."""

from __future__ import annotations

import msgspec
import pytest

from armature.runtime.event_plane.base import (
    EVENT_PROTOCOL_VERSION,
    EventEnvelope,
    EventPlaneError,
    EventScope,
    decode_envelope,
    encode_envelope,
)
from armature.runtime.event_plane.factory import create_event_plane, event_plane_name, nats_url


def test_envelope_round_trip() -> None:
    env = EventEnvelope(EVENT_PROTOCOL_VERSION, 0xABC, 7, 1_700_000_000_000, "kv-events", b"\x00\xff")
    assert decode_envelope(encode_envelope(env)) == env


def test_other_protocol_version_is_a_clear_error() -> None:
    newer = msgspec.msgpack.encode([EVENT_PROTOCOL_VERSION + 1, 1, 1, 0, "kv-events", b"p"])
    with pytest.raises(EventPlaneError, match=f"version {EVENT_PROTOCOL_VERSION + 1}.*speaks {EVENT_PROTOCOL_VERSION}"):
        decode_envelope(newer)
    reshaped = msgspec.msgpack.encode([EVENT_PROTOCOL_VERSION + 1, "something", "else"])
    with pytest.raises(EventPlaneError, match="version"):
        decode_envelope(reshaped)


def test_garbage_is_a_clear_error() -> None:
    with pytest.raises(EventPlaneError, match="undecodable|malformed"):
        decode_envelope(b"\xc1\xc1 not msgpack")


def test_subjects_follow_dynamo_layout() -> None:
    assert EventScope("dynamo", "backend").subject("kv-events") == "namespace.dynamo.component.backend.kv-events"
    assert EventScope("dynamo").subject("kv_metrics") == "namespace.dynamo.kv_metrics"
    assert EventScope("dynamo", "backend").channel_prefix("kv-events") == "v1/event_channels/dynamo/backend/kv-events/"


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "a/b", ""])
def test_names_that_would_break_subjects_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        EventScope(bad)
    with pytest.raises(ValueError):
        EventScope("ns", "c").subject(bad)


def test_event_plane_selection() -> None:
    both = {"ARMATURE_EVENT_PLANE": "nats", "DYN_EVENT_PLANE": "zmq"}
    assert event_plane_name("zmq", env=both) == "zmq"
    assert event_plane_name(None, env=both) == "nats"
    assert event_plane_name(None, env={"DYN_EVENT_PLANE": "nats"}) == "nats"
    assert event_plane_name(None, env={}) == "zmq"
    with pytest.raises(ValueError, match="unknown event plane 'kafka'"):
        event_plane_name("kafka", env={})
    assert nats_url(env={}) == "nats://127.0.0.1:4222"
    assert nats_url(env={"NATS_SERVER": "nats://10.0.0.1:4222"}) == "nats://10.0.0.1:4222"


def test_zmq_plane_needs_discovery_and_a_reachable_advertised_host() -> None:
    with pytest.raises(ValueError, match="discovery"):
        create_event_plane("zmq")
    from armature.runtime.discovery.mem import MemoryStore

    with pytest.raises(ValueError, match="advertise_host"):
        create_event_plane("zmq", discovery=MemoryStore(), host="0.0.0.0")


async def test_publish_rejects_non_bytes() -> None:
    from armature.runtime.discovery.mem import MemoryState, MemoryStore

    store = MemoryStore(MemoryState())
    await store.start()
    plane = create_event_plane("zmq", discovery=store)
    pub = plane.publisher(EventScope("ns", "c"), "t")
    await pub.start()
    try:
        with pytest.raises(TypeError, match="bytes"):
            await pub.publish("a string")  # type: ignore[arg-type]
    finally:
        await plane.close()
        await store.close()
