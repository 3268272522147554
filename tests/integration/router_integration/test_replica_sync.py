"""Issue 5 bar 3: two KV-mode frontends with --router-replica-sync over the same mocker workers
(real worker processes) see the same load, spread it evenly, and end with equal indexes."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import httpx
import pytest

from integration.router_integration.routing_cluster import MODEL, kv_frontend, start_mocker, stop_all, until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "router_kv"))
from router_kv_tools import held_paths  # noqa: E402

pytestmark = pytest.mark.integration

WORKERS = 2
REQUESTS = 8


def loads(fe) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return sorted((x.worker_id, x.num_running_reqs, x.active_decode_blocks) for x in fe.kv().active_loads())


async def test_two_frontends_share_load_and_converge_to_equal_indexes(tmp_path: Path, smollm2_path: Path) -> None:
    kv_root = tmp_path / "kv"
    # Slow simulated steps keep every request in flight while the others are routed.
    workers = start_mocker(tmp_path, kv_root, smollm2_path, "--num-workers", str(WORKERS), "--speedup-ratio", "0.2")
    try:
        async with kv_frontend(kv_root, "--router-replica-sync") as a, kv_frontend(kv_root, "--router-replica-sync") as b:
            for fe in (a, b):
                await fe.frontend.wait_for_model(MODEL, timeout_s=120)
                await until(lambda fe=fe: len(fe.kv().workers()) == WORKERS, 30, "both workers in the router")
            rng = random.Random(3)
            # Token-id prompts of one length: every request weighs the same on a worker.
            prompts = [[rng.randrange(1000, 20000) for _ in range(120)] for _ in range(REQUESTS)]
            async with httpx.AsyncClient(timeout=120) as http:

                async def send(url: str, prompt: list[int]) -> dict:  # type: ignore[type-arg]
                    r = await http.post(f"{url}/v1/completions", json={
                        "model": MODEL, "prompt": prompt, "max_tokens": 40, "ignore_eos": True})  # fmt: skip
                    assert r.status_code == 200, r.text
                    return r.json()  # type: ignore[no-any-return]

                tasks = []
                for i, prompt in enumerate(prompts):
                    fe = (a, b)[i % 2]
                    tasks.append(asyncio.create_task(send(fe.url, prompt)))
                    # Route the next request only once both replicas know about this one.
                    await until(lambda n=i + 1: sum(x[1] for x in loads(a)) == sum(x[1] for x in loads(b)) == n,
                                10, f"both routers to count {i + 1} active requests")  # fmt: skip
                seen_a, seen_b = loads(a), loads(b)
                assert seen_a == seen_b
                # Equal-sized requests with nothing in common: replica sync makes the two routers
                # fill the workers evenly, as one router would.
                assert [n for _, n, _ in seen_a] == [REQUESTS // WORKERS] * WORKERS
                done = await asyncio.gather(*tasks)
            assert all(d["usage"]["completion_tokens"] == 40 for d in done)
            await until(lambda: not any(x[1] for x in loads(a) + loads(b)), 10, "every request freed")

            def indexes_equal() -> bool:
                pa, pb = held_paths(a.kv().dump_events()), held_paths(b.kv().dump_events())
                return bool(pa) and pa == pb

            await until(indexes_equal, 15, "equal indexes on both frontends")
            paths = held_paths(a.kv().dump_events())
            assert {w for w, _, _ in paths} == set(a.kv().workers())
    finally:
        stop_all([workers])
