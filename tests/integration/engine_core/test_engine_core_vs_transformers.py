"""Bars 1, 2 and 5: the native engine's greedy tokens and logprobs equal transformers'.

Every case runs all its prompts through one engine at once (continuous batching, >= 16 in one
batch), with a small chunked-prefill size so long prompts are split, a second wave that shares
prefixes with the first (radix-cache hits), and a KV pool too small for the batch (retraction).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from armature.engine import Engine
from engine_core_ref import text_prompts, transformers_greedy, transformers_logprobs, varied_prompts

MAX_NEW = 10
GREEDY = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}


# disable_overlap_schedule=False forces the overlap schedule on the CPU (GPU default) too.
OVERLAP = pytest.mark.parametrize("no_overlap", [None, False], ids=["sync", "overlap"])


@OVERLAP
@pytest.mark.parametrize("arch", ["tiny_llama_path", "tiny_qwen3_path", "tiny_qwen2_path"])
def test_greedy_batch_chunked_and_cached(arch: str, no_overlap: bool | None, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(arch)
    first = varied_prompts(12, seed=1)
    # The second wave repeats first-wave prompts with new tails: their prefixes are cached.
    second = [p + [500 + i, 600 + i, 700 + i] for i, p in enumerate(first[:10])]
    prompts = first + second
    want = transformers_greedy(path, prompts, MAX_NEW)
    eng = Engine(
        model_path=str(path), max_total_tokens=1 << 14, chunked_prefill_size=64, disable_overlap_schedule=no_overlap
    )
    try:
        got1 = eng.generate(input_ids=first, sampling_params=GREEDY)
        got2 = eng.generate(input_ids=second, sampling_params=GREEDY)
        for i, g in enumerate(got1 + got2):
            assert g["output_ids"] == want[i], f"prompt {i} (len {len(prompts[i])}) differs"
        hits = [g["meta_info"]["cached_tokens"] for g in got2]
        assert all(h == (len(first[i]) // 16) * 16 for i, h in enumerate(hits)), hits
        assert eng.scheduler.stats.peak_batch >= 12
        assert eng.load_metrics().cache_hit_rate > 0
        eng.run_in_loop(eng.scheduler.check_accounting).result()
    finally:
        eng.shutdown()


@OVERLAP
def test_sixteen_in_one_batch_and_tiny_pool_retracts(tiny_llama_path: Path, no_overlap: bool | None) -> None:
    prompts = varied_prompts(16, seed=3)
    # 80 pages of 4 tokens: the longest prompt fits alone, the 16 together do not, and 20 new
    # tokens each outgrow what admission reserved for the decodes.
    max_new = 20
    want = transformers_greedy(tiny_llama_path, prompts, max_new)
    eng = Engine(
        model_path=str(tiny_llama_path), max_total_tokens=320, page_size=4, chunked_prefill_size=128,
        disable_overlap_schedule=no_overlap,
    )
    try:
        got = eng.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": max_new})
        assert [g["output_ids"] for g in got] == want
        assert eng.load_metrics().num_retractions > 0
        eng.run_in_loop(eng.scheduler.check_accounting).result()
        # Nothing is running, so every page is free or held by the cache.
        pool = eng.runner.kv_pool
        assert pool.free_pages + eng.scheduler.cache.total_pages == pool.total_pages
    finally:
        eng.shutdown()


def test_smollm2_greedy_matches_transformers(smollm2_path: Path) -> None:
    eng = Engine(model_path=str(smollm2_path), max_total_tokens=1 << 14, chunked_prefill_size=32)
    try:
        prompts = text_prompts(eng.tokenizer, 20)
        want = transformers_greedy(smollm2_path, prompts, MAX_NEW)
        got = eng.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [g["output_ids"] for g in got] == want
        assert eng.scheduler.stats.peak_batch >= 16
        # Same prompts again: served from the radix cache, same tokens.
        again = eng.generate(input_ids=prompts[:4], sampling_params=GREEDY)
        assert [g["output_ids"] for g in again] == want[:4]
        assert all(g["meta_info"]["cached_tokens"] >= 16 * ((len(p) - 1) // 16) for g, p in zip(again, prompts))
    finally:
        eng.shutdown()


@pytest.mark.parametrize("arch", ["tiny_llama_path", "smollm2_path"])
def test_logprobs_match_transformers(arch: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(arch)
    eng = Engine(model_path=str(path), max_total_tokens=4096, chunked_prefill_size=16)
    try:
        prompt = varied_prompts(6, seed=5)[5]  # 33 tokens: three chunks
        out = eng.generate(
            input_ids=prompt, sampling_params=GREEDY, return_logprob=True, top_logprobs_num=3, logprob_start_len=0
        )
    finally:
        eng.shutdown()
    assert isinstance(out, dict)
    full = prompt + out["output_ids"]
    ref = transformers_logprobs(path, full)
    meta = out["meta_info"]
    out_lp = meta["output_token_logprobs"]
    assert len(out_lp) == MAX_NEW
    for j, (lp, tok, _) in enumerate(out_lp):
        pos = len(prompt) + j
        assert abs(lp - ref[pos - 1, tok].item()) < 1e-4
        top = meta["output_top_logprobs"][j]
        ref_top = ref[pos - 1].topk(3)
        assert [t for _, t, _ in top] == ref_top.indices.tolist()
        assert max(abs(a - b) for (a, _, _), b in zip(top, ref_top.values.tolist())) < 1e-4
    in_lp = meta["input_token_logprobs"]
    assert in_lp[0][0] is None and len(in_lp) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(in_lp[i][0] - ref[i - 1, prompt[i]].item()) < 1e-4
