"""Helpers for the KV-routing integration tests: mocker worker processes on file discovery and
KV-mode frontends (or bare router bindings) in the test's own process, so the test can read
their routers' state directly."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path


from armature.frontend.args import parse_args as frontend_args
from armature.frontend.main import build_frontend
from armature.frontend.server import Frontend
from armature.router.kv.service import KvRouter
from armature.router.kv_push import KvPushRouter
from armature.runtime.discovery.file import FileStore
from armature.runtime.runtime import DistributedRuntime
from integration.frontend.procs import Proc, process_env, spawn
from integration.frontend.stack import start_http

MODEL = "mock"
BLOCK = 16
HERE = Path(__file__).resolve().parent


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def mocker_flags(model_path: Path, *extra: str) -> list[str]:
    return ["--model-path", str(model_path), "--model-name", MODEL, "--block-size", str(BLOCK),
            "--discovery-backend", "file", "--log-level", "info", *extra]  # fmt: skip


def start_mocker(tmp: Path, kv_root: Path, model_path: Path, *extra: str) -> Proc:
    """``python -m armature.mocker`` (one process; ``--num-workers`` in ``extra`` for more)."""
    return spawn(["-m", "armature.mocker", *mocker_flags(model_path, *extra)],
                 tmp / f"mocker-{time.monotonic_ns()}.log", process_env(kv_root))  # fmt: skip


def start_short_lease_mocker(tmp: Path, kv_root: Path, model_path: Path, ttl_s: float, *extra: str) -> Proc:
    script = str(HERE / "short_lease_worker.py")
    args = [script, "--lease-ttl", str(ttl_s), "--", *mocker_flags(model_path, *extra)]
    env = process_env(kv_root, PYTHONPATH=str(Path(sys.modules["armature"].__file__).resolve().parents[1]))
    return spawn(args, tmp / f"short-lease-mocker-{time.monotonic_ns()}.log", env)


def file_runtime(kv_root: Path) -> DistributedRuntime:
    return DistributedRuntime(FileStore(kv_root, poll_interval_s=0.1), tcp_host="127.0.0.1")


@dataclass
class InProcessFrontend:
    frontend: Frontend
    runtime: DistributedRuntime
    url: str

    def kv(self) -> KvRouter:
        model = self.frontend.models.get(MODEL)
        assert model is not None, "the frontend does not serve the model yet"
        # The KV router sits behind the model's own layer (ModelRouter.inner).
        router = model.gate.inner if model.gate is not None else model.router
        assert isinstance(router, KvPushRouter)
        return router.kv


@contextlib.asynccontextmanager
async def kv_frontend(kv_root: Path, *flags: str) -> AsyncIterator[InProcessFrontend]:
    """A real frontend (``--router-mode kv``) on its own runtime, serving HTTP on loopback."""
    args = frontend_args(["--router-mode", "kv", "--discovery-backend", "file", *flags], env={})
    runtime = file_runtime(kv_root)
    await runtime.start()
    frontend = build_frontend(runtime, args)
    await frontend.start()
    server, task, url = await start_http(frontend)
    try:
        yield InProcessFrontend(frontend, runtime, url)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await frontend.stop()
        await runtime.shutdown(grace_period_s=0.0)


def stop_all(procs: list[Proc]) -> None:
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate(15)

