"""``python -m armature.frontend --http-processes 2`` in front of a mocker worker, file discovery.

What its user sees: one port served by two processes (new connections land on both), one
``/metrics`` page that counts every request whichever process answers the scrape, a SIGTERM that
stops both with exit code 0, and a frontend that stops (non-zero) when one of its processes dies
rather than serving on at half strength.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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
REQUESTS = 16  # all on one process of two: 1 run in 32,768


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def chat_on_new_connection(port: int) -> dict:  # type: ignore[type-arg]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def own_requests(metrics_socket: Path) -> float:
    """What one process alone counted: its page on the socket the others merge from."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(metrics_socket))
        page = b""
        while chunk := s.recv(65536):
            page += chunk
    return metric_value(page.decode(), "armature_frontend_requests_total", 'status="success"')


def served_requests(port: int) -> float:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return metric_value(body.decode(), "armature_frontend_requests_total", 'status="success"')


@pytest.fixture
def two_process_frontend(tmp_path: Path, tiny_llama_path: Path) -> Iterator[tuple[Proc, int]]:
    kv = tmp_path / "kv"
    kv.mkdir()
    frontend = start_frontend(tmp_path, kv, "--http-processes", "2")
    worker = start_mocker_worker(tmp_path, kv, tiny_llama_path, MODEL)
    procs = [frontend, worker]
    try:
        worker.status_url()
        assert frontend.port is not None
        # Both processes list the model: every answer, whichever process gave it, has it.
        wait_until(
            lambda: all(MODEL in http_get(f"http://127.0.0.1:{frontend.port}/v1/models")[1].decode() for _ in range(6)),
            START_TIMEOUT_S,
            "the model behind both frontend processes",
            procs,
        )
        wait_until(lambda: len(children(frontend.proc.pid)) == 1, 30, "the second frontend process", procs)
        yield frontend, children(frontend.proc.pid)[0]
    finally:
        for p in procs:
            if p.alive():
                p.kill()


def test_one_port_two_processes_one_metrics_page(two_process_frontend: tuple[Proc, int]) -> None:
    frontend, child = two_process_frontend
    assert frontend.port is not None
    for _ in range(REQUESTS):
        r = chat_on_new_connection(frontend.port)
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == 4
    # Every scrape is answered by one of the two, and each counts all the requests.
    for _ in range(6):
        assert served_requests(frontend.port) == REQUESTS
    # ... which the kernel spread over both.
    environ = dict(
        kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv
    )
    folder = Path(environ["ARMATURE_FRONTEND_PROCESS_DIR"])
    own = [own_requests(folder / f"{i}.sock") for i in (0, 1)]
    assert sum(own) == REQUESTS and min(own) > 0, own
    assert alive(child)
    assert frontend.terminate(timeout_s=30) == 0
    wait_until(lambda: not alive(child), 10, "the second process to exit after SIGTERM")


def test_a_process_that_dies_stops_the_frontend(two_process_frontend: tuple[Proc, int]) -> None:
    frontend, child = two_process_frontend
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while frontend.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not frontend.alive(), frontend.log()[-2000:]
    assert frontend.proc.returncode != 0
    assert "exited with -9: stopping the frontend" in frontend.log()


def test_the_processes_it_started_die_with_it(two_process_frontend: tuple[Proc, int]) -> None:
    frontend, child = two_process_frontend
    frontend.kill()  # SIGKILL: no chance to stop them itself
    wait_until(lambda: not alive(child), 10, "the orphaned frontend process to exit")
