"""A live worker across an etcd restart: it stays (or comes back) in discovery and keeps serving."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from armature.runtime.context import Context
from armature.runtime.discovery.base import DiscoveryError
from armature.runtime.discovery.factory import create_store
from armature.runtime.request_plane.base import RequestPlaneError
from armature.runtime.runtime import DistributedRuntime

pytestmark = pytest.mark.integration


async def count(request: dict[str, Any], context: Context):
    for i in range(request["n"]):
        yield i


async def test_worker_is_found_and_served_after_etcd_restart(etcd_server: Any) -> None:
    worker = DistributedRuntime(create_store("etcd", endpoints=[etcd_server.url]), lease_ttl_s=3)
    caller = DistributedRuntime(create_store("etcd", endpoints=[etcd_server.url]), lease_ttl_s=3)
    try:
        await worker.endpoint("test.etcd.count").start_serving(count)
        client = await caller.endpoint("test.etcd.count").client()
        assert await client.wait_for_instances(10) == [worker.instance_id]

        await asyncio.to_thread(etcd_server.restart, 4.0)  # down longer than the lease TTL

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if client.instance_ids() == [worker.instance_id]:
                try:
                    items = [i async for i in await client.round_robin({"n": 3})]
                except RequestPlaneError:
                    items = []
                if items == [0, 1, 2]:
                    break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"worker not found and served within 15 s of the restart: {client.instance_ids()}")
        # The record on etcd is the worker's again (re-put on its new lease). Read from a store of
        # our own, retried: the loop above may pass on the caller's cached view while etcd is
        # still settling after its restart.
        key = worker.endpoint("test.etcd.count").instance_key
        last: Exception | None = None
        while time.monotonic() < deadline + 10:
            store = create_store("etcd", endpoints=[etcd_server.url])
            try:
                await store.start()
                if await store.get(key) is not None:
                    break
            except DiscoveryError as exc:
                last = exc
            finally:
                await store.close()
            await asyncio.sleep(0.5)
        else:
            pytest.fail(f"the worker's record is not back on etcd after the restart (last error: {last})")
    finally:
        await caller.shutdown(grace_period_s=0)
        await worker.shutdown(grace_period_s=0)
