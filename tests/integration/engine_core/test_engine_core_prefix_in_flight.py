"""Requests that arrive together with a shared, uncached prefix compute it once.

The first is admitted; the others wait until its prefill has put the shared pages in the radix
cache and then start from there (SGLang's in-batch prefix caching), instead of every one of them
computing the same prefix in the same step.
"""

from __future__ import annotations

from pathlib import Path

from armature.engine import Engine

GREEDY = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}


def test_shared_prefix_in_one_wave_is_computed_once(tiny_llama_path: Path) -> None:
    prefix = [100 + (7 * i) % 900 for i in range(80)]  # five full pages of 16
    prompts = [prefix + [2000 + i, 2100 + i, 2200 + i] for i in range(4)]
    other = [[3000 + i for i in range(40)]]  # shares nothing: never held back
    eng = Engine(model_path=str(tiny_llama_path), max_total_tokens=4096, page_size=16)
    try:
        out = eng.generate(input_ids=prompts + other, sampling_params=GREEDY)
        hits = [o["meta_info"]["cached_tokens"] for o in out]
        assert hits[0] == 0 and hits[1:4] == [80, 80, 80], hits
        assert hits[4] == 0
        assert eng.scheduler.stats.cached_prompt_tokens == 240
        eng.run_in_loop(eng.scheduler.check_accounting).result()
        # The same answers as computing each prompt alone.
        for p, o in zip(prompts, out):
            alone = eng.generate(input_ids=[[*p]], sampling_params=GREEDY)[0]
            assert alone["output_ids"] == o["output_ids"]
    finally:
        eng.shutdown()
