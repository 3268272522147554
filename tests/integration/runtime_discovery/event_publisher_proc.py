"""A process that publishes ticks on the ZMQ event plane (file discovery) until killed.

Run as ``python event_publisher_proc.py ROOT NAMESPACE TTL``.
"""

from __future__ import annotations

import asyncio
import sys

from armature.runtime.discovery.factory import create_store
from armature.runtime.event_plane.base import EventScope
from armature.runtime.event_plane.factory import create_event_plane


async def main(root: str, namespace: str, ttl_s: float) -> None:
    store = create_store("file", root=root)
    await store.start()
    lease = await store.grant_lease(ttl_s)
    plane = create_event_plane("zmq", discovery=store, lease_id=lease)
    pub = plane.publisher(EventScope(namespace, "backend"), "kv-events")
    await pub.start()
    print(f"ready {pub.publisher_id:x}", flush=True)
    while True:
        await pub.publish(b"tick")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
