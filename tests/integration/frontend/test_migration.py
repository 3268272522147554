"""Migration across real processes: the worker serving a stream is SIGKILLed mid-stream.

With ``--migration-limit 1`` the frontend re-sends the sequence (prompt + tokens so far) to the
other worker and the client's one stream completes with every token it asked for. With limit 0
the client gets a clear in-band error, promptly, not a hang. Workers run the simulated engine at
its real pace (speedup 1: ~6 ms per token), so a 300-token stream is still running when killed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from integration.frontend.procs import (
    START_TIMEOUT_S,
    Proc,
    http_get,
    metric_value,
    start_frontend,
    start_mocker_worker,
    wait_until,
)

pytestmark = pytest.mark.integration

MODEL = "tiny-mock"
MAX_TOKENS = 300
INFLIGHT = "armature_component_inflight_requests"


def served_instances(frontend: Proc) -> int:
    status, body = http_get(f"http://127.0.0.1:{frontend.port}/health")
    return len(json.loads(body).get("instances", [])) if status in (200, 503) else 0


def start_cluster(tmp: Path, model_path: Path, migration_limit: int) -> tuple[Proc, list[Proc]]:
    kv = tmp / "kv"
    kv.mkdir()
    frontend = start_frontend(tmp, kv, "--migration-limit", str(migration_limit))
    workers = [start_mocker_worker(tmp, kv, model_path, MODEL) for _ in range(2)]
    for w in workers:
        w.status_url()
    wait_until(lambda: served_instances(frontend) == 2, START_TIMEOUT_S, "both workers behind the frontend", [frontend, *workers])
    return frontend, workers


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.alive():
            p.kill()


def stream_and_kill_server(frontend: Proc, workers: list[Proc]) -> tuple[int, int | None, str | None, Proc]:
    """Stream one chat; after a few chunks SIGKILL the worker running it. Returns what the client saw."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="unused", timeout=30, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a long story"}],
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = 0
    killed: Proc | None = None
    usage_tokens: int | None = None
    finish: str | None = None
    for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            chunks += 1
            finish = choice.finish_reason or finish
        if killed is None and chunks == 10:
            busy = [w for w in workers if metric_value(http_get(w.status_url() + "/metrics")[1].decode(), INFLIGHT, 'endpoint="generate"') > 0]
            assert len(busy) == 1, "exactly one worker should be running the stream"
            killed = busy[0]
            killed.kill()
    assert killed is not None, f"the stream ended after {chunks} chunks, before the kill"
    return chunks, usage_tokens, finish, killed


def test_stream_migrates_to_the_other_worker(tmp_path: Path, tiny_llama_path: Path, procs: list[Proc]) -> None:
    frontend, workers = start_cluster(tmp_path, tiny_llama_path, migration_limit=1)
    procs.extend([frontend, *workers])
    _, usage_tokens, finish, killed = stream_and_kill_server(frontend, workers)
    assert usage_tokens == MAX_TOKENS
    assert finish == "length"
    survivor = next(w for w in workers if w is not killed)
    assert survivor.alive()
    metrics = http_get(f"http://127.0.0.1:{frontend.port}/metrics")[1].decode()
    assert metric_value(metrics, "armature_frontend_model_migration_total") == 1.0


def test_without_migration_the_client_gets_an_error(tmp_path: Path, tiny_llama_path: Path, procs: list[Proc]) -> None:
    frontend, workers = start_cluster(tmp_path, tiny_llama_path, migration_limit=0)
    procs.extend([frontend, *workers])
    with pytest.raises(openai.APIError) as err:
        stream_and_kill_server(frontend, workers)
    assert "worker" in str(err.value.message).lower()
    # The frontend is still serving, through the worker that is left.
    wait_until(lambda: served_instances(frontend) == 1, 30, "the frontend to drop the killed worker", [frontend])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="unused", timeout=30, max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.usage is not None and r.usage.completion_tokens == 4
