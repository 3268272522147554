"""The native engine on one GPU vs the device's rooflines and vs transformers, same weights, same run.

Runs in one call on a machine with a CUDA GPU (the `device` tool's H100), with nothing fetched:
it builds a Llama-3-8B-shaped and a Qwen3-0.6B-shaped model with random bf16 weights (transformers'
own initialisation: normal(0, 0.02) matrices, unit norms) directly on the GPU, hands the very same
tensors to our engine (no copy on disk), and measures:

  0. the device: copy bandwidth (bytes read + written) and the bf16 matmul rate (8192^3);
  1. correctness: greedy tokens of 32 prompts (first 32 tokens) vs transformers' greedy
     `generate`, and first-step logits ||ours - ref|| / ||ref||;               (both shapes)
     the same on weights given a trained model's margins (section `conditioned`, see
     condition_weights), beside transformers' eager vs SDPA and each against float32;
  2. batch-1 decode at a 1k-token context vs bandwidth / (weight + KV bytes per step);  (8B)
  3. 64 concurrent requests, 512 in / 256 out, vs the memory-bound ceiling; a mixed set
     (inputs 128-1024, outputs 64-512) beside transformers' static `generate` and
     `generate_batch` (continuous batching) on the same requests;                       (8B)
  4. prefill of one 4,096-token prompt as a share of the measured matmul rate;           (8B)
  5. 32 requests sharing a 2,048-token prefix: TTFT p50 with the radix cache vs without. (8B)
  6. embeddings: the last token's final hidden state, normalised, vs transformers' on the same
     weights (cosine), and inputs/s of 256 concurrent inputs (64-512 tokens) in shared forwards
     vs one at a time vs transformers in left-padded batches of 32.                 (both shapes)

Prints a table and writes JSON (default benchmarks/results/gpu_engine.json, or --out).

    python benchmarks/gpu_engine.py                      # everything (about 8.5 minutes on an H100)
    python benchmarks/gpu_engine.py --skip-hf-throughput # leave out transformers' slow baselines
    python benchmarks/gpu_engine.py --shapes qwen3-0.6b --sections correctness
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from armature.engine.api import GenerateOutput, GenerateRequest, SamplingParams  # noqa: E402
from armature.engine.forward_batch import ForwardBatch, ForwardMode  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        arch="LlamaForCausalLM",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen3-0.6b": dict(
        arch="Qwen3ForCausalLM",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=8192,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}
SECTIONS = ("correctness", "conditioned", "fp32", "decode", "throughput", "prefill", "radix", "profile", "embeddings")
DEVICE = "cuda"  # a CPU smoke run of the script's logic sets "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the device's two ceilings ------------------------------------------------------------------


def _time_cuda(fn: Any, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, timed with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def device_ceilings() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    n = 1 << 30  # 2 GiB of bf16: far beyond the L2
    src = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src), 20)
    bandwidth = 2 * src.numel() * src.element_size() / t
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=DEVICE)
    t = _time_cuda(lambda: a @ b, 20)
    flops = 2 * m**3 / t
    del a, b
    torch.cuda.empty_cache()
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
        "bf16_matmul_tflops": round(flops / 1e12, 1),
        "torch": torch.__version__,
    }


# --- models with random weights, shared by transformers and our engine -------------------------


def build_hf_model(
    shape: str, seed: int, dtype: torch.dtype = torch.bfloat16, untie: bool = False
) -> tuple[Any, Any]:
    import transformers

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    if untie:
        spec["tie_word_embeddings"] = False
    config_cls = transformers.LlamaConfig if arch == "LlamaForCausalLM" else transformers.Qwen3Config
    cfg = config_cls(**spec, attention_bias=False)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = getattr(transformers, arch)._from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    model.generation_config.pad_token_id = spec["eos_token_id"]
    return model, cfg


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def matmul_params(cfg: Any) -> int:
    """Parameters that take part in a token's matmuls (all but the embedding lookup)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    per_layer = qkv + cfg.num_attention_heads * hd * h + 3 * h * i
    return layers * per_layer + cfg.vocab_size * h


def kv_bytes_per_token(cfg: Any) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2


def make_engine(model: Any, cfg: Any, folder: Path, **overrides: Any) -> Any:
    from armature.engine import Engine

    cfg.to_json_file(str(folder / "config.json"))
    kwargs: dict[str, Any] = dict(
        model_path=str(folder),
        dtype="bfloat16",
        device=DEVICE,
        skip_tokenizer_init=True,
        mem_fraction_static=0.45,
        context_length=8192,
        max_running_requests=128,
        cuda_graph_max_bs=64,
    )
    kwargs.update(overrides)
    weights = dict(model.state_dict())
    return Engine(weights=weights, **kwargs)


# --- driving our engine with timestamps -------------------------------------------------------


@dataclass
class Timed:
    sent: float
    stamps: list[float] = field(default_factory=list)  # one per token
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def put(self, out: GenerateOutput) -> None:
        now = time.perf_counter()
        self.stamps.extend([now] * len(out.token_ids))
        self.tokens.extend(out.token_ids)
        if out.finished:
            self.error = out.error
            self.done.set()

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent


def flush(eng: Any) -> None:
    """Empty the prefix cache so a measurement never reuses an earlier one's prompts."""
    if not eng.run_in_loop(eng.scheduler.flush_cache).result():
        raise RuntimeError("the engine was not idle; its cache could not be flushed")


def run_requests(eng: Any, prompts: list[list[int]], outputs: list[int], tag: str) -> tuple[list[Timed], float]:
    """Submit every request at once; wait for all. Returns per-request timings and wall seconds."""
    timed: list[Timed] = []
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, outputs)):
        t = Timed(time.perf_counter())
        sp = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        eng.submit(GenerateRequest(rid=f"{tag}-{i}", input_ids=p, sampling=sp), t)
        timed.append(t)
    for t in timed:
        if not t.done.wait(600):
            raise TimeoutError(f"{tag}: a request did not finish")
        if t.error:
            raise RuntimeError(f"{tag}: {t.error}")
    return timed, time.perf_counter() - start


def random_prompts(n: int, lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(lens[i % len(lens)])] for i in range(n)]


def first_step_logits(eng: Any, prompt: list[int]) -> torch.Tensor:
    """Our logits for the token after ``prompt``, from a prefill forward on the engine's thread."""
    runner = eng.runner

    def forward() -> torch.Tensor:
        pool = runner.kv_pool
        ps = pool.page_size
        pages = pool.alloc(-(-len(prompt) // ps))
        try:
            n = len(prompt)
            uses_pages = runner.attn_backend.uses_page_table
            slots = pool.new_token_slots(pages, 0, n)
            batch = ForwardBatch(
                mode=ForwardMode.EXTEND,
                input_ids=torch.tensor(prompt),
                positions=torch.arange(n),
                out_cache_loc=torch.tensor(slots),
                extend_lens=[n],
                prefix_lens=[0],
                kv_indices=[] if uses_pages else [torch.tensor(slots, device=runner.device)],
                return_all_logits=[False],
                page_table=[pages] if uses_pages else None,
            )
            return runner.forward(batch)[0].float().cpu()
        finally:
            pool.free(pages)

    return eng.run_in_loop(forward).result()


# --- the sections -------------------------------------------------------------------------------


CORRECTNESS_LENS = [24, 57, 100, 213]  # 4 groups of equal length: transformers runs each unpadded


def correctness_prompts(cfg: Any, n: int = 32) -> list[list[int]]:
    return random_prompts(n, CORRECTNESS_LENS, cfg.vocab_size, seed=11)


def logit_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """The 8 prompts (2 per length) whose first-step logits are compared."""
    return prompts[:: max(1, len(prompts) // 8)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def correctness(
    eng: Any, model: Any, cfg: Any, n_prompts: int = 32, new_tokens: int = 32,
    ref_out: dict[int, list[int]] | None = None,
    logits_out: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, Any]:
    lens = CORRECTNESS_LENS
    prompts = correctness_prompts(cfg, n_prompts)
    ours, _ = run_requests(eng, prompts, [new_tokens] * n_prompts, "ok")
    ref: dict[int, list[int]] = {}
    with torch.inference_mode():
        for length in lens:
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in idx], device=DEVICE)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
            )
            for row, i in enumerate(idx):
                ref[i] = out[row, length:].tolist()
        rel = []
        kept: dict[str, list[torch.Tensor]] = {"armature": [], "transformers_sdpa": []}
        for p in logit_prompts(prompts):
            want = model(torch.tensor([p], device=DEVICE)).logits[0, -1].float().cpu()
            got = first_step_logits(eng, p)
            rel.append(rel_err(got, want))
            kept["armature"].append(got)
            kept["transformers_sdpa"].append(want)
    if ref_out is not None:
        ref_out.update(ref)
    if logits_out is not None:
        logits_out.update(kept)
    matches = [ours[i].tokens[:new_tokens] == ref[i] for i in range(n_prompts)]
    first_diff = [
        next((j for j, (a, b) in enumerate(zip(ours[i].tokens, ref[i])) if a != b), new_tokens)
        for i in range(n_prompts)
    ]
    return {
        "prompts": n_prompts,
        "tokens_compared": new_tokens,
        "exact_match_share": sum(matches) / n_prompts,
        "mean_first_divergence": statistics.mean(first_diff),
        "logits_rel_err_max": max(rel),
        "logits_rel_err_mean": statistics.mean(rel),
    }


def decode_batch1(eng: Any, cfg: Any, ceilings: dict[str, Any], wbytes: int) -> dict[str, Any]:
    ctx, new = 1024, 256
    prompt = random_prompts(1, [ctx], cfg.vocab_size, seed=21)
    run_requests(eng, prompt, [16], "warm-b1")
    flush(eng)
    timed, _ = run_requests(eng, random_prompts(1, [ctx], cfg.vocab_size, seed=22), [new], "b1")
    t = timed[0]
    gaps = [b - a for a, b in zip(t.stamps, t.stamps[1:])]
    tok_s = (len(t.stamps) - 1) / (t.stamps[-1] - t.stamps[0])
    step_bytes = wbytes + kv_bytes_per_token(cfg) * (ctx + new / 2)
    roofline = ceilings["copy_bandwidth_gbs"] * 1e9 / step_bytes
    return {
        "context": ctx,
        "new_tokens": new,
        "tok_s": round(tok_s, 1),
        "itl_p50_ms": round(statistics.median(gaps) * 1e3, 3),
        "roofline_tok_s": round(roofline, 1),
        "share_of_roofline": round(tok_s / roofline, 3),
    }


def throughput(eng: Any, cfg: Any, ceilings: dict[str, Any], wbytes: int, hf: Any | None) -> dict[str, Any]:
    n = 64
    prompts = random_prompts(n, [512], cfg.vocab_size, seed=31)
    # Warm-up at the measured shapes: kernel specialisations, cuBLAS choices, allocator segments.
    run_requests(eng, random_prompts(n, [512], cfg.vocab_size, seed=30), [4] * n, "warm-tp")
    flush(eng)
    timed, wall = run_requests(eng, prompts, [256] * n, "uniform")
    tok_s = n * 256 / wall
    late = timed[0].stamps[128:]
    itl_mid = statistics.median(b - a for a, b in zip(late, late[1:]))
    mean_ctx = 512 + 256 / 2
    ceiling = ceilings["copy_bandwidth_gbs"] * 1e9 / (wbytes + kv_bytes_per_token(cfg) * mean_ctx * n) * n
    out: dict[str, Any] = {
        "uniform": {
            "requests": n,
            "tok_s": round(tok_s, 1),
            "ceiling_tok_s": round(ceiling, 1),
            "share_of_ceiling": round(tok_s / ceiling, 3),
            "ttft_p50_s": round(statistics.median(t.ttft for t in timed), 3),
            "itl_p50_ms_late": round(itl_mid * 1e3, 3),
        }
    }
    rng = random.Random(41)
    in_lens = [rng.randint(128, 1024) for _ in range(n)]
    out_lens = [rng.randint(64, 512) for _ in range(n)]
    mixed = [[rng.randrange(100, cfg.vocab_size - 100) for _ in range(k)] for k in in_lens]
    # The mixed set's shapes (uneven prefill batches next to decodes) get their warm-up too.
    warm = random.Random(40)
    run_requests(eng, [[warm.randrange(100, cfg.vocab_size - 100) for _ in range(warm.randint(128, 1024))]
                       for _ in range(16)], [warm.randint(8, 32) for _ in range(16)], "warm-mixed")
    flush(eng)
    timed, wall = run_requests(eng, mixed, out_lens, "mixed")
    useful = sum(out_lens)
    out["mixed"] = {"requests": n, "useful_tokens": useful, "armature_tok_s": round(useful / wall, 1)}
    if hf is not None:
        out["mixed"].update(hf_throughput(hf, mixed, out_lens))
        out["uniform"]["transformers_static_tok_s"] = hf_static(hf, prompts, [256] * n)
    return out


def hf_static(model: Any, prompts: list[list[int]], out_lens: list[int]) -> float:
    """transformers' static batched generate: one left-padded batch, everyone runs to the longest
    output; only the tokens each request asked for count."""
    width = max(len(p) for p in prompts)
    pad = model.generation_config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids, attention_mask=mask, max_new_tokens=max(out_lens), min_new_tokens=max(out_lens),
            do_sample=False, eos_token_id=None,
        )
    _sync()
    return round(sum(out_lens) / (time.perf_counter() - start), 1)


def hf_throughput(model: Any, prompts: list[list[int]], out_lens: list[int]) -> dict[str, Any]:
    res: dict[str, Any] = {"transformers_static_tok_s": hf_static(model, prompts, out_lens)}
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=None)
        _sync()
        start = time.perf_counter()
        # Not under inference_mode: its paged cache updates tensors in place (it uses no_grad).
        results = model.generate_batch(inputs=prompts, generation_config=gen)
        _sync()
        wall = time.perf_counter() - start
        got = [len(r.generated_tokens) for r in results.values()]
        if len(got) != len(prompts) or min(got) < max(out_lens):
            raise RuntimeError(f"generate_batch returned {len(got)} results, shortest {min(got, default=0)} tokens")
        res["transformers_generate_batch_tok_s"] = round(sum(out_lens) / wall, 1)
    except Exception as exc:  # an API difference across transformers versions: say so, keep going
        res["transformers_generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return res


def prefill(eng: Any, cfg: Any, ceilings: dict[str, Any]) -> dict[str, Any]:
    n = 4096
    run_requests(eng, random_prompts(1, [n], cfg.vocab_size, seed=50), [1], "warm-pf")
    flush(eng)
    ttfts = []
    for k in range(5):
        timed, _ = run_requests(eng, random_prompts(1, [n], cfg.vocab_size, seed=51 + k), [1], f"pf{k}")
        ttfts.append(timed[0].ttft)
    t = statistics.median(ttfts)
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * n * n / 2  # causal
    flops = 2 * matmul_params(cfg) * n + attn
    rate = flops / t
    return {
        "tokens": n,
        "ttft_s": round(t, 4),
        "model_tflops": round(rate / 1e12, 1),
        "share_of_matmul_rate": round(rate / (ceilings["bf16_matmul_tflops"] * 1e12), 3),
    }


def radix(eng: Any, cfg: Any) -> dict[str, Any]:
    prefix = random_prompts(1, [2048], cfg.vocab_size, seed=61)[0]
    suffixes = random_prompts(32, [32], cfg.vocab_size, seed=62)
    flush(eng)
    run_requests(eng, [prefix + [7] * 16], [1], "rx-warm")  # the prefix enters the cache (if on)
    # A first hit compiles the kernels of an extend over a cached prefix; the timed run must not.
    run_requests(eng, [prefix + [9] * 16], [2], "rx-warm-hit")
    timed, wall = run_requests(eng, [prefix + s for s in suffixes], [8] * 32, "rx")
    ttfts = sorted(t.ttft for t in timed)
    return {"requests": 32, "prefix": 2048, "ttft_p50_s": round(statistics.median(ttfts), 4), "wall_s": round(wall, 3)}


# --- main ---------------------------------------------------------------------------------------


def profile_decode(eng: Any, cfg: Any, ceilings: dict[str, Any]) -> dict[str, Any]:
    """Where a decode step's time goes: GPU time of the graph, host time to feed it, the top
    kernels of an eager step."""
    runner = eng.runner

    def work() -> dict[str, Any]:
        pool = runner.kv_pool
        ps = pool.page_size
        eng.scheduler.flush_cache()  # the cache's pages go back to the pool for this probe
        res: dict[str, Any] = {}
        for bs, ctx in ((1, 1024), (64, 640)):
            pages = [pool.alloc(-(-ctx // ps)) for _ in range(bs)]
            try:
                pos = ctx - 1
                batch = ForwardBatch(
                    mode=ForwardMode.DECODE,
                    input_ids=torch.randint(100, 1000, (bs,)),
                    positions=torch.full((bs,), pos),
                    out_cache_loc=torch.tensor([p[pos // ps] * ps + pos % ps for p in pages]),
                    extend_lens=[1] * bs,
                    prefix_lens=[pos] * bs,
                    kv_indices=[],
                    return_all_logits=[False] * bs,
                    page_table=pages,
                )
                g = runner.graphs
                entry: dict[str, Any] = {}
                if g is not None:
                    g.replay(batch)
                    gbs = next(s for s in g.sizes if s >= bs)
                    entry["graph_gpu_ms"] = round(_time_cuda(lambda: g._graphs[gbs].replay(), 20) * 1e3, 3)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(20):
                        g.replay(batch)
                    entry["host_prep_launch_ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
                    torch.cuda.synchronize()
                    entry["replay_loop_ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        runner.attn_backend.prepare(batch)
                        runner.model.forward(
                            batch.input_ids.cuda(), batch.positions.cuda(), runner.attn_backend, None
                        )
                    torch.cuda.synchronize()
                entry["kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=16)
                res[f"bs{bs}_ctx{ctx}"] = entry
            finally:
                for p in pages:
                    pool.free(p)
        return res

    out = eng.run_in_loop(work).result()
    for key, entry in out.items():
        print(f"--- profile {key}: { {k: v for k, v in entry.items() if k != 'kernels'} }")
        print(entry.pop("kernels"))
    return out


def noise_floor(
    model: Any, cfg: Any, n_prompts: int = 32, new_tokens: int = 32,
    logits_out: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """transformers against itself: its eager attention vs its SDPA attention on the same weights.
    How far two correct bf16 implementations drift apart on these weights."""
    lens = CORRECTNESS_LENS
    prompts = correctness_prompts(cfg, n_prompts)
    outs: dict[str, dict[int, list[int]]] = {}
    logits: dict[str, list[torch.Tensor]] = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        outs[impl], logits[impl] = {}, []
        with torch.inference_mode():
            for length in lens:
                idx = [i for i, p in enumerate(prompts) if len(p) == length]
                ids = torch.tensor([prompts[i] for i in idx], device=DEVICE)
                gen = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                )
                for row, i in enumerate(idx):
                    outs[impl][i] = gen[row, length:].tolist()
            for p in logit_prompts(prompts):
                logits[impl].append(model(torch.tensor([p], device=DEVICE)).logits[0, -1].float().cpu())
    model.set_attn_implementation("sdpa")
    if logits_out is not None:
        logits_out["transformers_eager"] = logits["eager"]
    same = [outs["sdpa"][i] == outs["eager"][i] for i in range(n_prompts)]
    rel = [rel_err(a, b) for a, b in zip(logits["eager"], logits["sdpa"])]
    return {"exact_match_share": sum(same) / n_prompts, "logits_rel_err_max": max(rel)}


# --- random weights with a trained model's margins ---------------------------------------------
#
# With transformers' own initialisation the next-token logits of a random model are 128k draws of
# one Gaussian: the top two are a few hundredths of a standard deviation apart, and bf16 rounding
# flips greedy choices within a few tokens, between transformers' own eager and SDPA attention as
# much as against us (0% of prompts agree on 32 tokens on the 8B shape). A trained model's greedy
# choice usually wins by a wide margin. These weights give a random model that property, keeping
# its shapes and its layers' share of the logits:
#   - the output projections of every block (o_proj, down_proj) are scaled by 1/sqrt(2 * layers)
#     (GPT-2's residual scaling), so the residual stream does not grow layer after layer;
#   - the token embeddings are scaled up, so each position's residual stream still carries its
#     own token after the last layer;
#   - each token x has a successor pi(x) (a random permutation): the unembedding row of pi(x)
#     gains x's embedding direction, sized so that pi(x) scores MARGIN standard deviations of the
#     random logits above zero. The random logits' own maximum over 128k tokens is about 4.8
#     standard deviations, so at a margin near that the layers still decide a share of tokens.
# The lm_head is untied (Qwen3-0.6B ties it): a tied head can only score the current token.
# Reported beside the result: how many of transformers' tokens are pi(previous token), and how far
# the logits move when the layers' output is left out (what the logits check actually covers).


# Per shape, the embedding scale at which the layers move the logits by about the same share
# (15% on the Qwen3-0.6B shape, 18% on the 8B shape), so the logits bound checks both to the
# same depth. The 8B shape's layers write four times as wide a residual stream and need a larger
# scale for that. At larger layer shares every bf16 implementation, transformers' two included,
# drifts further than 1e-2 from the others on the 8B shape (docs/benchmarks.md has the sweep).
CONDITIONING = {"llama3-8b": "480:7", "qwen3-0.6b": "60:7"}


@dataclass
class Conditioning:
    embed_scale: float
    margin: float


def condition_weights(model: Any, cfg: Any, c: Conditioning, seed: int = 7) -> tuple[torch.Tensor, dict[str, Any]]:
    """Scale and plant as described above, in place; returns the successor permutation."""
    layers = cfg.num_hidden_layers
    head = model.lm_head.weight
    emb = model.get_input_embeddings().weight
    assert head.data_ptr() != emb.data_ptr(), "build the model with untie=True"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.div_((2 * layers) ** 0.5)
        emb.mul_(c.embed_scale)
        # How strongly the last position's final hidden state points along its token's
        # embedding, and the random logits' spread: together they size the planted rows.
        prompts = random_prompts(8, CORRECTNESS_LENS, cfg.vocab_size, seed=3)
        along, spread = [], []
        for p in prompts:
            ids = torch.tensor([p], device=DEVICE)
            hidden = model.model(ids).last_hidden_state[0, -1].float()
            last = emb[p[-1]].float()
            along.append(float(hidden @ last / last.norm()))
            spread.append(float((head @ hidden.to(head.dtype)).float().std()))
        beta = c.margin * statistics.mean(spread) / statistics.mean(along)
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        perm = torch.randperm(cfg.vocab_size, generator=g, device=DEVICE)
        units = emb.float()
        units /= units.norm(dim=1, keepdim=True)
        head[perm] += (beta * units).to(head.dtype)
        del units
    stats = {"embed_scale": c.embed_scale, "margin_sigmas": c.margin, "planted_row_norm": round(beta, 3)}
    return perm, stats


def layer_share(model: Any, cfg: Any) -> float:
    """min over prompts of ||logits - logits of the embedding alone|| / ||logits||: how much of
    the logits the 32 (or 28) layers decide, so what a logits error bound actually checks."""
    prompts = correctness_prompts(cfg, 8)
    shares = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=DEVICE)
            full = model(ids).logits[0, -1].float()
            alone = model.lm_head(model.model.norm(model.get_input_embeddings()(ids[:, -1:])))[0, -1].float()
            shares.append(float((full - alone).norm() / full.norm()))
    return min(shares)


def conditioned_check(shape: str, c: Conditioning) -> dict[str, Any]:
    gc.collect()
    torch.cuda.empty_cache()
    model, cfg = build_hf_model(shape, seed=2, untie=True)
    perm, res = condition_weights(model, cfg, c)
    logits: dict[str, list[torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(model, cfg, Path(tmp), cuda_graph_max_bs=32, mem_fraction_static=0.3)
        try:
            ref: dict[int, list[int]] = {}
            res["correctness"] = correctness(eng, model, cfg, ref_out=ref, logits_out=logits)
        finally:
            eng.shutdown()
    prompts = correctness_prompts(cfg)
    pairs = [(([p[-1]] + ref[i])[k], ref[i][k]) for i, p in enumerate(prompts) for k in range(len(ref[i]))]
    succ = perm.cpu()
    res["successor_share"] = round(sum(int(succ[a]) == b for a, b in pairs) / len(pairs), 3)
    res["layer_share_of_logits"] = round(layer_share(model, cfg), 3)
    res["transformers_eager_vs_sdpa"] = noise_floor(model, cfg, logits_out=logits)
    res["first_step_logits_vs_fp32"] = fp32_reference(model, cfg, logits)
    del model, eng
    gc.collect()
    torch.cuda.empty_cache()
    return res


def fp32_reference(model: Any, cfg: Any, logits: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Each bf16 implementation's first-step logits against the exact function of the same
    weights: transformers run in float32 (the model is upcast in place, so this comes last).
    Tells whether a gap between two bf16 implementations is either one's rounding."""
    model.float()
    prompts = logit_prompts(correctness_prompts(cfg))
    with torch.inference_mode():
        exact = [model(torch.tensor([p], device=DEVICE)).logits[0, -1].float().cpu() for p in prompts]
    return {
        name: round(max(rel_err(got, want) for got, want in zip(rows, exact)), 5)
        for name, rows in logits.items()
    }


@contextlib.contextmanager
def overlap_off(eng: Any) -> Iterator[None]:
    """Run as with --disable-overlap-schedule, on the same engine (switched while idle)."""
    cfg = eng.scheduler.config
    was = cfg.overlap_schedule

    def set_to(value: bool) -> None:
        assert not eng.scheduler.has_work
        cfg.overlap_schedule = value

    eng.run_in_loop(lambda: set_to(False)).result()
    try:
        yield
    finally:
        eng.run_in_loop(lambda: set_to(was)).result()


def fp32_check(shape: str) -> dict[str, Any]:
    """Both frameworks in float32 on the same random weights: rounding no longer hides a real
    difference, so tokens and logits must agree closely (CUDA graphs, Triton kernels included)."""
    gc.collect()
    torch.cuda.empty_cache()
    model, cfg = build_hf_model(shape, seed=1, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(model, cfg, Path(tmp), dtype="float32", cuda_graph_max_bs=32, mem_fraction_static=0.3)
        try:
            res = correctness(eng, model, cfg)
        finally:
            eng.shutdown()
    del model, eng
    torch.cuda.empty_cache()
    return res


def embeddings(eng: Any, model: Any, cfg: Any) -> dict[str, Any]:
    import asyncio

    import torch.nn.functional as F

    from armature.engine.api import EncodeRequest

    rng = random.Random(11)
    prompts = [[rng.randrange(10, cfg.vocab_size) for _ in range(rng.randint(64, 512))] for _ in range(256)]

    async def together(tag: str) -> list[list[float]]:
        outs = await asyncio.gather(*(eng.encode(EncodeRequest(f"{tag}-{i}", p)) for i, p in enumerate(prompts)))
        return [o.embedding for o in outs]

    async def one_by_one(tag: str) -> None:
        for i, p in enumerate(prompts):
            await eng.encode(EncodeRequest(f"{tag}-{i}", p))

    asyncio.run(together("warm"))
    _sync()
    t0 = time.perf_counter()
    ours = asyncio.run(together("timed"))
    shared_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    asyncio.run(one_by_one("serial"))
    serial_s = time.perf_counter() - t0

    def hf_batch(batch: list[list[int]]) -> torch.Tensor:
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64, device=DEVICE)
        mask = torch.zeros(len(batch), width, dtype=torch.int64, device=DEVICE)
        for i, p in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p, device=DEVICE)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        return F.normalize(h.float(), dim=-1)

    hf_batch(prompts[:32])
    _sync()
    t0 = time.perf_counter()
    ref = torch.cat([hf_batch(prompts[i : i + 32]) for i in range(0, len(prompts), 32)])
    _sync()
    hf_s = time.perf_counter() - t0
    got = torch.tensor(ours, device=DEVICE)
    cos = (got * ref).sum(-1)
    n = len(prompts)
    return {
        "inputs": n,
        "cosine_vs_transformers_min": round(float(cos.min()), 5),
        "cosine_vs_transformers_mean": round(float(cos.mean()), 5),
        "inputs_per_s_shared": round(n / shared_s, 1),
        "inputs_per_s_one_by_one": round(n / serial_s, 1),
        "inputs_per_s_transformers_batch32": round(n / hf_s, 1),
    }


def run_shape(shape: str, sections: set[str], ceilings: dict[str, Any], hf_tp: bool) -> dict[str, Any]:
    if not sections & {"correctness", "decode", "prefill", "throughput", "radix", "profile", "embeddings"}:
        return {}
    log(f"{shape}: building random bf16 weights on the GPU")
    model, cfg = build_hf_model(shape, seed=0)
    wbytes = weight_bytes(model)
    res: dict[str, Any] = {"weight_gb": round(wbytes / 1e9, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        eng = make_engine(model, cfg, Path(tmp))
        res["engine_start_s"] = round(time.perf_counter() - t0, 1)
        log(f"{shape}: engine ready in {res['engine_start_s']}s")
        try:
            if "correctness" in sections:
                res["correctness"] = correctness(eng, model, cfg)
                res["transformers_eager_vs_sdpa"] = noise_floor(model, cfg)
                log(f"{shape}: bf16 ours vs transformers {res['correctness']}; "
                    f"transformers eager vs sdpa {res['transformers_eager_vs_sdpa']}")
            if "embeddings" in sections:
                res["embeddings"] = embeddings(eng, model, cfg)
                log(f"{shape}: embeddings {res['embeddings']}")
            if shape == "llama3-8b":
                if "decode" in sections:
                    res["decode_b1"] = decode_batch1(eng, cfg, ceilings, wbytes)
                    with overlap_off(eng):
                        res["decode_b1_no_overlap"] = decode_batch1(eng, cfg, ceilings, wbytes)
                    log(f"decode b1 {res['decode_b1']} without overlap {res['decode_b1_no_overlap']}")
                if "prefill" in sections:
                    res["prefill"] = prefill(eng, cfg, ceilings)
                    log(f"prefill {res['prefill']}")
                if "throughput" in sections:
                    res["throughput"] = throughput(eng, cfg, ceilings, wbytes, model if hf_tp else None)
                    with overlap_off(eng):
                        res["throughput_no_overlap"] = throughput(eng, cfg, ceilings, wbytes, None)
                    log(f"throughput {res['throughput']} without overlap {res['throughput_no_overlap']}")
                if "radix" in sections:
                    res["radix_on"] = radix(eng, cfg)
                if "profile" in sections:
                    try:
                        res["profile"] = profile_decode(eng, cfg, ceilings)
                    except Exception as exc:  # a diagnostic: never lose the measured bars to it
                        import traceback

                        traceback.print_exc()
                        res["profile_error"] = repr(exc)
        finally:
            eng.shutdown()
        if shape == "llama3-8b" and "radix" in sections:
            del eng
            gc.collect()
            torch.cuda.empty_cache()
            eng = make_engine(model, cfg, Path(tmp), disable_radix_cache=True)
            try:
                res["radix_off"] = radix(eng, cfg)
            finally:
                eng.shutdown()
            res["radix_ttft_gain"] = round(res["radix_off"]["ttft_p50_s"] / res["radix_on"]["ttft_p50_s"], 2)
            log(f"radix on {res['radix_on']} off {res['radix_off']}")
    del model, eng
    gc.collect()
    torch.cuda.empty_cache()
    return res


def print_table(report: dict[str, Any]) -> None:
    c = report["device"]
    print(f"\n{c['gpu']}: copy {c['copy_bandwidth_gbs']} GB/s, bf16 matmul {c['bf16_matmul_tflops']} TFLOP/s")
    rows: list[tuple[str, str, str]] = []
    for shape, r in report["shapes"].items():
        if "correctness" in r:
            k, hf = r["correctness"], r["transformers_eager_vs_sdpa"]
            rows.append((f"{shape} bf16 greedy 32 tok == transformers", f"{k['exact_match_share']:.0%} of prompts (transformers eager vs sdpa: {hf['exact_match_share']:.0%})", ">= 90%"))
            rows.append((f"{shape} bf16 first-step logits rel err", f"{k['logits_rel_err_max']:.2e} (transformers eager vs sdpa: {hf['logits_rel_err_max']:.2e})", "<= 1e-2"))
        for k in r.get("conditioned", []):
            hf, tag = k["transformers_eager_vs_sdpa"], f"{shape} bf16, margins x{k['embed_scale']:g}/{k['margin_sigmas']:g}sd"
            rows.append((f"{tag}: greedy 32 tok == transformers", f"{k['correctness']['exact_match_share']:.0%} of prompts (transformers eager vs sdpa: {hf['exact_match_share']:.0%}; successor {k['successor_share']:.0%} of tokens)", ">= 90%"))
            rows.append((f"{tag}: first-step logits rel err", f"{k['correctness']['logits_rel_err_max']:.2e} (eager vs sdpa: {hf['logits_rel_err_max']:.2e}; layers move logits {k['layer_share_of_logits']:.0%})", "<= 1e-2"))
            if "first_step_logits_vs_fp32" in k:
                v = k["first_step_logits_vs_fp32"]
                rows.append((f"{tag}: logits rel err vs float32 transformers", ", ".join(f"{n} {e:.2e}" for n, e in v.items()), ""))
        if "correctness_fp32" in r:
            k = r["correctness_fp32"]
            rows.append((f"{shape} fp32 greedy 32 tok == transformers", f"{k['exact_match_share']:.0%} of prompts", ">= 90%"))
            rows.append((f"{shape} fp32 first-step logits rel err", f"{k['logits_rel_err_max']:.2e}", "<= 1e-2"))
        if "decode_b1" in r:
            d = r["decode_b1"]
            rows.append(("8B batch-1 decode, 1k ctx", f"{d['tok_s']} tok/s = {d['share_of_roofline']:.0%} of {d['roofline_tok_s']}", ">= 80%"))
            if "decode_b1_no_overlap" in r:
                rows.append(("  ... --disable-overlap-schedule", f"{r['decode_b1_no_overlap']['tok_s']} tok/s", "compare"))
        if "throughput" in r:
            u = r["throughput"]["uniform"]
            rows.append(("8B 64 x (512 in, 256 out)", f"{u['tok_s']} tok/s = {u['share_of_ceiling']:.0%} of {u['ceiling_tok_s']}", ">= 50%"))
            if "throughput_no_overlap" in r:
                rows.append(("  ... --disable-overlap-schedule", f"{r['throughput_no_overlap']['uniform']['tok_s']} tok/s", "compare"))
            m = r["throughput"]["mixed"]
            extra = ", ".join(f"{k.removeprefix('transformers_')} {v}" for k, v in m.items() if k.startswith("transformers_"))
            rows.append(("8B mixed 64 useful tok/s", f"ours {m['armature_tok_s']}; {extra}", "report"))
        if "prefill" in r:
            p = r["prefill"]
            rows.append(("8B prefill 4096 tok", f"{p['ttft_s']}s, {p['model_tflops']} TFLOP/s = {p['share_of_matmul_rate']:.0%}", ">= 50%"))
        if "embeddings" in r:
            e = r["embeddings"]
            rows.append((f"{shape} embeddings cosine vs transformers", f"min {e['cosine_vs_transformers_min']}, mean {e['cosine_vs_transformers_mean']}", "report"))
            rows.append((f"{shape} embeddings inputs/s (256 x 64-512 tok)", f"shared forwards {e['inputs_per_s_shared']}; one by one {e['inputs_per_s_one_by_one']}; transformers batches of 32 {e['inputs_per_s_transformers_batch32']}", "report"))
        if "radix_ttft_gain" in r:
            rows.append(("8B radix hit TTFT p50 gain", f"{r['radix_ttft_gain']}x ({r['radix_on']['ttft_p50_s']}s vs {r['radix_off']['ttft_p50_s']}s)", ">= 5x"))
    w = max(len(a) for a, _, _ in rows)
    v = max(len(b) for _, b, _ in rows)
    print(f"{'measure':<{w}}  {'result':<{v}}  bar")
    for a, b, bar in rows:
        print(f"{a:<{w}}  {b:<{v}}  {bar}")


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b,qwen3-0.6b")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--conditioning", default=None,
                    help="embed_scale:margin[,...] for the 'conditioned' correctness check (see "
                         "condition_weights); default: CONDITIONING's setting for each shape")
    ap.add_argument("--skip-hf-throughput", action="store_true", help="leave out transformers' throughput runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_engine.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_engine.py needs a CUDA GPU")
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    ceilings = device_ceilings()
    log(f"device {ceilings}")
    report: dict[str, Any] = {"device": ceilings, "date": time.strftime("%Y-%m-%d"), "shapes": {}}
    out = Path(args.out)
    for shape in args.shapes.split(","):
        report["shapes"][shape] = run_shape(shape, sections, ceilings, not args.skip_hf_throughput)
        write(report, out)
        if "conditioned" in sections:
            done = report["shapes"][shape].setdefault("conditioned", [])
            for spec in (args.conditioning or CONDITIONING[shape]).split(","):
                scale, margin = (float(x) for x in spec.split(":"))
                try:
                    done.append(conditioned_check(shape, Conditioning(scale, margin)))
                    log(f"{shape}: conditioned {done[-1]}")
                except Exception as exc:  # keep what was measured and go on
                    log(f"{shape}: conditioned {spec} failed: {exc!r}"[:500])
                write(report, out)
        if "fp32" in sections:
            try:
                report["shapes"][shape]["correctness_fp32"] = fp32_check(shape)
                log(f"{shape}: fp32 ours vs transformers {report['shapes'][shape]['correctness_fp32']}")
            except Exception as exc:  # keep the bf16 results of this shape and go on
                log(f"{shape}: fp32 check failed: {exc!r}"[:500])
                report["shapes"][shape]["fp32_error"] = repr(exc)[:500]
            write(report, out)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write(report, out)
    print_table(report)
    print(f"\nwrote {out} ({report['wall_s']}s)")


if __name__ == "__main__":
    main()
