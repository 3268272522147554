"""A disaggregated deployment as real processes: frontend, prefill worker(s), decode worker(s).

File discovery in the test's temp folder, loopback only, native engine on a tiny model.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import httpx

from integration.frontend.procs import Proc, http_get, metric_value, process_env, spawn

MODEL = "tiny-disagg"
LOAD_GAUGES = ("armature_worker_num_running_requests", "armature_worker_num_waiting_requests",
               "armature_worker_kv_active_blocks")  # fmt: skip


def start_native_worker(tmp: Path, kv_root: Path, model_path: Path, mode: str, *flags: str) -> Proc:
    log = tmp / f"{mode}-{time.monotonic_ns()}.log"
    args = ["-m", "armature.sglang", "--engine", "native", "--model-path", str(model_path),
            "--served-model-name", MODEL, "--page-size", "16", "--discovery-backend", "file",
            "--system-port", "0", "--max-total-tokens", "65536", "--context-length", "4096",
            "--disaggregation-mode", mode, *flags]  # fmt: skip
    return spawn(args, log, process_env(kv_root, DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="5"))


def worker_load(worker: Proc) -> tuple[float, ...]:
    status, body = http_get(worker.status_url() + "/metrics")
    assert status == 200
    text = body.decode()
    return tuple(metric_value(text, g) for g in LOAD_GAUGES)


def worker_metric(worker: Proc, name: str, label: str = "") -> float:
    status, body = http_get(worker.status_url() + "/metrics")
    assert status == 200
    return metric_value(body.decode(), name, label)


async def wait_metric(worker: Proc, name: str, want: Callable[[float], bool], timeout_s: float = 15.0) -> float:
    """Until ``want(metric)`` holds: gauges move on the worker's publish tick, not with the request."""
    deadline = time.monotonic() + timeout_s
    value = worker_metric(worker, name)
    while not want(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is still {value} after {timeout_s} s")
        await asyncio.sleep(0.1)
        value = worker_metric(worker, name)
    return value


async def wait_idle(workers: list[Proc], timeout_s: float = 60.0) -> None:
    """Until every worker reports nothing running, nothing waiting and no locked KV pages."""
    deadline = time.monotonic() + timeout_s
    loads: list[tuple[float, ...]] = []
    while time.monotonic() < deadline:
        loads = [worker_load(w) for w in workers]
        if all(load == (0.0, 0.0, 0.0) for load in loads):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"workers did not return to baseline (running, waiting, locked pages): {loads}")


async def complete(http: httpx.AsyncClient, ids: list[int], max_tokens: int) -> dict[str, Any]:
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": max_tokens,
                                                 "temperature": 0})  # fmt: skip
    body = r.json()
    if r.status_code != 200:
        raise AssertionError(f"HTTP {r.status_code}: {json.dumps(body)[:500]}")
    return body


async def completions(
    http: httpx.AsyncClient, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> list[str]:
    sem = asyncio.Semaphore(concurrency)

    async def one(ids: list[int]) -> str:
        async with sem:
            body = await complete(http, ids, max_tokens)
            choice = body["choices"][0]
            assert body["usage"]["completion_tokens"] == max_tokens or choice["finish_reason"] == "stop"
            return str(body["choices"][0]["text"])

    return list(await asyncio.gather(*(one(p) for p in prompts)))
