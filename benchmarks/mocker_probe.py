"""Controlled experiments on a mocker's timing model, through its HTTP frontend: Armature vs Dynamo.

Dynamo's mocker is closed Rust in the wheel, so what its timing model does is measured, not read.
Each system runs as frontend + mocker worker (file discovery, TCP request plane, loopback), at
``--speedup-ratio 1`` so the simulated times (milliseconds to a tenth of a second) dwarf the
HTTP and scheduling overheads. Every prompt starts with a unique nonce so no prefix-cache hit
shortens a prefill. Four experiments:

1. ``ttft``: one request at a time, prompts of growing length, ``max_tokens`` 2: TTFT against
   the prefill polynomial ``prefill_ms(n)``.
2. ``blocks``: one stream (a ~2000-token prompt, 64 new tokens) with ``--num-gpu-blocks-override``
   16384 and 256: the median ITL against ``decode_ms(p)`` for the two readings of ``p``
   (active blocks / total blocks, or active tokens / 16384).
3. ``burst``: eight ~1000-token prompts at once: the first is admitted alone, the other seven
   wait and are prefilled together; is that step priced ``prefill_ms(7 n)`` or ``7 prefill_ms(n)``?
4. ``overlap``: one long stream (short prompt, 300 new tokens) while another client sends
   ~4000-token prompts back to back: does a prefill stretch the running stream's decode steps
   (ITL jumps by ``prefill_ms``) or not?

    .venv/bin/python benchmarks/mocker_probe.py [--systems armature,dynamo] [--experiments ttft,blocks,overlap]

Prints a table per experiment and writes benchmarks/results/mocker_probe.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_vs_dynamo import MODEL_NAME, System, free_port, loopback_env  # noqa: E402

from armature.mocker.timing import PolynomialTiming  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
_nonce = itertools.count()


@dataclass
class Stream:
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    itls_ms: list[float] = field(default_factory=list)
    tokens: int = 0


def _prompt(words: int) -> str:
    # A fresh nonce first: no two prompts share a first KV block, so nothing hits the prefix cache.
    return f"{next(_nonce)} {os.getpid()} " + "sea " * words


async def stream(client: httpx.AsyncClient, port: int, words: int, max_tokens: int) -> Stream:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": _prompt(words)}],
        "stream": True,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    }
    out = Stream()
    t0 = time.perf_counter()
    last: float | None = None
    async with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out.prompt_tokens = chunk["usage"]["prompt_tokens"]
            if not any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                continue
            out.tokens += 1
            if last is None:
                out.ttft_ms = (now - t0) * 1e3
            else:
                out.itls_ms.append((now - last) * 1e3)
            last = now
    return out


def make_system(name: str, extra: list[str], tmp: Path, model_dir: Path, venv: Path) -> System:
    port = free_port()
    kv = Path(tempfile.mkdtemp(prefix=f"{name}-kv-", dir=tmp))
    plane = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    common = ["--model-path", str(model_dir), "--model-name", MODEL_NAME, "--speedup-ratio", "1", *extra, *plane]
    if name == "armature":
        py = str(ROOT / ".venv" / "bin" / "python")
        frontend = [py, "-m", "armature.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                    "--log-level", "warning", *plane]  # fmt: skip
        mocker = [py, "-m", "armature.mocker", *common, "--log-level", "warning"]
        env = loopback_env("ARMATURE_FILE_KV", kv)
        env["PYTHONPATH"] = str(ROOT / "src")
    else:
        py = str(venv / "bin" / "python")
        frontend = [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port), *plane]
        mocker = [py, "-m", "dynamo.mocker", *common]
        env = loopback_env("DYN_FILE_KV", kv)
    return System(name, frontend, mocker, env, port, tmp)


async def with_system(name: str, extra: list[str], args: argparse.Namespace, tmp: Path, fn):  # type: ignore[no-untyped-def]
    system = make_system(name, extra, tmp, args.model_dir, args.dynamo_venv)
    system.start()
    try:
        await system.wait_ready(MODEL_NAME, 120)
        async with httpx.AsyncClient(timeout=60) as client:
            await stream(client, system.port, 8, 4)  # warm-up
            return await fn(client, system.port)
    finally:
        system.stop()


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def exp_ttft(name: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, float]]:
    async def body(client: httpx.AsyncClient, port: int) -> list[dict[str, float]]:
        rows = []
        for words in (16, 1000, 2000, 4000, 6500):
            ttfts, n = [], 0
            for _ in range(5):
                s = await stream(client, port, words, 2)
                ttfts.append(s.ttft_ms)
                n = s.prompt_tokens
            rows.append({"prompt_tokens": n, "ttft_ms": _med(ttfts), "prefill_model_ms": PolynomialTiming().prefill_ms(n)})
        return rows

    return await with_system(name, [], args, tmp, body)


async def exp_blocks(name: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, float]]:
    rows = []
    t = PolynomialTiming()
    for blocks in (16384, 256):

        async def body(client: httpx.AsyncClient, port: int, blocks: int = blocks) -> dict[str, float]:
            s = await stream(client, port, 2000, 64)
            active = -(-(s.prompt_tokens + 32) // 64)  # blocks held mid-stream (block size 64)
            return {
                "num_gpu_blocks": blocks,
                "prompt_tokens": s.prompt_tokens,
                "itl_median_ms": _med(s.itls_ms),
                "model_p_blocks_ms": t.decode_ms(active / blocks),
                "model_p_tokens_ms": t.decode_ms(active * 64 / 16384),
            }

        rows.append(await with_system(name, ["--num-gpu-blocks-override", str(blocks)], args, tmp, body))
    return rows


async def exp_overlap(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    async def body(client: httpx.AsyncClient, port: int) -> dict[str, float]:
        done = asyncio.Event()
        prefills: list[Stream] = []

        async def long_prompts() -> None:
            await asyncio.sleep(0.2)
            while not done.is_set():
                prefills.append(await stream(client, port, 4000, 1))

        bg = asyncio.create_task(long_prompts())
        s = await stream(client, port, 8, 300)
        done.set()
        await bg
        itls = sorted(s.itls_ms)
        pt = _med([p.prompt_tokens for p in prefills])
        return {
            "stream_tokens": s.tokens,
            "prefills_during_stream": len(prefills),
            "prefill_prompt_tokens": pt,
            "prefill_model_ms": PolynomialTiming().prefill_ms(int(pt)),
            "prefill_ttft_median_ms": _med([p.ttft_ms for p in prefills]),
            "itl_median_ms": _med(itls),
            "itl_p99_ms": itls[int(0.99 * (len(itls) - 1))],
            "itl_max_ms": itls[-1],
            "itls_over_half_prefill": sum(x > PolynomialTiming().prefill_ms(int(pt)) / 2 for x in itls),
        }

    return await with_system(name, [], args, tmp, body)


async def exp_burst(name: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, float]]:
    """k long prompts at once: the first is admitted alone, the rest wait and share one step."""

    async def body(client: httpx.AsyncClient, port: int) -> list[dict[str, float]]:
        rows = []
        t = PolynomialTiming()
        k = 8
        for _ in range(3):
            res = await asyncio.gather(*(stream(client, port, 1000, 2) for _ in range(k)))
            n = res[0].prompt_tokens
            ttfts = sorted(r.ttft_ms for r in res)
            # The later group's TTFT minus the first one's: the step that prefilled the group.
            late = [x for x in ttfts if x > ttfts[0] + t.prefill_ms(n) / 2]
            rows.append({
                "simultaneous": k, "prompt_tokens": n, "first_ttft_ms": ttfts[0], "group_size": len(late),
                "group_step_ms": _med(late) - ttfts[0] if late else 0.0,
                "model_one_prefill_ms": t.prefill_ms(len(late) * n) + t.decode_ms(0.0),
                "model_per_request_ms": len(late) * t.prefill_ms(n) + t.decode_ms(0.0),
            })  # fmt: skip
            await asyncio.sleep(0.2)
        return rows

    return await with_system(name, [], args, tmp, body)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="mocker-probe-"))
    out: dict[str, object] = {"load_average_before": os.getloadavg()}
    exps = {"ttft": exp_ttft, "blocks": exp_blocks, "overlap": exp_overlap, "burst": exp_burst}
    for exp in args.experiments.split(","):
        for name in args.systems.split(","):
            res = await exps[exp](name, args, tmp)
            out[f"{exp}/{name}"] = res
            rows = res if isinstance(res, list) else [res]
            print(f"\n== {exp} / {name}")
            keys = list(rows[0])
            print(" ".join(f"{k:>22}" for k in keys))
            for r in rows:
                print(" ".join(f"{r[k]:>22.2f}" if isinstance(r[k], float) else f"{r[k]:>22}" for k in keys))
    out["load_average_after"] = os.getloadavg()
    return out


def main() -> int:
    from armature.engine.loader import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="armature,dynamo")
    ap.add_argument("--experiments", default="ttft,burst,blocks,overlap")
    ap.add_argument("--dynamo-venv", type=Path, default=Path("/work/dynamo-venv"))
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "mocker_probe.json")
    args = ap.parse_args()
    args.model_dir = Path(args.model_path) if args.model_path else resolve_model_path(None)
    res = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
