"""One ``python -m armature.frontend`` + two ``python -m armature.sglang`` workers, file discovery.

What a user of the multi-process example sees: requests spread over both workers (read from each
worker's status server ``/metrics``); a SIGTERMed worker exits 0 and the model stays listed while
the other worker serves it; the model leaves ``/v1/models`` only when the last worker leaves.
The workers run the simulated engine (``--engine mocker``) with the tiny model's tokenizer.
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
REQUESTS = "armature_component_requests_total"


def listed_models(frontend: Proc) -> list[str]:
    status, body = http_get(f"http://127.0.0.1:{frontend.port}/v1/models")
    assert status == 200, body
    return [m["id"] for m in json.loads(body)["data"]]


def served_instances(frontend: Proc) -> int:
    status, body = http_get(f"http://127.0.0.1:{frontend.port}/health")
    return len(json.loads(body).get("instances", [])) if status in (200, 503) else 0


@pytest.fixture
def cluster(tmp_path: Path, tiny_llama_path: Path) -> Iterator[tuple[Proc, list[Proc]]]:
    kv = tmp_path / "kv"
    kv.mkdir()
    frontend = start_frontend(tmp_path, kv)
    workers = [start_mocker_worker(tmp_path, kv, tiny_llama_path, MODEL) for _ in range(2)]
    procs = [frontend, *workers]
    try:
        for w in workers:
            w.status_url()
        wait_until(lambda: served_instances(frontend) == 2, START_TIMEOUT_S, "both workers behind the frontend", procs)
        yield frontend, workers
    finally:
        for p in procs:
            if p.alive():
                p.kill()


def chat(client: openai.OpenAI, max_tokens: int = 8) -> str:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=max_tokens
    )
    assert r.usage is not None and r.usage.completion_tokens == max_tokens
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].message.content or ""


def worker_requests(worker: Proc) -> float:
    status, body = http_get(worker.status_url() + "/metrics")
    assert status == 200
    return metric_value(body.decode(), REQUESTS, 'endpoint="generate"')


def test_requests_spread_and_sigterm_one_worker(cluster: tuple[Proc, list[Proc]]) -> None:
    frontend, (w1, w2) = cluster
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.port}/v1", api_key="unused", timeout=30, max_retries=0)
    assert listed_models(frontend) == [MODEL]

    before = [worker_requests(w1), worker_requests(w2)]
    for _ in range(8):
        chat(client)
    served = [worker_requests(w1) - before[0], worker_requests(w2) - before[1]]
    # Round-robin over two instances: each one took its half of the 8 requests.
    assert served == [4.0, 4.0], served

    # One worker leaves: it exits cleanly, the model stays listed, the other keeps serving.
    assert w1.terminate() == 0, w1.log()[-3000:]
    wait_until(lambda: served_instances(frontend) == 1, 30, "the frontend to drop the stopped worker", [frontend, w2])
    assert listed_models(frontend) == [MODEL]
    before_w2 = worker_requests(w2)
    for _ in range(4):
        chat(client)
    assert worker_requests(w2) - before_w2 == 4.0

    # The last worker leaves: the model leaves /v1/models and requests get 503.
    assert w2.terminate() == 0, w2.log()[-3000:]
    wait_until(lambda: listed_models(frontend) == [], 30, "the model to leave /v1/models", [frontend])
    with pytest.raises(openai.APIStatusError) as err:
        chat(client)
    assert err.value.status_code == 503
    assert frontend.alive()
    assert frontend.terminate() == 0
