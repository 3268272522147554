"""Two native engines in one process, prefill + decode: same greedy output as aggregated."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from disagg_pair import (
    ENGINE_KW,
    bootstrap_of,
    decode_engine,
    greedy,
    prefill_engine,
    prompts,
    run_aggregated,
    run_disagg,
    settled,
)

from armature.engine.api import EngineFinishReason, GenerateOutput, GenerateRequest
from armature.engine.disagg import TransferBackend
from armature.engine.engine import NativeEngine
from armature.protocols.llm import BootstrapInfo

pytestmark = pytest.mark.integration

MAX_NEW = 12
PROMPTS = prompts(22)


@pytest.fixture(scope="module")
def aggregated(tiny_llama_path: Path) -> Iterator[NativeEngine]:
    eng = NativeEngine(model_path=str(tiny_llama_path), **ENGINE_KW)  # type: ignore[arg-type]
    yield eng
    eng.shutdown_sync()


@pytest.fixture(scope="module")
def reference(aggregated: NativeEngine) -> list[list[int]]:
    async def run() -> list[list[int]]:
        return [await run_aggregated(aggregated, ids, MAX_NEW) for ids in PROMPTS]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def prefill(tiny_llama_path: Path) -> Iterator[NativeEngine]:
    eng = prefill_engine(tiny_llama_path)
    yield eng
    eng.shutdown_sync()


@pytest.fixture(scope="module", params=[TransferBackend.TCP, TransferBackend.SHM], ids=["tcp", "shm"])
def decode(request: pytest.FixtureRequest, tiny_llama_path: Path) -> Iterator[NativeEngine]:
    eng = decode_engine(tiny_llama_path, request.param)
    yield eng
    eng.shutdown_sync()


@pytest.mark.parametrize("concurrency", [1, 32])
async def test_disaggregated_greedy_matches_aggregated(
    prefill: NativeEngine, decode: NativeEngine, reference: list[list[int]], concurrency: int
) -> None:
    sem = asyncio.Semaphore(concurrency)
    assert prefill.disagg is not None and prefill.disagg.server is not None
    direct_before = prefill.disagg.server.stats.direct_writes

    async def one(ids: list[int]) -> list[int]:
        async with sem:
            res = await run_disagg(prefill, decode, ids, MAX_NEW)
            assert res.last.error is None, res.last.error
            assert res.last.finish_reason in (EngineFinishReason.LENGTH, EngineFinishReason.STOP)
            assert res.prefill_last is not None and res.prefill_last.finish_reason is not None
            return res.tokens

    got = await asyncio.gather(*(one(ids) for ids in PROMPTS))
    for i, (a, b) in enumerate(zip(got, reference)):
        assert a == b, f"prompt {i} ({len(PROMPTS[i])} tokens): disaggregated {a} != aggregated {b}"
    await settled(prefill)
    await settled(decode)
    for eng in (prefill, decode):
        m = eng.load_metrics()
        assert (m.num_running_reqs, m.num_waiting_reqs, m.kv_active_blocks) == (0, 0, 0)
    assert prefill.disagg.server.open_rooms == 0
    stats = decode.scheduler.transfer_stats  # type: ignore[attr-defined]
    assert stats.transfers >= len(PROMPTS) and stats.failures == 0
    # The decode side cached the received prompts: its prefix cache holds pages now. The prefill
    # side kept its own cache: shared prefixes and repeated prompts were not recomputed.
    assert decode.load_metrics().kv_cached_blocks > 0
    assert prefill.load_metrics().kv_cached_blocks > 0 and prefill.load_metrics().cache_hit_rate > 0
    direct = prefill.disagg.server.stats.direct_writes - direct_before
    if decode.disagg is not None and decode.disagg.config.transfer_backend is TransferBackend.SHM:
        # Decode sides wait before their prefill finishes: pages go straight into their segments.
        assert direct > 0
    else:
        assert direct == 0


async def test_first_token_and_prompt_logprobs_come_from_the_prefill(
    prefill: NativeEngine, decode: NativeEngine, aggregated: NativeEngine
) -> None:
    ids = PROMPTS[5]

    def req(rid: str, max_new: int, boot: BootstrapInfo | None) -> GenerateRequest:
        return GenerateRequest(rid=rid, input_ids=ids, sampling=greedy(max_new), return_logprob=True,
                               top_logprobs_num=2, logprob_start_len=0, bootstrap=boot)  # fmt: skip

    async def collect(eng: NativeEngine, r: GenerateRequest) -> list[GenerateOutput]:
        return [o async for o in eng.generate_stream(r)]

    ref = await collect(aggregated, req("lp-agg", 4, None))
    boot = bootstrap_of(prefill)
    _, got = await asyncio.gather(
        collect(prefill, req("lp-p", 1, boot)), collect(decode, req("lp-d", 4, boot))
    )
    assert [t for o in got for t in o.token_ids] == [t for o in ref for t in o.token_ids]
    lp_ref = [x for o in ref for x in (o.logprobs or [])]
    lp_got = [x for o in got for x in (o.logprobs or [])]
    assert lp_got == pytest.approx(lp_ref, abs=1e-4)
    assert got[0].input_logprobs is not None and ref[0].input_logprobs is not None
    assert got[0].input_logprobs[0] is None and len(got[0].input_logprobs) == len(ids)
    assert got[0].input_logprobs[1:] == pytest.approx(ref[0].input_logprobs[1:], abs=1e-4)
    assert got[0].input_top_logprobs is not None and len(got[0].input_top_logprobs[1]) == 2
