"""A real worker process (`python -m armature.sglang`) found through file discovery.

The test side is a real DistributedRuntime client: it reads the model card, streams
PreprocessedRequests, stops one mid-stream, and finally SIGTERMs a worker with 8 streams in
flight (issue 4, bar 4: all complete within the grace period, the instance leaves discovery,
exit code 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from armature.protocols.llm import (
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from armature.protocols.model_card import ModelCard, ModelType
from armature.runtime.discovery.file import FileStore
from armature.runtime.request_plane.base import ErrorKind, RequestPlaneError
from armature.runtime.runtime import Client, DistributedRuntime

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120.0
ENDPOINT = "dynamo.backend.generate"


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    kv_root: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status_url(self) -> str | None:
        for line in self.log().splitlines():
            if "worker ready:" in line and "status=http" in line:
                return line.split("status=", 1)[1].split()[0]
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_worker(tmp: Path, *args: str, grace_s: float = 30.0, discovery: str = "file",
                 extra_env: dict[str, str] | None = None) -> WorkerProcess:
    kv_root = tmp / "kv"
    kv_root.mkdir(exist_ok=True)
    log_path = tmp / f"worker-{time.monotonic_ns()}.log"
    env = dict(os.environ)
    env.update({
        "DYN_FILE_KV": str(kv_root),
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": str(grace_s),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    })
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "armature.sglang", "--discovery-backend", discovery, "--system-port", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    return WorkerProcess(proc, kv_root, log_path)


@pytest.fixture
async def make_client() -> AsyncIterator:
    runtimes: list[DistributedRuntime] = []

    async def make(worker: WorkerProcess) -> tuple[DistributedRuntime, Client]:
        rt = DistributedRuntime(FileStore(worker.kv_root, poll_interval_s=0.1))
        await rt.start()
        runtimes.append(rt)
        client = await rt.endpoint(ENDPOINT).client(response_type=LLMEngineOutput)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.instance_ids():
            if worker.proc.poll() is not None:
                pytest.fail(f"worker exited with {worker.proc.returncode}:\n{worker.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not register in {START_TIMEOUT_S} s:\n{worker.log()}")
            await asyncio.sleep(0.1)
        return rt, client

    yield make
    for rt in runtimes:
        await rt.shutdown(grace_period_s=0.0)


@pytest.fixture
def native_worker(tmp_path: Path, tiny_llama_path: Path) -> Iterator[WorkerProcess]:
    worker = start_worker(tmp_path, "--engine", "native", "--model-path", str(tiny_llama_path),
                          "--served-model-name", "tiny", "--page-size", "16", "--max-total-tokens", "8192",
                          "--context-length", "512")
    yield worker
    worker.stop()


def _request(tokens: list[int], max_tokens: int, **kw) -> PreprocessedRequest:
    return PreprocessedRequest(model="tiny", token_ids=tokens,
                               stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True),
                               sampling_options=SamplingOptions(temperature=0.0), **kw)


async def _collect(client: Client, req: PreprocessedRequest) -> list[LLMEngineOutput]:
    stream = await client.round_robin(req)
    return [item async for item in stream]


async def _card(rt: DistributedRuntime) -> ModelCard:
    cards = await rt.discovery.get_prefix("v1/mdc/dynamo/backend/generate/")
    assert len(cards) == 1
    return msgspec.json.decode(next(iter(cards.values())), type=ModelCard)


async def test_native_worker_serves_streams(native_worker: WorkerProcess, make_client, tiny_llama_path: Path) -> None:
    rt, client = await make_client(native_worker)
    card = await _card(rt)
    assert card.name == "tiny" and card.model_types == [ModelType.CHAT, ModelType.COMPLETIONS]
    assert card.kv_cache_block_size == 16 and card.context_length == 512
    assert card.tokenizer_path == str(tiny_llama_path.resolve()) and card.chat_template
    assert card.runtime_config.total_kv_blocks == 8192 // 16

    prompt = list(range(100, 140))
    first = await _collect(client, _request(prompt, 8))
    assert sum(len(o.token_ids) for o in first) == 8
    assert first[-1].finish_reason is FinishReason.LENGTH
    assert first[-1].usage is not None
    assert (first[-1].usage.prompt_tokens, first[-1].usage.completion_tokens) == (40, 8)
    # Greedy is deterministic, and the second run reuses the cached prompt pages.
    second = await _collect(client, _request(prompt, 8))
    assert [t for o in second for t in o.token_ids] == [t for o in first for t in o.token_ids]
    assert second[-1].usage.cached_tokens >= 32

    # The engine control route empties the prefix cache: the same prompt is computed afresh.
    url = native_worker.status_url()
    assert url is not None, native_worker.log()
    req = urllib.request.Request(url + "/engine/flush_cache", data=b"{}", method="POST",
                                 headers={"content-type": "application/json"})
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=10).read())
    assert msgspec.json.decode(body) == {"status": "ok"}
    third = await _collect(client, _request(prompt, 8))
    assert third[-1].usage.cached_tokens == 0


async def test_stop_mid_stream_and_bad_request(native_worker: WorkerProcess, make_client) -> None:
    _, client = await make_client(native_worker)
    stream = await client.round_robin(_request(list(range(50, 60)), 400))
    got: list[LLMEngineOutput] = []
    async for item in stream:
        got.append(item)
        if len(got) == 2:
            stream.context.stop_generating()
    assert got[-1].finish_reason is FinishReason.CANCELLED
    assert sum(len(o.token_ids) for o in got) < 400

    with pytest.raises(RequestPlaneError) as exc:
        await _collect(client, _request(list(range(3, 700)), 4))
    assert exc.value.kind == ErrorKind.INVALID_REQUEST and not exc.value.migratable
    assert "context" in exc.value.message

    # The engine's running requests return to zero (read from the worker's /metrics).
    url = native_worker.status_url()
    assert url is not None, native_worker.log()
    deadline = time.monotonic() + 10
    while True:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/metrics", timeout=5).read().decode())
        running = [line for line in body.splitlines() if line.startswith("armature_worker_num_running_requests{")]
        if running and all(line.endswith(" 0.0") for line in running):
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def test_sigterm_drains_eight_streams(native_worker: WorkerProcess, make_client) -> None:
    _, client = await make_client(native_worker)
    streams = [await client.round_robin(_request(list(range(10 + i, 30 + i)), 48)) for i in range(8)]
    firsts = [await stream.__anext__() for stream in streams]
    native_worker.proc.send_signal(signal.SIGTERM)

    async def rest(stream) -> list[LLMEngineOutput]:
        return [item async for item in stream]

    results = await asyncio.wait_for(asyncio.gather(*(rest(s) for s in streams)), 60)
    for first, tail in zip(firsts, results, strict=True):
        outs = [first, *tail]
        assert sum(len(o.token_ids) for o in outs) == 48
        assert outs[-1].finish_reason is FinishReason.LENGTH
    deadline = time.monotonic() + 10
    while client.instance_ids():
        assert time.monotonic() < deadline, "instance still in discovery after SIGTERM"
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(native_worker.proc.wait, 60) == 0, native_worker.log()


def start_mocker(tmp: Path, *args: str) -> WorkerProcess:
    kv_root = tmp / "kv"
    kv_root.mkdir(exist_ok=True)
    log_path = tmp / f"mocker-{time.monotonic_ns()}.log"
    env = dict(os.environ)
    env.update({"DYN_FILE_KV": str(kv_root), "HF_HUB_OFFLINE": "1", "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "10"})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "armature.mocker", "--discovery-backend", "file", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    return WorkerProcess(proc, kv_root, log_path)


async def test_mocker_engine_under_the_sglang_worker(tmp_path: Path, tiny_llama_path: Path, make_client) -> None:
    worker = start_worker(tmp_path, "--engine", "mocker", "--model-path", str(tiny_llama_path),
                          "--served-model-name", "tiny", "--page-size", "16")
    try:
        rt, client = await make_client(worker)
        card = await _card(rt)
        assert card.kv_cache_block_size == 16
        outs = await _collect(client, _request(list(range(1, 40)), 12))
        assert sum(len(o.token_ids) for o in outs) == 12
        assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].usage.prompt_tokens == 39
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.log()


async def test_mocker_cli_runs_several_instances(tmp_path: Path, tiny_llama_path: Path, make_client) -> None:
    worker = start_mocker(tmp_path, "--model-path", str(tiny_llama_path), "--model-name", "mock",
                          "--num-workers", "2", "--speedup-ratio", "0", "--block-size", "16")
    try:
        rt, client = await make_client(worker)
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(client.instance_ids()) < 2:
            assert time.monotonic() < deadline, worker.log()
            await asyncio.sleep(0.1)
        cards = await rt.discovery.get_prefix("v1/mdc/dynamo/backend/generate/")
        assert len(cards) == 2
        for instance_id in client.instance_ids():
            stream = await client.direct(_request(list(range(5, 25)), 6), instance_id)
            outs = [o async for o in stream]
            assert sum(len(o.token_ids) for o in outs) == 6 and outs[-1].finish_reason is FinishReason.LENGTH
        worker.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.wait, 60) == 0, worker.log()
        assert not await rt.discovery.get_prefix("v1/instances/dynamo/backend/generate/")
    finally:
        worker.stop()


async def test_worker_publishes_kv_events_and_load(native_worker: WorkerProcess, make_client) -> None:
    from armature.protocols.hashing import compute_local_block_hashes
    from armature.protocols.kv_events import KvStored, RouterEvent
    from armature.protocols.load import ActiveLoad
    from armature.runtime.event_plane.base import EventScope
    from armature.runtime.event_plane.factory import create_event_plane

    rt, client = await make_client(native_worker)
    (worker_id,) = client.instance_ids()
    plane = create_event_plane("zmq", discovery=rt.discovery)
    scope = EventScope("dynamo", "backend")
    kv_sub = plane.subscriber(scope, "kv-events")
    load_sub = plane.subscriber(scope, "load_metrics")
    await kv_sub.start()
    await load_sub.start()
    try:
        # A load heartbeat proves the subscription is connected before the request is sent.
        load_iter = aiter(load_sub)
        first_load = msgspec.msgpack.decode((await asyncio.wait_for(anext(load_iter), 30)).payload, type=ActiveLoad)
        assert first_load.worker_id == worker_id and first_load.kv_total_blocks == 8192 // 16
        prompt = list(range(200, 248))  # three full pages of 16
        await _collect(client, _request(prompt, 2))
        expected = compute_local_block_hashes(prompt, 16)
        seen: list[int] = []
        ids: list[int] = []
        kv_iter = aiter(kv_sub)
        while not set(expected) <= set(seen):
            env = await asyncio.wait_for(anext(kv_iter), 30)
            event = msgspec.msgpack.decode(env.payload, type=RouterEvent)
            assert event.worker_id == worker_id
            ids.append(event.event.event_id)
            if isinstance(event.event.data, KvStored):
                seen.extend(b.tokens_hash for b in event.event.data.blocks)
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # consecutive per worker

        # A router that missed those events recovers them from the worker's local indexer.
        from armature.router.kv.messages import EventRangeQuery, EventRangeReply, WorkerSnapshot

        query = await rt.endpoint("dynamo.backend.kv_indexer_query").client(response_type=EventRangeReply)
        await query.wait_for_instances(timeout_s=30)
        stream = await query.direct(EventRangeQuery(worker_id=worker_id, first=ids[0], last=ids[-1]), worker_id)
        (reply,) = [r async for r in stream]
        assert reply.complete and [e.event.event_id for e in reply.events] == ids
        snap_client = await rt.endpoint("dynamo.backend.kv_indexer_snapshot").client(response_type=WorkerSnapshot)
        await snap_client.wait_for_instances(timeout_s=30)
        (snap,) = [s async for s in await snap_client.direct(None, worker_id)]
        stored = {b.tokens_hash for e in snap.events if isinstance(e.event.data, KvStored) for b in e.event.data.blocks}
        assert set(expected) <= stored and snap.last_event_id is not None and snap.last_event_id >= ids[-1]
    finally:
        await plane.close()


def test_failed_registration_exits_non_zero(tmp_path: Path, tiny_llama_path: Path) -> None:
    import json
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_llama_path, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    worker = start_worker(tmp_path, "--engine", "native", "--model-path", str(model), "--page-size", "16",
                          "--max-total-tokens", "1024")
    try:
        assert worker.proc.wait(START_TIMEOUT_S) == 1
    finally:
        worker.stop()
    assert "no chat template" in worker.log()
    # Nothing of the worker stays in discovery.
    assert not [p for p in worker.kv_root.rglob("*") if "instances" in p.name or "mdc" in p.name]


async def test_cluster_mode_etcd_and_nats(tmp_path: Path, tiny_llama_path: Path, etcd_server, nats_server) -> None:
    from armature.protocols.load import ActiveLoad
    from armature.runtime.discovery.etcd import EtcdStore
    from armature.runtime.event_plane.base import EventScope
    from armature.runtime.event_plane.factory import create_event_plane

    worker = start_worker(
        tmp_path, "--engine", "mocker", "--model-path", str(tiny_llama_path), "--served-model-name", "tiny",
        "--page-size", "16", "--request-plane", "nats", "--event-plane", "nats", discovery="etcd",
        extra_env={"ETCD_ENDPOINTS": etcd_server.url, "NATS_SERVER": nats_server.url},
    )
    rt = DistributedRuntime(EtcdStore([etcd_server.url]), "nats", "nats", nats_url=nats_server.url)
    await rt.start()
    plane = create_event_plane("nats", nats_server=nats_server.url)
    try:
        loads = plane.subscriber(EventScope("dynamo", "backend"), "load_metrics")
        await loads.start()
        client = await rt.endpoint(ENDPOINT).client(response_type=LLMEngineOutput)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.instance_ids():
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.log()
            await asyncio.sleep(0.1)
        outs = await _collect(client, _request(list(range(7, 27)), 5))
        assert sum(len(o.token_ids) for o in outs) == 5 and outs[-1].finish_reason is FinishReason.LENGTH
        env = await asyncio.wait_for(anext(aiter(loads)), 30)
        assert msgspec.msgpack.decode(env.payload, type=ActiveLoad).worker_id == client.instance_ids()[0]
        worker.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.proc.wait, 60) == 0, worker.log()
        assert not await rt.discovery.get_prefix("v1/instances/dynamo/backend/")
    finally:
        worker.stop()
        await plane.close()
        await rt.shutdown(grace_period_s=0.0)


async def test_idle_worker_answers_health_canaries(tmp_path: Path, tiny_llama_path: Path, make_client) -> None:
    worker = start_worker(
        tmp_path, "--engine", "mocker", "--model-path", str(tiny_llama_path), "--page-size", "16",
        extra_env={"DYN_HEALTH_CHECK_ENABLED": "1", "DYN_CANARY_WAIT_TIME": "0.3"},
    )
    try:
        await make_client(worker)
        url = worker.status_url()
        assert url is not None, worker.log()

        def canaries_answered() -> float:
            body = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
            for line in body.splitlines():
                if line.startswith("armature_component_requests_total{") and 'endpoint="generate"' in line:
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        deadline = time.monotonic() + 30
        # No client traffic at all: every request the endpoint counted is the runtime's canary,
        # built from the worker's health payload (BOS, max_tokens 1), and it succeeded.
        while await asyncio.to_thread(canaries_answered) < 2:
            assert time.monotonic() < deadline, worker.log()
            await asyncio.sleep(0.2)
        health = await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/health", timeout=5).read())
        assert msgspec.json.decode(health)["status"] == "ready"
        assert "health check" not in worker.log()
    finally:
        worker.stop()
