"""The overlap schedule (forced on the CPU) streams exactly what the synchronous schedule does.

It launches each batch before reading the previous one's tokens, so a request that stops has
one more token computed in flight; that token must never reach the client, the stop must be
reported the same way, and every page must come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from armature.engine import Engine
from engine_core_ref import varied_prompts


def _run(
    path: Path, no_overlap: bool | None, prompts: list[list[int]], params: list[dict[str, Any]], **engine: Any
) -> list[dict[str, Any]]:
    eng = Engine(model_path=str(path), max_total_tokens=1 << 13, disable_overlap_schedule=no_overlap, **engine)
    try:
        out = eng.generate(input_ids=prompts, sampling_params=params)
        eng.run_in_loop(eng.scheduler.check_accounting).result()
        pool = eng.runner.kv_pool
        assert pool.free_pages + eng.scheduler.cache.total_pages == pool.total_pages
        return out
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    "engine", [{}, {"chunked_prefill_size": 32, "enable_mixed_chunk": True}], ids=["plain", "mixed-chunks"]
)
def test_stop_tokens_lengths_and_seeded_sampling_match_the_synchronous_schedule(
    tiny_llama_path: Path, engine: dict[str, Any]
) -> None:
    prompts = varied_prompts(10, seed=5)
    greedy = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    free_run = _run(tiny_llama_path, None, prompts, [greedy] * len(prompts))
    params: list[dict[str, Any]] = []
    for i, r in enumerate(free_run):
        if i % 3 == 0:  # stop on the token greedy decoding produces fourth
            params.append({**greedy, "stop_token_ids": [r["output_ids"][3]]})
        elif i % 3 == 1:  # a short length limit
            params.append({**greedy, "max_new_tokens": 1 + i % 4})
        else:  # seeded sampling: its own generator, independent of the batch around it
            params.append({"temperature": 0.8, "top_p": 0.9, "seed": 100 + i, "max_new_tokens": 9, "ignore_eos": True})
    sync = _run(tiny_llama_path, None, prompts, params, **engine)
    overlap = _run(tiny_llama_path, False, prompts, params, **engine)
    for i, (a, b) in enumerate(zip(sync, overlap)):
        assert a["output_ids"] == b["output_ids"], i
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"], i
    stopped = [r for i, r in enumerate(overlap) if i % 3 == 0]
    assert all(r["meta_info"]["finish_reason"]["type"] == "stop" for r in stopped)
