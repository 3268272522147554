"""Embedding throughput of the native engine: concurrent inputs packed into shared forwards.

``--callers`` concurrent callers each embed one input of ``--min-tokens``..``--max-tokens``
tokens (SmolLM2-135M, the default model, on this machine's CPU), ``--rounds`` times. Three ways,
in the same run, on the same weights and inputs:

- the engine as it serves (inputs waiting together share a forward, up to the prefill budget);
- the engine one input per forward (``max_prefill_tokens`` 1: the baseline without batching);
- transformers, one padded batch of all the inputs per round (``AutoModel``, last token pooled).

It prints inputs/s per way and the ratios, checks the vectors agree, and writes JSON.

    .venv/bin/python benchmarks/embeddings.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from pathlib import Path

import torch

from armature.engine.api import EncodeRequest
from armature.engine.engine import NativeEngine
from armature.engine.loader import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def inputs(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [
        [rng.randrange(100, vocab) for _ in range(rng.randint(args.min_tokens, args.max_tokens))]
        for _ in range(args.callers)
    ]


def engine_way(model: Path, prompts: list[list[int]], rounds: int, budget: int) -> tuple[float, list[list[float]]]:
    eng = NativeEngine(model_path=str(model), max_total_tokens=65536, max_prefill_tokens=budget,
                       skip_tokenizer_init=True)  # fmt: skip

    async def one_round(tag: str) -> list[list[float]]:
        outs = await asyncio.gather(*(eng.encode(EncodeRequest(f"{tag}-{i}", p)) for i, p in enumerate(prompts)))
        return [o.embedding for o in outs]

    async def run() -> tuple[float, list[list[float]]]:
        vectors = await one_round("warm")
        started = time.perf_counter()
        for r in range(rounds):
            await one_round(str(r))
        return time.perf_counter() - started, vectors

    try:
        return asyncio.run(run())
    finally:
        eng.shutdown()


def transformers_way(model: Path, prompts: list[list[int]], rounds: int) -> tuple[float, list[list[float]]]:
    import transformers

    hf = transformers.AutoModel.from_pretrained(model, torch_dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for i, p in enumerate(prompts):  # left padding: every input's last token is the last column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1

    def one_round() -> list[list[float]]:
        with torch.inference_mode():
            h = hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        return torch.nn.functional.normalize(h, dim=-1).tolist()

    vectors = one_round()
    started = time.perf_counter()
    for _ in range(rounds):
        one_round()
    return time.perf_counter() - started, vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embeddings.json"))
    args = ap.parse_args()
    model = resolve_model_path(None)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = inputs(args, vocab)
    n = args.callers * args.rounds
    batched_s, ours = engine_way(model, prompts, args.rounds, budget=16384)
    serial_s, single = engine_way(model, prompts, args.rounds, budget=1)
    hf_s, ref = transformers_way(model, prompts, args.rounds)
    diff = max(
        float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(ours, ref, strict=True)
    )
    same = max(float((torch.tensor(a) - torch.tensor(b)).abs().max()) for a, b in zip(ours, single, strict=True))
    rows = [
        ("engine, shared forwards", batched_s),
        ("engine, one input per forward", serial_s),
        ("transformers, one padded batch", hf_s),
    ]
    print(f"{args.callers} callers x {args.rounds} rounds, {args.min_tokens}-{args.max_tokens} tokens each, {model.name}, CPU")
    print(f"{'way':<34}{'inputs/s':>10}")
    for name, secs in rows:
        print(f"{name:<34}{n / secs:>10.1f}")
    print(f"shared forwards vs one per forward: {serial_s / batched_s:.2f}x; vs transformers: {hf_s / batched_s:.2f}x")
    print(f"max |ours - transformers| = {diff:.2e}; max |shared - one per forward| = {same:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "args": vars(args),
        "inputs_per_s": {name: round(n / secs, 1) for name, secs in rows},
        "speedup_vs_one_per_forward": round(serial_s / batched_s, 2),
        "speedup_vs_transformers_batch": round(hf_s / batched_s, 2),
        "max_abs_diff_vs_transformers": diff,
        "max_abs_diff_batched_vs_single": same,
        "machine": platform.node(),
        "cpus": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
