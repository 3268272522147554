"""Pick an event plane from a flag value or the environment.

Precedence: the explicit ``kind`` (``--event-plane``), then ``ARMATURE_EVENT_PLANE``, then
Dynamo's ``DYN_EVENT_PLANE``, then ``zmq`` (needs nothing but discovery). NATS is found at
``NATS_SERVER`` (default ``nats://127.0.0.1:4222``); ZMQ publishers bind on
``ARMATURE_EVENT_PLANE_HOST`` (default 127.0.0.1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from armature.runtime.discovery.base import KeyValueStore
from armature.runtime.event_plane.base import DEFAULT_NATS_URL, EventPlane

EVENT_PLANES = ("zmq", "nats")
DEFAULT_EVENT_PLANE = "zmq"


def event_plane_name(kind: str | None = None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    name = (kind or env.get("ARMATURE_EVENT_PLANE") or env.get("DYN_EVENT_PLANE") or DEFAULT_EVENT_PLANE)
    name = name.strip().lower()
    if name not in EVENT_PLANES:
        raise ValueError(f"unknown event plane {name!r}; choose one of {', '.join(EVENT_PLANES)}")
    return name


def nats_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("NATS_SERVER") or DEFAULT_NATS_URL


def create_event_plane(
    kind: str | None = None,
    *,
    discovery: KeyValueStore | None = None,
    lease_id: int | None = None,
    nats_server: str | None = None,
    host: str | None = None,
    advertise_host: str | None = None,
) -> EventPlane:
    """Build the event plane. zmq needs ``discovery`` (and uses ``lease_id`` if given)."""
    name = event_plane_name(kind)
    if name == "nats":
        from armature.runtime.event_plane.nats import NatsEventPlane

        return NatsEventPlane(nats_server or nats_url())
    if discovery is None:
        raise ValueError("the zmq event plane finds publishers through discovery: pass discovery=")
    from armature.runtime.event_plane.zmq import ZmqEventPlane

    return ZmqEventPlane(
        discovery,
        lease_id=lease_id,
        host=host or os.environ.get("ARMATURE_EVENT_PLANE_HOST") or "127.0.0.1",
        advertise_host=advertise_host,
    )
