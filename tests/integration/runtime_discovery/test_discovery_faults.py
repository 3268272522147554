"""Discovery under faults: a lease holder killed with SIGKILL, etcd restarted under a holder."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from armature.runtime.discovery.base import DiscoveryError
from armature.runtime.discovery.factory import create_store
from fixtures.servers import EtcdServer
from integration.runtime_discovery.backends import TEST_TTL_S, WatchView

pytestmark = pytest.mark.integration

HOLDER = Path(__file__).with_name("lease_holder.py")


@pytest.mark.parametrize("backend", ["file", "etcd"])
async def test_sigkilled_holder_disappears_within_ttl_plus_2s(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    where = request.getfixturevalue("etcd_server_shared").url if backend == "etcd" else str(tmp_path / "kv")
    opts = {"endpoints": [where]} if backend == "etcd" else {"root": where}
    prefix = f"v1/instances/kill-{uuid.uuid4().hex[:8]}/"
    key = prefix + "backend/generate/1"
    observer = create_store(backend, **opts)
    await observer.start()
    watch = WatchView(observer.watch_prefix(prefix))
    holder = subprocess.Popen(
        [sys.executable, str(HOLDER), backend, key, str(TEST_TTL_S), where],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 30)
        assert line.strip() == "ready", holder.stderr.read() if holder.stderr else ""
        await watch.wait_for(lambda w: w.view.get(key) == b"held", 10)

        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        # The bar: another process's watch sees the DELETE within TTL + 2 s of the kill.
        await watch.wait_for(lambda w: key not in w.view, TEST_TTL_S + 2)
        assert await observer.get(key) is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        await watch.stop()
        await observer.close()


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data", "wiped-data"])
async def test_etcd_restart_holder_keys_come_back(etcd_server: EtcdServer, wipe: bool) -> None:
    """Restart etcd under a live holder: its keys are back within 15 s and a watcher sees them.

    With the data kept, etcd restores the lease; with it wiped, the holder must notice its lease
    is gone, take a new one and put its keys again, and the watcher must resync from scratch
    (etcd's revisions restart at 1).
    """
    prefix = f"v1/instances/restart-{uuid.uuid4().hex[:8]}/"
    holder = create_store("etcd", endpoints=[etcd_server.url])
    observer = create_store("etcd", endpoints=[etcd_server.url])
    await holder.start()
    await observer.start()
    watch = WatchView(observer.watch_prefix(prefix))
    try:
        lease = await holder.grant_lease(TEST_TTL_S)
        await holder.put(prefix + "a", b"worker-a", lease)
        await holder.put(prefix + "b", b"worker-b", lease)
        await watch.wait_for(lambda w: len(w.view) == 2, 10)

        await asyncio.to_thread(etcd_server.restart, 1.0, wipe)
        expected = {prefix + "a": b"worker-a", prefix + "b": b"worker-b"}
        seen = await _prefix_from_fresh_client(etcd_server, prefix, expected, within_s=15)
        assert seen == expected, etcd_server._log_tail()
        # The watcher's view agrees, and its watch is live again: a new key arrives.
        await holder.put(prefix + "c", b"worker-c", lease)
        await watch.wait_for(
            lambda w: w.view == {prefix + "a": b"worker-a", prefix + "b": b"worker-b", prefix + "c": b"worker-c"},
            15,
        )
        # The holder's lease still works after the restart: revoking it removes every key.
        await holder.revoke_lease(lease)
        await watch.wait_for(lambda w: w.view == {}, 10)
    finally:
        await watch.stop()
        await holder.close()
        await observer.close()


async def _prefix_from_fresh_client(
    server: EtcdServer, prefix: str, expected: dict[str, bytes], within_s: float
) -> dict[str, bytes] | None:
    """What a newly started client reads under ``prefix``, polled until it is ``expected``."""
    seen: dict[str, bytes] | None = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        fresh = create_store("etcd", endpoints=[server.url])
        try:
            await fresh.start()
            seen = await fresh.get_prefix(prefix)
        except DiscoveryError:
            seen = None
        finally:
            await fresh.close()
        if seen == expected:
            break
        await asyncio.sleep(0.2)
    return seen


async def test_sigkilled_zmq_publisher_is_dropped_by_subscribers(tmp_path: Path) -> None:
    """Brokerless ZMQ: a publisher process killed with SIGKILL leaves discovery within TTL + 2 s,
    and the subscriber disconnects from it; a new publisher is picked up afterwards."""
    from armature.runtime.event_plane.base import EventScope
    from armature.runtime.event_plane.factory import create_event_plane

    root = str(tmp_path / "kv")
    namespace = f"kill{uuid.uuid4().hex[:8]}"
    store = create_store("file", root=root)
    await store.start()
    plane = create_event_plane("zmq", discovery=store)
    sub = plane.subscriber(EventScope(namespace, "backend"), "kv-events")
    await sub.start()
    received: list[int] = []

    async def drain() -> None:
        async for envelope in sub:
            received.append(envelope.publisher_id)

    drainer = asyncio.create_task(drain())
    script = Path(__file__).with_name("event_publisher_proc.py")
    procs: list[subprocess.Popen[str]] = []
    try:
        ids = []
        for _ in range(2):
            proc = subprocess.Popen(
                [sys.executable, str(script), root, namespace, str(TEST_TTL_S)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert line.startswith("ready "), proc.stderr.read() if proc.stderr else ""
            ids.append(int(line.split()[1], 16))

        await _until(lambda: set(ids) <= set(received), 15)
        assert len(sub.publishers) == 2

        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=10)
        await _until(lambda: len(sub.publishers) == 1, TEST_TTL_S + 2)
        assert all(not key.endswith(f"/{ids[0]:x}") for key in sub.publishers)
        # The survivor's events keep arriving.
        count = received.count(ids[1])
        await _until(lambda: received.count(ids[1]) > count + 5, 10)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
        await plane.close()
        await store.close()


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)
