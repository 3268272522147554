"""ModelRunner vs transformers on the CPU: batch-1 decode, batched decode, prefill.

Measures the model side of the native engine alone (no scheduler, no sampling beyond argmax), on
SmolLM2-135M in fp32, against transformers run in the same process on the same weights:

- batch-1 decode tokens/s: ``generate`` (greedy, KV cache) vs ModelRunner decode steps;
- batched decode tokens/s: B sequences of different context lengths, transformers ``generate``
  over the left-padded batch vs one ModelRunner decode step for all of them;
- prefill tokens/s of one prompt.

Each timing is the best of ``--repeats`` runs (the machine may be shared). Prints a table and
writes JSON to benchmarks/results/model_runner_cpu.json.

    python benchmarks/model_runner_cpu.py                       # SmolLM2 from the GGUF cache
    python benchmarks/model_runner_cpu.py --random-smollm2-shape  # same shapes, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from armature.engine.forward_batch import ForwardBatch, ForwardMode
from armature.engine.model_runner import ModelRunner

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Sequences:
    """A few sequences in the runner's KV pool, grown by prefill and decode steps."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]]) -> None:
        self.runner, self.pool = runner, runner.kv_pool
        self.prompts = prompts

    def reset(self) -> None:
        self.lens = [0] * len(self.prompts)
        self.pages: list[list[int]] = [[] for _ in self.prompts]
        self.pool.free([p for ps in getattr(self, "_held", []) for p in ps])
        self._held = self.pages

    def _slots(self, i: int, total: int) -> torch.Tensor:
        need = -(-total // self.pool.page_size) - len(self.pages[i])
        if need > 0:
            self.pages[i] += self.pool.alloc(need)
        return self.pool.slots_of(self.pages[i], total)

    def prefill(self) -> torch.Tensor:
        outs = []
        for i, p in enumerate(self.prompts):
            slots = self._slots(i, len(p))
            n = len(p)
            batch = ForwardBatch(
                ForwardMode.EXTEND, torch.tensor(p), torch.arange(n), slots, [n], [0], [slots], [False]
            )
            outs.append(self.runner.forward(batch))
            self.lens[i] = len(p)
        return torch.cat(outs)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        kv, out_loc = [], []
        for i in range(len(self.prompts)):
            slots = self._slots(i, self.lens[i] + 1)
            kv.append(slots)
            out_loc.append(slots[-1:])
        batch = ForwardBatch(
            ForwardMode.DECODE, torch.tensor(tokens), torch.tensor(self.lens), torch.cat(out_loc),
            [1] * len(tokens), list(self.lens), kv, [False] * len(tokens))
        self.lens = [n + 1 for n in self.lens]
        return self.runner.forward(batch)

    def generate(self, new_tokens: int) -> None:
        self.reset()
        nxt = self.prefill().argmax(-1).tolist()
        for _ in range(new_tokens):
            nxt = self.decode(nxt).argmax(-1).tolist()


def hf_generate(model: transformers.PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--random-smollm2-shape", action="store_true", help="random weights, SmolLM2's shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/model_runner_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model_path = args.model
    if args.random_smollm2_shape:
        folder = Path(tempfile.mkdtemp(prefix="smollm2-shape-"))
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(folder)
        model_path = str(folder)
    runner = ModelRunner(model_path, dtype="float32", device="cpu", max_total_tokens=64 * 1024)
    hf = transformers.AutoModelForCausalLM.from_pretrained(runner.model_path, dtype=torch.float32).eval()
    vocab = runner.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompts(lengths: list[int]) -> list[list[int]]:
        return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]

    n = args.new_tokens
    rows: list[dict[str, object]] = []

    Fn = Callable[[], object]

    def compare(
        name: str, unit_count: int, unit: str, ours: Fn, theirs: Fn,
        ours_base: Fn | None = None, theirs_base: Fn | None = None,
    ) -> None:
        ours(), theirs()  # warm up
        t_ours, t_hf = best_of(ours, args.repeats), best_of(theirs, args.repeats)
        if ours_base is not None and theirs_base is not None:
            t_ours -= best_of(ours_base, args.repeats)
            t_hf -= best_of(theirs_base, args.repeats)
        row = {"case": name, "unit": unit, "armature": unit_count / t_ours, "transformers": unit_count / t_hf,
               "ratio": t_hf / t_ours}
        rows.append(row)
        print(
            f"{name:<40} {row['armature']:>10.1f} {row['transformers']:>13.1f} {row['ratio']:>7.2f}x  {unit}",
            flush=True,
        )

    print(f"{'case':<40} {'armature':>10} {'transformers':>13} {'ratio':>8}")
    one = Sequences(runner, prompts([128]))
    compare(f"batch-1 decode (ctx 128, {n} new)", n, "tok/s",
            lambda: one.generate(n), lambda: hf_generate(hf, one.prompts, n + 1),
            lambda: one.generate(0), lambda: hf_generate(hf, one.prompts, 1))
    lens = torch.randint(32, 513, (args.batch,), generator=gen).tolist()
    many = Sequences(runner, prompts(lens))
    compare(f"batched decode (B={args.batch}, ctx 32-512, {n} new)", args.batch * n, "tok/s",
            lambda: many.generate(n), lambda: hf_generate(hf, many.prompts, n + 1),
            lambda: many.generate(0), lambda: hf_generate(hf, many.prompts, 1))
    pre = Sequences(runner, prompts([512]))
    compare("prefill (512 tokens)", 512, "tok/s", lambda: (pre.reset(), pre.prefill()),
            lambda: hf_generate(hf, pre.prompts, 1))

    result = {
        "benchmark": "model_runner_cpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": str(runner.model_path), "random_weights": args.random_smollm2_shape, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
