"""Load shedding end to end: ``python -m armature.frontend --active-decode-blocks-threshold`` in
front of a slow mocker worker (file discovery, real processes). While the worker's one long
stream holds KV blocks it is busy and new requests get 503 at once; ``POST /busy_threshold``
changes that at runtime; once the stream ends, requests are served again."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from integration.frontend.procs import START_TIMEOUT_S, Proc, process_env, spawn, start_frontend, wait_until

MODEL = "tiny-busy"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def cluster(tmp_path: Path, tiny_llama_path: Path) -> Iterator[tuple[Proc, Proc]]:
    kv = tmp_path / "kv"
    kv.mkdir()
    # Any active decode block makes the worker busy.
    frontend = start_frontend(tmp_path, kv, "--active-decode-blocks-threshold", "0.000001")
    # python -m armature.mocker, slowed down: one stream holds the worker for a while.
    args = ["-m", "armature.mocker", "--model-path", str(tiny_llama_path), "--model-name", MODEL,
            "--discovery-backend", "file", "--system-port", "0", "--speedup-ratio", "0.2"]  # fmt: skip
    worker = spawn(args, tmp_path / "mocker.log", process_env(kv))
    try:
        worker.status_url()
        wait_until(
            lambda: _post(frontend, ASK).status_code == 200,
            START_TIMEOUT_S,
            "the model served",
            [frontend, worker],
        )
        yield frontend, worker
    finally:
        for p in (frontend, worker):
            if p.alive():
                p.kill()


def _post(frontend: Proc, body: dict[str, object], path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{frontend.port}{path}", json=body, timeout=30)


def _long_stream(frontend: Proc, started: threading.Event, stop: threading.Event) -> None:
    body = {**ASK, "max_tokens": 3000, "stream": True}
    with httpx.stream(
        "POST", f"http://127.0.0.1:{frontend.port}/v1/chat/completions", json=body, timeout=60
    ) as r:
        for _ in r.iter_lines():
            started.set()
            if stop.is_set():
                return  # closing the connection cancels the request on the worker


def test_all_workers_busy_answers_503_and_thresholds_change_at_runtime(cluster: tuple[Proc, Proc]) -> None:
    frontend, worker = cluster
    started, stop = threading.Event(), threading.Event()
    streamer = threading.Thread(target=_long_stream, args=(frontend, started, stop), daemon=True)
    streamer.start()
    try:
        assert started.wait(30), "the long stream never started"
        wait_until(
            lambda: _post(frontend, ASK).status_code == 503,
            15,
            "a 503 while the worker is busy",
            [frontend, worker],
        )
        err = _post(frontend, ASK).json()["error"]
        assert err["type"] == "service_unavailable" and "All workers are busy" in err["message"]

        listed = httpx.get(f"http://127.0.0.1:{frontend.port}/busy_threshold", timeout=10).json()
        assert listed == {"thresholds": [{"model": MODEL, "active_decode_blocks_threshold": 0.000001,
                                          "active_prefill_tokens_threshold": None,
                                          "active_prefill_tokens_threshold_frac": None}]}  # fmt: skip
        # Cleared at runtime: the busy worker takes requests again.
        cleared = _post(frontend, {"model": MODEL, "active_decode_blocks_threshold": None}, "/busy_threshold")
        assert cleared.status_code == 200 and cleared.json()["active_decode_blocks_threshold"] is None
        assert _post(frontend, ASK).status_code == 200
        # Set again; fields left out keep their values.
        again = _post(
            frontend, {"model": MODEL, "active_decode_blocks_threshold": 0.000001}, "/busy_threshold"
        )
        assert again.json()["active_prefill_tokens_threshold"] is None
        wait_until(lambda: _post(frontend, ASK).status_code == 503, 15, "busy again", [frontend, worker])
        metrics = httpx.get(f"http://127.0.0.1:{frontend.port}/metrics", timeout=10).text
        assert "armature_frontend_worker_active_decode_blocks{" in metrics
    finally:
        stop.set()
        streamer.join(30)
    # The stream is gone, its blocks are freed, the next load report says so.
    wait_until(
        lambda: _post(frontend, ASK).status_code == 200, 20, "served again once idle", [frontend, worker]
    )


def test_busy_threshold_refuses_bad_input(cluster: tuple[Proc, Proc]) -> None:
    frontend, _ = cluster
    unknown = _post(frontend, {"model": "nope", "active_decode_blocks_threshold": 0.5}, "/busy_threshold")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    bad = _post(frontend, {"model": MODEL, "active_decode_blocks_threshold": -1}, "/busy_threshold")
    assert bad.status_code == 400 and "active_decode_blocks_threshold" in json.dumps(bad.json())
    assert _post(frontend, ASK).status_code == 200
