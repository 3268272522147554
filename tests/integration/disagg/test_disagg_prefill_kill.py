"""Bar 3: SIGKILL the prefill worker with 16 requests in flight.

Every client request ends — completed, or with a clear error naming the failed KV transfer —
none hangs, and the decode worker's running requests and locked pages return to zero. Through a
frontend with ``--decode-fallback --migration-limit 1`` the same failure is invisible: the
requests migrate and finish aggregated on the decode worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from cluster import MODEL, start_native_worker, wait_idle, worker_metric
from disagg_pair import prompts

from integration.frontend.procs import START_TIMEOUT_S, Proc, start_frontend, wait_until

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
PROMPTS = prompts(16, seed=3, lo=1500, hi=3000)


def _through_prefill(frontend: Proc, prefill: Proc) -> bool:
    r = httpx.post(f"http://127.0.0.1:{frontend.port}/v1/completions",
                   json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}, timeout=30)
    return r.status_code == 200 and worker_metric(prefill, "armature_disagg_rooms_served_total") > 0


async def _request(http: httpx.AsyncClient, ids: list[int]) -> tuple[int, dict]:
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "ignore_eos": True})  # fmt: skip
    return r.status_code, r.json()


async def test_sigkill_prefill_mid_flight(tmp_path: Path, tiny_llama_path: Path) -> None:
    kv = tmp_path / "kv"
    kv.mkdir()
    strict = start_frontend(tmp_path, kv)
    lenient = start_frontend(tmp_path, kv, "--decode-fallback", "--migration-limit", "1")
    decode = start_native_worker(tmp_path, kv, tiny_llama_path, "decode")
    prefill = start_native_worker(tmp_path, kv, tiny_llama_path, "prefill")
    procs = [strict, lenient, decode, prefill]
    try:
        decode.status_url()
        prefill.status_url()
        for fe in (strict, lenient):
            wait_until(
                lambda fe=fe: _through_prefill(fe, prefill), START_TIMEOUT_S, "disaggregated serving", procs
            )
        async with (httpx.AsyncClient(base_url=f"http://127.0.0.1:{strict.port}", timeout=120) as a,
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{lenient.port}", timeout=120) as b):
            served = worker_metric(prefill, "armature_disagg_rooms_served_total")
            tasks = [
                asyncio.ensure_future(_request(a if i % 2 == 0 else b, ids)) for i, ids in enumerate(PROMPTS)
            ]
            # Kill once the prefill worker is busy with them (none of them delivered yet).
            for _ in range(200):
                if worker_metric(decode, "armature_disagg_transfers_in_flight") >= 8:
                    break
                await asyncio.sleep(0.02)
            assert worker_metric(prefill, "armature_disagg_rooms_served_total") < served + len(PROMPTS)
            prefill.kill()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
        failures = []
        for i, (status, body) in enumerate(results):
            if status == 200:
                assert body["usage"]["completion_tokens"] == MAX_TOKENS, body
                continue
            assert i % 2 == 0, f"the --decode-fallback frontend should have completed request {i}: {body}"
            message = body["error"]["message"]
            assert "KV transfer failed" in message and "prefill" in message, message
            failures.append(message)
        # The kill really hit requests in flight (the strict frontend shows them as errors).
        assert failures, "no request was in flight when the prefill worker died"
        await wait_idle([decode])
        assert worker_metric(decode, "armature_disagg_transfers_in_flight") == 0
    finally:
        for p in procs:
            if p.alive():
                p.kill()
