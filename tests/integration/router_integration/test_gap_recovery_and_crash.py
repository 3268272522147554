"""Issue 5 bar 4, end to end with a real mocker worker process:

- events the router missed (its kv-events subscription was closed while the worker kept
  storing blocks) are recovered from the worker's local indexer over the request plane, and the
  index converges to the worker's own state;
- a SIGKILLed worker's blocks leave the index once its discovery lease expires (TTL + 2 s).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from armature.protocols.llm import LLMEngineOutput, PreprocessedRequest, StopConditions
from armature.router.kv.config import KvRouterConfig
from armature.router.kv_binding import KvRouterBinding
from armature.router.kv_push import KvPushRouter
from armature.runtime.context import Context
from integration.router_integration.routing_cluster import BLOCK, file_runtime, start_short_lease_mocker, stop_all, until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "router_kv"))
from router_kv_tools import held_paths  # noqa: E402

pytestmark = pytest.mark.integration

LEASE_TTL_S = 2.0
ENDPOINT = "dynamo.backend.generate"


async def test_missed_events_are_recovered_and_a_killed_worker_leaves_the_index(
    tmp_path: Path, smollm2_path: Path
) -> None:
    kv_root = tmp_path / "kv"
    worker = start_short_lease_mocker(tmp_path, kv_root, smollm2_path, LEASE_TTL_S, "--speedup-ratio", "10")
    runtime = file_runtime(kv_root)
    await runtime.start()
    binding = KvRouterBinding(runtime, ENDPOINT, KvRouterConfig(), BLOCK)
    client = await runtime.endpoint(ENDPOINT).client(LLMEngineOutput)
    rng = random.Random(7)
    try:
        kv = await binding.start()
        router = KvPushRouter(client, kv)
        await until(lambda: len(kv.workers()) == 1 and client.instance_ids() == list(kv.workers()), 120,
                    "the worker in the router and the client")  # fmt: skip
        (wid,) = kv.workers()

        async def generate(n_tokens: int = 5 * BLOCK) -> list[int]:
            tokens = [rng.randrange(1000, 20000) for _ in range(n_tokens)]
            req = PreprocessedRequest(model="mock", token_ids=tokens, stop_conditions=StopConditions(max_tokens=2))
            _, stream = await router.generate(req, Context())
            outs = [o async for o in stream]
            assert outs and outs[-1].finish_reason is not None
            return tokens

        # Live events reach the index (the zmq subscription joins a moment after start).
        await generate()
        await until(lambda: kv.indexer.last_event_id(wid) is not None, 15, "a first KV event")

        await binding.unsubscribe_kv_events()
        missed = [await generate() for _ in range(4)]
        before = held_paths(kv.indexer.dump_worker(wid))
        await binding.subscribe_kv_events()
        # The next event that gets through shows the gap; keep the worker storing until one does.
        gaps = kv.indexer.stats.gaps
        for _ in range(100):
            await generate()
            if kv.indexer.stats.gaps > gaps:
                break
        assert kv.indexer.stats.gaps > gaps, "no gap was seen after missing events"
        await kv.drain()

        truth = held_paths((await binding.gap_handler.fetch_snapshot(wid)).events)
        await until(lambda: held_paths(kv.indexer.dump_worker(wid)) == truth, 15, "the index to match the worker")
        assert held_paths(kv.indexer.dump_worker(wid)) - before, "the recovered blocks are new to the index"
        for tokens in missed:
            assert kv.find_matches(tokens).scores.get((wid, 0)) == len(tokens) // BLOCK

        worker.kill()
        await until(lambda: wid not in kv.workers(), LEASE_TTL_S + 2.0, "the killed worker to leave the router")
        assert not kv.indexer.dump_worker(wid)
        assert (wid, 0) not in kv.find_matches(missed[0]).scores
    finally:
        stop_all([worker])
        await client.close()
        await binding.close()
        await runtime.shutdown(grace_period_s=0.0)
