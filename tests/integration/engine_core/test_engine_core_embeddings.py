"""Native engine embeddings: the last token's final hidden state, L2-normalised, as SGLang pools
Llama-family embedding models; checked against transformers on the same weights (fp32, CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from armature.engine import Engine
from armature.engine.api import (
    EncodeRequest,
    EngineError,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)

PROMPTS = [[5, 6, 7], list(range(100, 140)), [9] * 70, [42]]


def reference(model_path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    hf = transformers.AutoModel.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            torch.nn.functional.normalize(hf(torch.tensor([p])).last_hidden_state[0, -1], dim=-1)
            for p in prompts
        ]


@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path) -> Iterator[Engine]:
    eng = Engine(
        model_path=str(tiny_llama_path), max_total_tokens=2048, context_length=256, skip_tokenizer_init=True
    )
    yield eng
    eng.shutdown()


def free_everywhere(eng: Engine) -> bool:
    sched = eng.scheduler
    return sched.allocator.free_pages == sched.allocator.total_pages and sched.cache.evictable_pages == 0


@pytest.mark.parametrize("model", ["tiny_llama_path", "tiny_qwen2_path", "tiny_qwen3_path"])
async def test_embeddings_match_transformers(model: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(model)
    eng = Engine(model_path=str(path), max_total_tokens=1024, skip_tokenizer_init=True)
    try:
        # Sent together, so they share forwards; the answers must not depend on the company.
        together = await asyncio.gather(
            *(eng.encode(EncodeRequest(f"r{i}", p)) for i, p in enumerate(PROMPTS))
        )
        alone = [await eng.encode(EncodeRequest(f"a{i}", p)) for i, p in enumerate(PROMPTS)]
    finally:
        await eng.shutdown()
    for prompt, out, single, ref in zip(PROMPTS, together, alone, reference(path, PROMPTS), strict=True):
        got = torch.tensor(out.embedding)
        assert out.prompt_tokens == len(prompt)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(single.embedding), got, atol=1e-6, rtol=0)
        assert abs(float(got.norm()) - 1.0) < 1e-5


async def test_many_callers_are_answered_and_nothing_is_kept(engine: Engine) -> None:
    prompts = [[(i * 7 + j) % 3000 + 10 for j in range(3 + i % 50)] for i in range(48)]
    outs = await asyncio.gather(*(engine.encode(EncodeRequest(f"m{i}", p)) for i, p in enumerate(prompts)))
    assert [o.rid for o in outs] == [f"m{i}" for i in range(48)]
    assert [o.prompt_tokens for o in outs] == [len(p) for p in prompts]
    # Same input, same vector, whoever else was in the batch.
    again = await engine.encode(EncodeRequest("again", prompts[17]))
    torch.testing.assert_close(
        torch.tensor(again.embedding), torch.tensor(outs[17].embedding), atol=1e-6, rtol=0
    )
    # Embeddings borrow pages and give them all back; they never fill the prefix cache.
    assert free_everywhere(engine)
    first = [
        o
        async for o in engine.generate_stream(
            GenerateRequest("g", prompts[40], SamplingParams(max_new_tokens=1))
        )
    ]
    assert first[-1].cached_tokens == 0


async def test_bad_inputs_are_refused_and_the_engine_keeps_serving(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        await engine.encode(EncodeRequest("empty", []))
    with pytest.raises(InvalidRequestError, match="context length is 256"):
        await engine.encode(EncodeRequest("long", [7] * 257))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        await engine.encode(EncodeRequest("vocab", [1, 10**9]))
    edge = await engine.encode(EncodeRequest("edge", [7] * 256))
    assert edge.prompt_tokens == 256


async def test_a_caller_who_gives_up_costs_nothing(engine: Engine) -> None:
    await engine.release_memory()  # holds embeddings back until resume: a deterministic queue
    try:
        kept = asyncio.ensure_future(engine.encode(EncodeRequest("kept", [3, 4, 5])))
        dropped = asyncio.ensure_future(engine.encode(EncodeRequest("dropped", [3, 4, 5, 6])))
        await asyncio.sleep(0.1)
        assert not kept.done() and not dropped.done()
        dropped.cancel()
    finally:
        await engine.resume_memory()
    assert (await kept).prompt_tokens == 3
    with pytest.raises(asyncio.CancelledError):
        await dropped
    assert free_everywhere(engine)


async def test_shutdown_answers_waiting_callers(tiny_llama_path: Path) -> None:
    eng = Engine(model_path=str(tiny_llama_path), max_total_tokens=512, skip_tokenizer_init=True)
    await eng.release_memory()
    waiting = asyncio.ensure_future(eng.encode(EncodeRequest("w", [1, 2])))
    await asyncio.sleep(0.05)
    await eng.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(EngineError, match="shut down"):
        await eng.encode(EncodeRequest("late", [1, 2]))
