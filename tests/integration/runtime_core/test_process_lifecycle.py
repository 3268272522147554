"""Worker processes that get SIGTERM or SIGKILL mid-stream, seen from another process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from armature.runtime.discovery.factory import create_store
from armature.runtime.request_plane.base import ErrorKind, RequestPlaneError
from armature.runtime.runtime import DistributedRuntime

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("worker_proc.py")
TTL_S = 2.0


class WorkerProcess:
    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--lease-ttl", str(TTL_S), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"worker did not start: {line!r}\n{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.instance_id = int(line.split()[1], 16)

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out + err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Environment for worker processes plus a store maker for the test process, per backend."""
    backend, plane = request.param
    env = dict(os.environ, ARMATURE_DISCOVERY_BACKEND=backend, ARMATURE_REQUEST_PLANE=plane)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[3] / "src"), env.get("PYTHONPATH", "")])
    opts: dict[str, Any] = {}
    if backend == "file":
        env["ARMATURE_FILE_KV"] = str(tmp_path / "kv")
        opts["root"] = tmp_path / "kv"
    if backend == "etcd":
        url = request.getfixturevalue("etcd_server").url
        env["ETCD_ENDPOINTS"] = url
        opts["endpoints"] = [url]
    nats_url = None
    if plane == "nats":
        nats_url = request.getfixturevalue("nats_server").url
        env["NATS_SERVER"] = nats_url
    yield {"env": env, "backend": backend, "plane": plane, "opts": opts, "nats_url": nats_url}


@pytest.fixture
async def caller(cluster: dict[str, Any]) -> AsyncIterator[DistributedRuntime]:
    store = create_store(cluster["backend"], **cluster["opts"])
    rt = DistributedRuntime(store, cluster["plane"], nats_url=cluster["nats_url"])
    yield rt
    await rt.shutdown(grace_period_s=0)


CRASH_MATRIX = [("file", "tcp"), ("etcd", "tcp"), ("etcd", "nats")]


@pytest.mark.parametrize("cluster", CRASH_MATRIX, indirect=True, ids=lambda p: "-".join(p))
async def test_sigkill_fails_streams_migratably_and_drops_the_instance(
    cluster: dict[str, Any], caller: DistributedRuntime
) -> None:
    worker = WorkerProcess(cluster["env"], [])
    try:
        client = await caller.endpoint("test.proc.count").client()
        assert await client.wait_for_instances(10) == [worker.instance_id]
        streams = [await client.round_robin({"n": 10_000, "interval": 0.01}) for _ in range(3)]
        for stream in streams:
            assert await stream.__anext__() == 0
        worker.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for stream in streams:
            with pytest.raises(RequestPlaneError) as err:
                async for _ in stream:
                    pass
            assert err.value.migratable, err.value
            assert err.value.kind == ErrorKind.DISCONNECTED
        await client.wait_for_instance_count(0, timeout_s=TTL_S + 2 + 3)  # TTL + 2 s, plus poll slack
        print(f"\n[{cluster['backend']}/{cluster['plane']}] instance gone {time.monotonic() - killed_at:.2f} s after SIGKILL")
    finally:
        worker.stop()


@pytest.mark.parametrize("cluster", [("file", "tcp"), ("etcd", "nats")], indirect=True, ids=lambda p: "-".join(p))
async def test_sigterm_leaves_discovery_at_once_and_lets_streams_finish(
    cluster: dict[str, Any], caller: DistributedRuntime
) -> None:
    cluster["env"]["ARMATURE_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"] = "10"
    worker = WorkerProcess(cluster["env"], [])
    try:
        client = await caller.endpoint("test.proc.count").client()
        await client.wait_for_instances(10)
        streams = [await client.round_robin({"n": 30, "interval": 0.05}) for _ in range(3)]
        for stream in streams:
            assert await stream.__anext__() == 0
        worker.proc.send_signal(signal.SIGTERM)
        results = [asyncio.ensure_future(_rest(s)) for s in streams]
        await client.wait_for_instance_count(0, timeout_s=3)
        assert not any(r.done() for r in results), "streams ended before the instance left discovery"
        for r in results:
            assert await r == list(range(1, 30))
        code, output = await asyncio.to_thread(worker.finish)
        assert code == 0, output
        # The engine's own handler ran last: after every stream had closed.
        assert "ENGINE-HANDLER-RAN open_streams=0" in output, output
        assert output.index("ENGINE-HANDLER-RAN") < output.index("SERVE-RETURNED")
    finally:
        worker.stop()


@pytest.mark.parametrize("cluster", [("file", "tcp")], indirect=True, ids=lambda p: "-".join(p))
async def test_sigterm_past_the_grace_period_ends_streams_with_engine_shutdown(
    cluster: dict[str, Any], caller: DistributedRuntime
) -> None:
    cluster["env"]["DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"] = "0.5"
    worker = WorkerProcess(cluster["env"], [])
    try:
        client = await caller.endpoint("test.proc.count").client()
        await client.wait_for_instances(10)
        stream = await client.round_robin({"n": 10_000, "interval": 0.01})
        assert await stream.__anext__() == 0
        worker.proc.send_signal(signal.SIGTERM)
        with pytest.raises(RequestPlaneError) as err:
            async for _ in stream:
                pass
        assert err.value.kind == ErrorKind.ENGINE_SHUTDOWN and err.value.migratable
        code, output = await asyncio.to_thread(worker.finish)
        assert code == 0, output
    finally:
        worker.stop()


async def _rest(stream: Any) -> list[Any]:
    return [item async for item in stream]
