"""The engine on the Triton attention backend gives transformers' greedy tokens.

On CUDA this is the GPU path (page tables, CUDA graphs for decode); without CUDA it runs the same
kernels under Triton's interpreter, when triton is installed. It covers batched decode, chunked
prefill, prefixes served from the radix cache, and sampling params on the GPU path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from triton_interpreter import enable_without_cuda

if not enable_without_cuda():
    pytest.skip("triton is not installed", allow_module_level=True)

from armature.engine import Engine  # noqa: E402
from engine_core_ref import transformers_greedy, varied_prompts  # noqa: E402

MAX_NEW = 6
GREEDY = {"temperature": 0.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("arch", ["tiny_llama_path", "tiny_qwen3_path"])
def test_triton_backend_greedy_matches_transformers(arch: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(arch)
    first = varied_prompts(6, seed=1)
    second = [p + [500 + i, 600 + i, 700 + i] for i, p in enumerate(first[:4])]
    want = transformers_greedy(path, first + second, MAX_NEW)
    eng = Engine(
        model_path=str(path), device=DEVICE, dtype="float32", attention_backend="triton",
        max_total_tokens=1 << 13, chunked_prefill_size=48, cuda_graph_max_bs=8,
    )
    try:
        got1 = eng.generate(input_ids=first, sampling_params=GREEDY)
        got2 = eng.generate(input_ids=second, sampling_params=GREEDY)
        for i, g in enumerate(got1 + got2):
            assert g["output_ids"] == want[i], f"prompt {i} differs"
        hits = [g["meta_info"]["cached_tokens"] for g in got2]
        assert hits == [(len(p) // 16) * 16 for p in first[:4]]
        eng.run_in_loop(eng.scheduler.check_accounting).result()
    finally:
        eng.shutdown()
