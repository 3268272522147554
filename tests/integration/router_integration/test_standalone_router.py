"""``python -m armature.router`` as a process: generate is routed by KV overlap and streamed back;
best_worker_id names the worker that holds a prompt's blocks."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from armature.protocols.llm import LLMEngineOutput, PreprocessedRequest, StopConditions
from armature.router.main import BestWorkerReply, BestWorkerRequest
from armature.runtime.request_plane.base import RequestPlaneError
from integration.frontend.procs import process_env, spawn
from integration.router_integration.routing_cluster import BLOCK, file_runtime, start_mocker, stop_all, until

pytestmark = pytest.mark.integration


async def test_standalone_router_routes_generate_and_answers_best_worker(tmp_path: Path, smollm2_path: Path) -> None:
    kv_root = tmp_path / "kv"
    workers = start_mocker(tmp_path, kv_root, smollm2_path, "--num-workers", "2", "--speedup-ratio", "10")
    router = spawn(["-m", "armature.router", "--endpoint", "dynamo.backend.generate", "--router-block-size", str(BLOCK),
                    "--discovery-backend", "file"], tmp_path / "router.log", process_env(kv_root))  # fmt: skip
    rt = file_runtime(kv_root)
    await rt.start()
    try:
        gen = await rt.endpoint("dynamo.router.generate").client(LLMEngineOutput)
        best = await rt.endpoint("dynamo.router.best_worker_id").client(BestWorkerReply)
        backend = await rt.endpoint("dynamo.backend.generate").client(LLMEngineOutput)
        await until(lambda: len(backend.instance_ids()) == 2 and gen.instance_ids() and best.instance_ids(), 120,
                    "two workers and the router")  # fmt: skip
        rng = random.Random(1)
        tokens = [rng.randrange(1000, 20000) for _ in range(6 * BLOCK)]

        async def ask() -> BestWorkerReply:
            async with await best.round_robin(BestWorkerRequest(token_ids=tokens)) as s:
                return [r async for r in s][0]  # type: ignore[no-any-return]

        # The router answers "no workers" until it has seen the workers' model cards.
        for _ in range(600):
            try:
                await ask()
                break
            except RequestPlaneError:
                await asyncio.sleep(0.1)
        req = PreprocessedRequest(model="mock", token_ids=tokens, stop_conditions=StopConditions(max_tokens=3))
        async with await gen.round_robin(req) as stream:
            outs = [o async for o in stream]
        assert sum(len(o.token_ids) for o in outs) == 3 and outs[-1].finish_reason is not None

        # Once the worker's KV events reach the router, the prompt is fully cached on one worker.
        reply = await ask()
        for _ in range(200):
            if reply.overlap_blocks == 6:
                break
            reply = await ask()
        assert reply.overlap_blocks == reply.request_blocks == 6
        assert reply.worker_id in backend.instance_ids()
        assert router.alive()
    finally:
        await rt.shutdown(grace_period_s=0.0)
        stop_all([router, workers])
