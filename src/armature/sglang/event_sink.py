"""The worker's side of the event plane: one publisher per topic, at component scope.

Publishers carry the worker's instance id as their publisher id, so subscribers can tell
workers apart from the envelope alone; they hang on the runtime's discovery lease, so they
vanish with the worker.
"""

from __future__ import annotations

import asyncio

from armature.runtime.event_plane.base import EventPlane, EventPublisher, EventScope
from armature.runtime.event_plane.factory import create_event_plane
from armature.runtime.runtime import DistributedRuntime
from armature.sglang.args import EndpointId


class WorkerEventSink:
    def __init__(self, plane: EventPlane, scope: EventScope, publisher_id: int) -> None:
        self.plane = plane
        self.scope = scope
        self.publisher_id = publisher_id
        self._publishers: dict[str, EventPublisher] = {}
        self._lock = asyncio.Lock()

    async def _publisher(self, topic: str) -> EventPublisher:
        pub = self._publishers.get(topic)
        if pub is None:
            async with self._lock:
                pub = self._publishers.get(topic)
                if pub is None:
                    pub = self.plane.publisher(self.scope, topic, self.publisher_id)
                    await pub.start()
                    self._publishers[topic] = pub
        return pub

    async def open(self, topics: list[str]) -> None:
        """Start publishers now: subscribers find them in discovery before the first event, so
        nothing early is lost to PUB/SUB's connect delay."""
        for topic in topics:
            await self._publisher(topic)

    async def publish(self, topic: str, payload: bytes) -> None:
        await (await self._publisher(topic)).publish(payload)

    async def close(self) -> None:
        self._publishers.clear()
        await self.plane.close()


async def create_event_sink(runtime: DistributedRuntime, endpoint: EndpointId) -> WorkerEventSink:
    await runtime.start()
    plane = create_event_plane(
        runtime.event_plane,
        discovery=runtime.discovery,
        lease_id=runtime.lease_id,
        nats_server=runtime.nats_url,
    )
    return WorkerEventSink(plane, EventScope(endpoint.namespace, endpoint.component), runtime.instance_id)
