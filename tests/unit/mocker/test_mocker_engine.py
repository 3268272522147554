"""The mocker: the real scheduler and radix cache over the simulated runner."""

from __future__ import annotations

import asyncio

import pytest

from armature.engine.api import EngineFinishReason, GenerateRequest, InvalidRequestError, SamplingParams
from armature.engine.server_args import ServerArgs
from armature.mocker import MockerArgs, MockerEngine, PolynomialTiming


def make(**kw: object) -> MockerEngine:
    margs = MockerArgs(speedup_ratio=0.0, **kw)  # type: ignore[arg-type]
    return MockerEngine(ServerArgs(skip_tokenizer_init=True, context_length=4096), margs)


async def collect(eng: MockerEngine, req: GenerateRequest) -> tuple[list[int], list]:
    toks: list[int] = []
    outs = []
    async for out in eng.generate_stream(req):
        toks.extend(out.token_ids)
        outs.append(out)
    return toks, outs


async def test_256_concurrent_requests_complete() -> None:
    eng = make(block_size=16, num_gpu_blocks_override=4096)
    try:
        reqs = [
            GenerateRequest(
                rid=f"r{i}",
                input_ids=[(i * 7 + j) % 1000 for j in range(20 + i % 50)],
                sampling=SamplingParams(max_new_tokens=8 + i % 16),
            )
            for i in range(256)
        ]
        results = await asyncio.gather(*(collect(eng, r) for r in reqs))
        for r, (toks, outs) in zip(reqs, results):
            assert len(toks) == r.sampling.max_new_tokens
            assert outs[-1].finish_reason is EngineFinishReason.LENGTH
            assert outs[-1].completion_tokens == len(toks)
            assert all(0 <= t < eng.info.vocab_size for t in toks)
        assert eng.scheduler.stats.peak_batch > 100
        m = eng.load_metrics()
        assert (m.num_running_reqs, m.num_waiting_reqs, m.kv_active_blocks) == (0, 0, 0)
        assert m.kv_cached_blocks + eng.executor.allocator.free_pages == m.kv_total_blocks
    finally:
        await eng.shutdown()


async def test_seeded_tokens_repeat_and_prefix_hits_are_reported() -> None:
    eng = make(block_size=16, num_gpu_blocks_override=512)
    try:
        prompt = list(range(100, 164))
        a, outs_a = await collect(eng, GenerateRequest("a", prompt, SamplingParams(max_new_tokens=12, seed=5)))
        b, outs_b = await collect(eng, GenerateRequest("b", prompt, SamplingParams(max_new_tokens=12, seed=5)))
        c, _ = await collect(eng, GenerateRequest("c", prompt, SamplingParams(max_new_tokens=12, seed=6)))
        assert a == b and a != c
        assert outs_a[-1].cached_tokens == 0
        assert outs_b[-1].cached_tokens == 48  # 63 computable tokens -> 3 full pages of 16
        assert eng.load_metrics().cache_hit_rate > 0
    finally:
        await eng.shutdown()


async def test_small_pool_retracts_and_still_completes_everything() -> None:
    eng = make(block_size=4, num_gpu_blocks_override=40, max_num_batched_tokens=64, watermark=0.0)
    try:
        reqs = [GenerateRequest(f"r{i}", list(range(i, i + 30)), SamplingParams(max_new_tokens=40)) for i in range(8)]
        results = await asyncio.gather(*(collect(eng, r) for r in reqs))
        for toks, outs in results:
            assert len(toks) == 40
            # Streamed once each: the deltas add up to the count, nothing re-sent after a retraction.
            assert sum(len(o.token_ids) for o in outs) == outs[-1].completion_tokens == 40
        assert eng.load_metrics().num_retractions > 0
        eng.run_in_loop(eng.scheduler.check_accounting).result()
    finally:
        await eng.shutdown()


async def test_abort_before_first_token_and_while_running() -> None:
    eng = MockerEngine(ServerArgs(skip_tokenizer_init=True), MockerArgs(speedup_ratio=1.0, block_size=16))
    try:
        await eng.abort("early")
        toks, outs = await collect(eng, GenerateRequest("early", [1, 2, 3], SamplingParams(max_new_tokens=5)))
        assert toks == [] and outs[-1].finish_reason is EngineFinishReason.ABORT

        stream = eng.generate_stream(GenerateRequest("late", list(range(40)), SamplingParams(max_new_tokens=10_000)))
        first = await stream.__anext__()
        assert first.token_ids
        await eng.abort("late")
        rest = [o async for o in stream]
        assert rest[-1].finish_reason is EngineFinishReason.ABORT
        m = eng.load_metrics()
        assert m.num_running_reqs == 0 and m.kv_active_blocks == 0
    finally:
        await eng.shutdown()


async def test_bad_requests_get_clear_errors() -> None:
    eng = make(block_size=16, num_gpu_blocks_override=8)
    try:
        with pytest.raises(InvalidRequestError, match="context length"):
            await collect(eng, GenerateRequest("long", [1] * 4096, SamplingParams(max_new_tokens=1)))
        with pytest.raises(InvalidRequestError, match="whole pool"):
            await collect(eng, GenerateRequest("big", [1] * 100, SamplingParams(max_new_tokens=100)))
        with pytest.raises(InvalidRequestError, match="empty"):
            await collect(eng, GenerateRequest("empty", [], SamplingParams()))
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            await collect(eng, GenerateRequest("oov", [10**9], SamplingParams()))
    finally:
        await eng.shutdown()


def test_mocker_args_defaults_are_dynamos() -> None:
    a = MockerArgs()
    assert (a.block_size, a.num_gpu_blocks_override, a.max_num_seqs, a.max_num_batched_tokens) == (64, 16384, 256, 8192)
    assert (a.speedup_ratio, a.enable_prefix_caching, a.enable_chunked_prefill, a.watermark) == (1.0, True, True, 0.01)
    assert MockerArgs(num_gpu_blocks=100).num_gpu_blocks_override == 100
    with pytest.raises(ValueError, match="speedup_ratio"):
        MockerArgs(speedup_ratio=-1)


def test_timing_model_is_dynamos_polynomial_applied_per_step() -> None:
    t = PolynomialTiming()
    assert t.prefill_ms(0) == pytest.approx(16.50142)
    assert t.prefill_ms(1000) == pytest.approx(4.209989e-07 * 1e6 + 15.18344 + 16.50142)
    assert t.decode_ms(0.0) == pytest.approx(5.74)
    assert t.decode_ms(1.0) == pytest.approx(-25.74 + 54.01 + 5.74)
    # One prefill polynomial over the step's new tokens, plus one decode for the whole batch.
    assert t.step_ms(300, True, 0.5) == pytest.approx(t.prefill_ms(300) + t.decode_ms(0.5))
    assert t.step_ms(0, True, 0.25) == pytest.approx(t.decode_ms(0.25))
    assert t.step_ms(0, False, 0.25) == 0.0


async def test_steps_are_timed_on_the_kv_load_and_batched_prefill() -> None:
    eng = MockerEngine(
        ServerArgs(skip_tokenizer_init=True, context_length=4096),
        MockerArgs(speedup_ratio=0.0, block_size=16, num_gpu_blocks_override=64),
    )
    try:
        reqs = [GenerateRequest(f"r{i}", [i + 1] * 40, SamplingParams(max_new_tokens=4)) for i in range(4)]
        await asyncio.gather(*(collect(eng, r) for r in reqs))
        recs = list(eng.executor.records)
        t = PolynomialTiming()
        for rec in recs:
            expected = t.step_ms(rec.num_prefill_tokens, rec.num_decodes > 0, rec.active_blocks / 64)
            assert rec.predicted_ms == pytest.approx(expected)
        # All four prompts were waiting together: one step prefilled them, priced as one prefill.
        assert recs[0].num_prefill_tokens == 160
        assert recs[0].predicted_ms == pytest.approx(t.prefill_ms(160))
        assert max(r.active_blocks for r in recs) == 12  # 4 requests x 3 blocks of 16 (<= 44 tokens)
    finally:
        await eng.shutdown()


def test_the_engine_serves_one_event_loop_after_another() -> None:
    # Its step loop runs on the caller's event loop: a script may run several in turn.
    eng = make(block_size=16, num_gpu_blocks_override=64)
    try:
        for rid in ("a", "b"):
            toks, outs = asyncio.run(collect(eng, GenerateRequest(rid, [1, 2, 3], SamplingParams(max_new_tokens=4))))
            assert len(toks) == 4 and outs[-1].finish_reason is EngineFinishReason.LENGTH
        # From a plain thread, with no event loop at all, control calls still run (on the
        # native engine's step-loop thread from then on), and so do later streams.
        assert eng.run_in_loop(eng.scheduler.flush_cache).result(timeout=10) is True
        toks, outs = asyncio.run(collect(eng, GenerateRequest("c", [4, 5, 6], SamplingParams(max_new_tokens=5))))
        assert len(toks) == 5 and outs[-1].finish_reason is EngineFinishReason.LENGTH
    finally:
        eng.shutdown_sync()


async def test_control_calls_from_the_engines_own_event_loop_do_not_hang() -> None:
    eng = make(block_size=16, num_gpu_blocks_override=64)
    try:
        await collect(eng, GenerateRequest("x", [5] * 40, SamplingParams(max_new_tokens=3)))
        # A blocking .result() on the loop that runs the step loop: served at once, between steps.
        eng.run_in_loop(eng.scheduler.check_accounting).result(timeout=10)
        assert await eng.flush_cache() is True
        assert eng.load_metrics().kv_cached_blocks == 0
    finally:
        await eng.shutdown()
