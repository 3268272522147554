"""Real processes for the multi-process tests: ``python -m armature.frontend`` and workers.

Every process runs with file discovery rooted in the test's temp folder, binds loopback only,
writes its output to a log file in that folder (shown when a test fails), and is stopped by the
test (SIGTERM, then SIGKILL after a bound).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"process did not exit within {timeout_s} s of SIGTERM:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def status_url(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """The worker's status server URL, from its 'worker ready' log line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = re.search(r"worker ready:.*status=(http://\S+)", self.log())
            if m:
                return m.group(1)
            if not self.alive():
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready within {timeout_s} s:\n{self.log()[-3000:]}")


def process_env(kv_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "ARMATURE_"))}
    env.update(
        {
            "ARMATURE_FILE_KV": str(kv_root),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def spawn(args: list[str], log_path: Path, env: dict[str, str], port: int | None = None) -> Proc:
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return Proc(proc, log_path, port)


def start_frontend(tmp: Path, kv_root: Path, *flags: str) -> Proc:
    port = free_port()
    args = ["-m", "armature.frontend", "--discovery-backend", "file", "--http-host", "127.0.0.1",
            "--http-port", str(port), *flags]  # fmt: skip
    return spawn(args, tmp / f"frontend-{port}.log", process_env(kv_root), port)


def start_mocker_worker(tmp: Path, kv_root: Path, model_path: Path, name: str, *flags: str) -> Proc:
    """``python -m armature.sglang --engine mocker`` (the worker; the engine is simulated)."""
    log = tmp / f"worker-{time.monotonic_ns()}.log"
    args = ["-m", "armature.sglang", "--engine", "mocker", "--model-path", str(model_path),
            "--served-model-name", name, "--page-size", "16", "--discovery-backend", "file",
            "--system-port", "0", *flags]  # fmt: skip
    return spawn(args, log, process_env(kv_root, DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="10"))


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(predicate, timeout_s: float, what: str, procs: list[Proc] = ()) -> None:  # type: ignore[no-untyped-def,assignment]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise AssertionError(f"a process exited with {p.proc.returncode} while waiting for {what}:\n{p.log()[-3000:]}")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    logs = "\n---\n".join(p.log()[-2000:] for p in procs)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{logs}")


def metric_value(text: str, name: str, label: str = "") -> float:
    """Sum of the samples of ``name`` (those carrying ``label``, e.g. 'endpoint="generate"') in a
    Prometheus text page; 0 when there are none."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {" and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
