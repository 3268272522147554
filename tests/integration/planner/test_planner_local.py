"""``python -m armature.planner --environment local`` end to end (file discovery, real processes):
it brings up the first mocker worker itself (``--min-endpoint 1``), adds one under load when the
ITL target cannot be met (capped by ``--max-gpu-budget 2``), and stops the workers it started
when it is stopped itself."""

from __future__ import annotations

import json
import shlex
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from integration.frontend.procs import Proc, http_get, process_env, spawn, start_frontend, wait_until

MODEL = "tiny-planned"


def instances(frontend: Proc) -> int:
    status, body = http_get(f"http://127.0.0.1:{frontend.port}/health")
    return len(json.loads(body).get("instances", [])) if status in (200, 503) else 0


def keep_busy(frontend: Proc, stop: threading.Event) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 120,
        "stream": True,
    }
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            try:
                with http.stream(
                    "POST", f"http://127.0.0.1:{frontend.port}/v1/chat/completions", json=body
                ) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError:
                pass


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        if p.alive():
            p.kill()


def test_planner_brings_up_scales_out_and_cleans_up(
    tmp_path: Path, tiny_llama_path: Path, started: list[Proc]
) -> None:
    kv = tmp_path / "kv"
    kv.mkdir()
    frontend = start_frontend(tmp_path, kv)
    started.append(frontend)
    worker = [sys.executable, "-m", "armature.mocker", "--model-path", str(tiny_llama_path), "--model-name", MODEL,
              "--discovery-backend", "file", "--system-port", "0"]  # fmt: skip
    planner = spawn(
        ["-m", "armature.planner", "--discovery-backend", "file", "--environment", "local", "--mode", "agg",
         "--worker-command", shlex.join(worker), "--metrics-url", f"http://127.0.0.1:{frontend.port}/metrics",
         # Targets no worker can meet: every interval with load asks for one more.
         "--ttft", "0.001", "--itl", "0.001", "--load-adjustment-interval", "1", "--load-metric-samples", "4",
         "--load-min-observations", "3", "--min-endpoint", "1", "--max-gpu-budget", "2",
         "--log-dir", str(tmp_path / "workers")],
        tmp_path / "planner.log",
        process_env(kv, DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="2"),
    )  # fmt: skip
    started.append(planner)
    wait_until(lambda: instances(frontend) == 1, 60, "the planner's first worker", [frontend, planner])

    stop = threading.Event()
    load = [threading.Thread(target=keep_busy, args=(frontend, stop), daemon=True) for _ in range(6)]
    for t in load:
        t.start()
    try:
        wait_until(lambda: instances(frontend) == 2, 90, "a second worker under load", [frontend, planner])
    finally:
        stop.set()
        for t in load:
            t.join(30)
    log = planner.log()
    assert "1 -> 2 workers" in log and "every worker above" in log
    assert "2 -> 3" not in log  # the GPU budget holds two

    planner.proc.terminate()
    assert planner.proc.wait(60) == 0
    wait_until(lambda: instances(frontend) == 0, 60, "the planner's workers gone", [frontend])


def test_a_worker_that_dies_is_reported_and_replaced(tmp_path: Path, started: list[Proc]) -> None:
    kv = tmp_path / "kv"
    kv.mkdir()
    planner = spawn(
        ["-m", "armature.planner", "--discovery-backend", "file", "--environment", "local",
         "--worker-command", f"{sys.executable} -c 'raise SystemExit(3)'", "--load-adjustment-interval", "0.5",
         "--load-metric-samples", "1", "--log-dir", str(tmp_path / "workers")],
        tmp_path / "planner.log",
        process_env(kv),
    )  # fmt: skip
    started.append(planner)
    wait_until(
        lambda: planner.log().count("exited with code 3") >= 2, 30, "two failed starts reported", [planner]
    )
    assert planner.alive()
    planner.proc.terminate()
    assert planner.proc.wait(30) == 0
