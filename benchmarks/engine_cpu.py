"""Native engine vs transformers ``generate`` on the CPU (SmolLM2-135M, fp32), same run, same weights.

Three measurements:
1. Throughput: 32 requests, prompt lengths 32-512 and max_tokens 16-256 (fixed seed, ignore_eos
   so every request produces exactly its max_tokens). The engine gets all 32 at once
   (continuous batching); transformers gets them as ONE left-padded batch of 32 whose
   ``max_new_tokens`` is the largest asked for (only the tokens each request asked for count).
2. Batch-1 decode tokens/s: one 64-token prompt, 128 new tokens, decode time only.
   Wall time is the bar; tokens per CPU-second of this process (all its threads) is printed too,
   because the machine is shared and other processes' load can land on either phase.
3. TTFT with a shared 512-token system prompt: 8 requests one after another, radix cache on
   vs ``disable_radix_cache``; median time to the first token.

Prints a table and writes JSON to benchmarks/results/engine_cpu.json.

    .venv/bin/python benchmarks/engine_cpu.py [--threads 2] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from armature.engine import Engine
from armature.engine.api import GenerateRequest, SamplingParams
from armature.engine.loader import resolve_model_path

RESULTS = Path(__file__).parent / "results"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(100, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256)) for _ in range(n)
    ]


def engine_throughput(model: Path, work: list[tuple[list[int], int]]) -> dict[str, Any]:
    max_tokens = sum(len(p) + m for p, m in work) + 64 * len(work)
    eng = Engine(model_path=str(model), dtype="float32", max_total_tokens=max_tokens, skip_tokenizer_init=True)
    try:
        eng.generate(input_ids=[1, 2, 3, 4], sampling_params={"max_new_tokens": 2, "temperature": 0})  # warm-up
        params = [{"max_new_tokens": m, "temperature": 0.0, "ignore_eos": True} for _, m in work]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = eng.generate(input_ids=[p for p, _ in work], sampling_params=params)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        produced = sum(len(o["output_ids"]) for o in outs)
        assert produced == sum(m for _, m in work), "the engine did not honour max_tokens"
        stats = eng.scheduler.stats
        return {"wall_s": wall, "cpu_s": cpu, "output_tokens": produced, "tok_per_s": produced / wall,
                "tok_per_cpu_s": produced / cpu, "steps": stats.steps,
                "peak_batch": stats.peak_batch, "retractions": stats.retractions}
    finally:
        eng.shutdown()


def hf_throughput(hf: Any, work: list[tuple[list[int], int]], pad_id: int) -> dict[str, Any]:
    longest = max(len(p) for p, _ in work)
    ids = torch.full((len(work), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(work):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    max_new = max(m for _, m in work)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                          do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == longest + max_new
    useful = sum(m for _, m in work)
    return {"wall_s": wall, "cpu_s": cpu, "output_tokens": useful, "tok_per_s": useful / wall,
            "tok_per_cpu_s": useful / cpu, "batches": 1,
            "max_new_tokens": max_new, "padded_prompt_len": longest}


async def _stream_times(eng: Any, req: GenerateRequest) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    n = 0
    async for out in eng.generate_stream(req):
        if out.token_ids and first is None:
            first = time.perf_counter()
        n += len(out.token_ids)
    assert first is not None
    return first - t0, time.perf_counter() - first, n


def engine_batch1(model: Path, prompt: list[int], new: int) -> dict[str, Any]:
    eng = Engine(model_path=str(model), dtype="float32", max_total_tokens=4096, skip_tokenizer_init=True)
    try:
        eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
        req = GenerateRequest("b1", prompt, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
        _, decode_s, n = asyncio.run(_stream_times(eng, req))
        return {"decode_tok_per_s": (n - 1) / decode_s, "tokens": n}
    finally:
        eng.shutdown()


def hf_batch1(hf: Any, prompt: list[int], new: int) -> dict[str, Any]:
    ids = torch.tensor([prompt])

    def run(k: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t0

    run(4)
    t1 = min(run(1) for _ in range(2))
    tn = run(new)
    return {"decode_tok_per_s": (new - 1) / (tn - t1), "tokens": new}


def ttft(model: Path, system: list[int], users: list[list[int]], disable_cache: bool) -> dict[str, Any]:
    eng = Engine(model_path=str(model), dtype="float32", max_total_tokens=8192, skip_tokenizer_init=True,
                 disable_radix_cache=disable_cache)
    try:
        eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2, "temperature": 0})
        times = []
        for i, u in enumerate(users):
            req = GenerateRequest(f"t{i}", system + u, SamplingParams(max_new_tokens=4, temperature=0.0,
                                                                     ignore_eos=True))
            t, _, _ = asyncio.run(_stream_times(eng, req))
            times.append(t)
        return {"ttft_s": times, "median_s": statistics.median(times), "hit_rate": eng.load_metrics().cache_hit_rate}
    finally:
        eng.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "engine_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model_path(None)
    import transformers

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    work = make_workload(args.requests, args.seed, vocab)
    rng = random.Random(args.seed + 1)
    system = [rng.randrange(100, vocab) for _ in range(512)]
    users = [[rng.randrange(100, vocab) for _ in range(32)] for _ in range(8)]
    b1_prompt = [rng.randrange(100, vocab) for _ in range(64)]

    res: dict[str, Any] = {"model": str(model), "threads": args.threads, "dtype": "float32",
                           "python": sys.version.split()[0], "torch": torch.__version__,
                           "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "workload": {"requests": len(work), "prompt_tokens": sum(len(p) for p, _ in work),
                                        "max_tokens": sum(m for _, m in work)}}
    print(f"SmolLM2-135M fp32, {args.threads} threads, {len(work)} requests ...", flush=True)
    res["engine"] = engine_throughput(model, work)
    res["engine_batch1"] = engine_batch1(model, b1_prompt, 128)
    res["ttft_cache"] = ttft(model, system, users, disable_cache=False)
    res["ttft_nocache"] = ttft(model, system, users, disable_cache=True)
    res["engine_peak_rss_mib"] = rss_mib()

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    res["hf_batch1"] = hf_batch1(hf, b1_prompt, 128)
    res["hf"] = hf_throughput(hf, work, pad_id=0)
    res["peak_rss_mib"] = rss_mib()

    thr = res["engine"]["tok_per_s"] / res["hf"]["tok_per_s"]
    b1 = res["engine_batch1"]["decode_tok_per_s"] / res["hf_batch1"]["decode_tok_per_s"]
    tt = res["ttft_nocache"]["median_s"] / res["ttft_cache"]["median_s"]
    thr_cpu = res["engine"]["tok_per_cpu_s"] / res["hf"]["tok_per_cpu_s"]
    res["ratios"] = {"throughput": thr, "throughput_per_cpu_s": thr_cpu, "batch1_decode": b1, "ttft_cache_speedup": tt}
    rows = [
        ("throughput (output tok/s)", res["engine"]["tok_per_s"], res["hf"]["tok_per_s"], thr, 2.0),
        ("throughput (output tok/CPU-s)", res["engine"]["tok_per_cpu_s"], res["hf"]["tok_per_cpu_s"], thr_cpu, 2.0),
        ("batch-1 decode tok/s", res["engine_batch1"]["decode_tok_per_s"], res["hf_batch1"]["decode_tok_per_s"],
         b1, 1.0),
        ("TTFT median s (cache vs none)", res["ttft_cache"]["median_s"], res["ttft_nocache"]["median_s"], tt, 3.0),
    ]
    print(f"\n{'metric':34} {'armature':>12} {'baseline':>12} {'ratio':>8} {'bar':>6}")
    for name, a, b, r, bar in rows:
        print(f"{name:34} {a:12.3f} {b:12.3f} {r:8.2f} {bar:6.1f} {'ok' if r >= bar else 'MISS'}")
    print(f"\nengine: {res['engine']['wall_s']:.1f}s, {res['engine']['steps']} steps, peak batch "
          f"{res['engine']['peak_batch']}; transformers: one padded batch of {len(work)}, "
          f"{res['hf']['wall_s']:.1f}s; peak RSS engine phase {res['engine_peak_rss_mib']:.0f} MiB, "
          f"whole run {res['peak_rss_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
