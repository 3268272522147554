"""A real worker (native engine on a tiny random Llama, in this process) behind a real frontend.

Both sides use real code end to end: the worker is ``armature.sglang``'s ``start_worker`` on its own
``DistributedRuntime``; the frontend has its own runtime and serves HTTP with its ``HttpServer`` on a free
loopback port. They meet through an in-memory discovery state private to the test and talk over
the TCP request plane.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armature.frontend.http_server import HttpServer
from armature.frontend.main import runtime_client_factory
from armature.frontend.models import DiscoveryModelSource
from armature.frontend.server import Frontend, FrontendConfig
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime

MODEL = "tiny"
CONTEXT = 512


@dataclass
class ServedStack:
    base_url: str
    frontend: Frontend
    engine: Any
    worker: Any
    worker_runtime: DistributedRuntime
    frontend_runtime: DistributedRuntime
    state: MemoryState
    http: HttpServer | None = None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


async def start_http(frontend: Frontend) -> tuple[HttpServer, asyncio.Task[None], str]:
    server = HttpServer(frontend, host="127.0.0.1", port=0)
    await server.start()
    task = asyncio.ensure_future(server.serve(install_signal_handlers=False))  # the test owns signals
    return server, task, f"http://127.0.0.1:{server.bound_port}"


async def start_worker_in_process(state: MemoryState, model_path: Path, *extra: str) -> tuple[DistributedRuntime, Any, Any]:
    from armature.sglang.args import parse_args as worker_args
    from armature.sglang.engines import create_engine
    from armature.sglang.main import start_worker

    config = worker_args(
        [
            "--engine", "native", "--model-path", str(model_path), "--served-model-name", MODEL,
            "--page-size", "16", "--max-total-tokens", "8192", "--context-length", str(CONTEXT),
            "--discovery-backend", "mem", *extra,
        ]
    )  # fmt: skip
    rt = DistributedRuntime(MemoryStore(state))
    await rt.start()
    engine = await create_engine(config)
    worker = await start_worker(rt, config, engine)
    return rt, engine, worker


@contextlib.asynccontextmanager
async def served_stack(
    model_path: Path, config: FrontendConfig | None = None, worker_flags: tuple[str, ...] = ()
) -> AsyncIterator[ServedStack]:
    state = MemoryState()
    wrt, engine, worker = await start_worker_in_process(state, model_path, *worker_flags)
    frt = DistributedRuntime(MemoryStore(state))
    await frt.start()
    frontend = Frontend(DiscoveryModelSource(frt.discovery), runtime_client_factory(frt), config)
    await frontend.start()
    server, task, url = await start_http(frontend)
    try:
        await frontend.wait_for_model(MODEL, timeout_s=30)
        yield ServedStack(url, frontend, engine, worker, wrt, frt, state, server)
    finally:
        server.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await frontend.stop()
        await worker.stop()
        await wrt.shutdown(grace_period_s=0.0)
        await frt.shutdown(grace_period_s=0.0)
        with contextlib.suppress(Exception):
            await engine.shutdown()
