"""Reference outputs from transformers for the engine-core tests (same weights, fp32, CPU)."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch


@functools.lru_cache(maxsize=2)
def hf_model(model_path: Path):  # type: ignore[no-untyped-def]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model


def transformers_greedy(model_path: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations from transformers ``generate``, one prompt at a time (no padding)."""
    model = hf_model(model_path)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def transformers_logprobs(model_path: Path, tokens: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of ``tokens``: [len, vocab]."""
    with torch.inference_mode():
        logits = hf_model(model_path)(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def varied_prompts(n: int, seed: int, shared: list[int] | None = None, vocab: int = 49152) -> list[list[int]]:
    """``n`` prompts of lengths 3..300 over ordinary token ids, optionally behind a shared prefix."""
    rng = random.Random(seed)
    lengths = [3, 7, 16, 17, 31, 33, 48, 64, 65, 90, 120, 150, 200, 255, 300]
    return [
        (shared or []) + [rng.randrange(100, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)
    ]


def text_prompts(tokenizer, n: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    subjects = ["the ocean", "a small robot", "the history of Rome", "prime numbers", "a rainy day",
                "coffee", "the moon landing", "a haunted house", "machine learning", "the color blue"]
    forms = ["Write a short poem about {}.", "Explain {} to a child in detail, step by step, using examples.",
             "Tell me three facts about {}."]
    out = []
    for i in range(n):
        text = forms[i % len(forms)].format(subjects[i % len(subjects)]) + (" Please be thorough." * (i % 4))
        out.append(tokenizer.encode(text).ids)
    return out
