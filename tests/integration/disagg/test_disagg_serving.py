"""Disaggregated serving as processes: frontend + prefill worker + decode worker (native engine).

Bar 1: greedy completions through prefill + decode are identical to aggregated serving by the
same frontend and decode worker (before any prefill worker exists the model is aggregated), with
both transfer backends, at concurrency 1 and 32. Bar 2: afterwards — and after a run where half
the requests are cancelled at random moments — both workers' running requests and locked pages
are back at zero (their /metrics).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cluster import MODEL, completions, start_native_worker, wait_idle, wait_metric, worker_metric
from disagg_pair import prompts

from integration.frontend.procs import START_TIMEOUT_S, Proc, start_frontend, wait_until

pytestmark = pytest.mark.integration

MAX_TOKENS = 8
PROMPTS = prompts(20, seed=11)
PREFILL_REQUESTS = 'armature_component_requests_total'


@dataclass
class Deployment:
    frontend: Proc
    prefill: Proc
    decode: Proc
    reference: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.frontend.port}"


def _listed(frontend: Proc) -> bool:
    r = httpx.get(f"http://127.0.0.1:{frontend.port}/v1/models", timeout=5)
    return r.status_code == 200 and any(m["id"] == MODEL for m in r.json()["data"])


@pytest.fixture(scope="module", params=["tcp", "shm"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               tiny_llama_path: Path) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp(f"disagg-{request.param}")
    kv = tmp / "kv"
    kv.mkdir()
    # shm runs behind a KV-routing frontend: the prefill worker is then chosen by KV overlap.
    frontend = start_frontend(tmp, kv, *(["--router-mode", "kv"] if request.param == "shm" else []))
    decode = start_native_worker(tmp, kv, tiny_llama_path, "decode",
                                 "--disaggregation-transfer-backend", request.param)
    procs = [frontend, decode]
    try:
        decode.status_url()
        wait_until(lambda: _listed(frontend), START_TIMEOUT_S, "the model behind the frontend", procs)

        # No prefill worker yet: the decode worker serves the model aggregated — the reference.
        async def reference() -> list[str]:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{frontend.port}", timeout=120) as http:
                return await completions(http, PROMPTS, MAX_TOKENS, concurrency=8)

        ref = asyncio.run(reference())
        assert worker_metric(decode, "armature_disagg_kv_transfers_total") == 0
        prefill = start_native_worker(tmp, kv, tiny_llama_path, "prefill")
        procs.append(prefill)
        prefill.status_url()

        # The frontend switches the model to disaggregated once it sees the prefill card.
        def through_prefill() -> bool:
            r = httpx.post(f"http://127.0.0.1:{frontend.port}/v1/completions",
                           json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}, timeout=30)
            served = worker_metric(prefill, PREFILL_REQUESTS, 'endpoint="generate"')
            return r.status_code == 200 and served > 0

        wait_until(through_prefill, START_TIMEOUT_S, "requests going through the prefill worker", procs)
        yield Deployment(frontend, prefill, decode, ref)
    finally:
        for p in procs:
            if p.alive():
                p.kill()


@pytest.fixture
async def http(deployment: Deployment) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=deployment.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("concurrency", [1, 32])
async def test_disaggregated_matches_aggregated(deployment: Deployment, http: httpx.AsyncClient,
                                                concurrency: int) -> None:
    before = worker_metric(deployment.decode, "armature_disagg_kv_transfers_total")
    got = await completions(http, PROMPTS, MAX_TOKENS, concurrency)
    for i, (a, b) in enumerate(zip(got, deployment.reference)):
        assert a == b, f"prompt {i} ({len(PROMPTS[i])} tokens): disaggregated {a!r} != aggregated {b!r}"
    # Every request's KV really came from the prefill worker.
    assert worker_metric(deployment.decode, "armature_disagg_kv_transfers_total") - before == len(PROMPTS)
    assert worker_metric(deployment.decode, "armature_disagg_kv_transfer_failures_total") == 0
    await wait_idle([deployment.prefill, deployment.decode])
    await wait_metric(deployment.prefill, "armature_disagg_open_rooms", lambda v: v == 0)


async def test_cancelled_requests_leave_nothing_behind(
    deployment: Deployment, http: httpx.AsyncClient
) -> None:
    rng = random.Random(5)

    async def one(ids: list[int], cancel_after: float | None) -> None:
        body = {"model": MODEL, "prompt": ids, "max_tokens": 64, "temperature": 0, "stream": True,
                "ignore_eos": True}  # fmt: skip
        task = asyncio.ensure_future(_stream(http, body))
        if cancel_after is None:
            await task
            return
        await asyncio.sleep(cancel_after)
        task.cancel()  # the client goes away: the frontend kills both halves of the request
        await asyncio.gather(task, return_exceptions=True)

    # Half the requests are dropped at random moments: queued on prefill, mid-prefill, during
    # the transfer, while decoding.
    jobs = [one(ids, rng.uniform(0.0, 1.5) if i % 2 else None) for i, ids in enumerate(PROMPTS * 2)]
    await asyncio.gather(*jobs)
    await wait_idle([deployment.prefill, deployment.decode])
    t0 = time.monotonic()
    await wait_metric(deployment.prefill, "armature_disagg_open_rooms", lambda v: v == 0)
    print(f"open rooms closed {time.monotonic() - t0:.2f} s after the engines went idle")
    await wait_metric(deployment.decode, "armature_disagg_transfers_in_flight", lambda v: v == 0)


async def _stream(http: httpx.AsyncClient, body: dict) -> int:
    chunks = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return chunks
