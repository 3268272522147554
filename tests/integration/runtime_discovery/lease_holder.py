"""A process that registers one key on a lease and then waits to be killed.

Run as ``python lease_holder.py BACKEND KEY TTL [etcd-url|file-root]``; prints ``ready`` once the
key is written.
"""

from __future__ import annotations

import asyncio
import sys

from armature.runtime.discovery.factory import create_store


async def main(backend: str, key: str, ttl_s: float, where: str) -> None:
    opts = {"endpoints": [where]} if backend == "etcd" else {"root": where}
    store = create_store(backend, **opts)
    await store.start()
    lease = await store.grant_lease(ttl_s)
    await store.put(key, b"held", lease)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]))
