"""KV-aware prefill routing: behind ``--router-mode kv`` the frontend sends a prompt to the prefill
worker that already holds its prefix (the prefill workers publish KV events), so the prefix is
not computed again elsewhere."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest
from cluster import MODEL, complete, start_native_worker, wait_idle, wait_metric, worker_metric

from integration.frontend.procs import START_TIMEOUT_S, start_frontend, wait_until

pytestmark = pytest.mark.integration

SERVED = "armature_disagg_rooms_served_total"


async def test_prefix_sharing_requests_go_to_the_same_prefill_worker(
    tmp_path: Path, tiny_llama_path: Path
) -> None:
    kv = tmp_path / "kv"
    kv.mkdir()
    frontend = start_frontend(tmp_path, kv, "--router-mode", "kv")
    decode = start_native_worker(tmp_path, kv, tiny_llama_path, "decode")
    prefills = [start_native_worker(tmp_path, kv, tiny_llama_path, "prefill") for _ in range(2)]
    procs = [frontend, decode, *prefills]
    try:
        for p in (decode, *prefills):
            p.status_url()
        url = f"http://127.0.0.1:{frontend.port}"

        def both_prefills_used() -> bool:
            httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [9, 8, 7], "max_tokens": 1},
                       timeout=30)  # fmt: skip
            return all(worker_metric(p, SERVED) > 0 for p in prefills)

        # Short probes spread over both prefill workers (no overlap to prefer): both are routable.
        wait_until(both_prefills_used, START_TIMEOUT_S, "both prefill workers serving", procs)
        await wait_idle([decode, *prefills])
        rng = random.Random(1)
        shared = [rng.randrange(3, 49152) for _ in range(512)]
        before = [worker_metric(p, SERVED) for p in prefills]
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            await complete(http, shared + [11, 12], 4)
            await asyncio.sleep(1.0)  # the KV events of the first prefill reach the router
            for i in range(5):
                await complete(http, shared + [rng.randrange(3, 49152) for _ in range(8)], 4)
        served = [worker_metric(p, SERVED) - b for p, b in zip(prefills, before)]
        assert sorted(served) == [0, 6], f"prefills per worker: {served}"
        holder = prefills[served.index(6)]
        await wait_metric(holder, "armature_worker_cache_hit_rate", lambda v: v > 0)
    finally:
        for p in procs:
            if p.alive():
                p.kill()
