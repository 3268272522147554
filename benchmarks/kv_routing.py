"""KV-aware routing vs round-robin, Armature and NVIDIA Dynamo 1.6.1, same run, same workload.

Each system runs 8 mocker workers and two frontends over the same workers (file discovery, TCP
request plane, ZMQ event plane, loopback only): one with ``--router-mode kv``, one with
``round-robin``. Armature's 8 workers are 8 ``python -m armature.mocker`` processes; Dynamo's
are one ``python -m dynamo.mocker --num-workers 8`` process (its engines are native code, so one
process does not make it slower). Both mockers get the same engine shape: block size 64, 512 KV
blocks per worker (32,768 tokens: about 7 of the 16 group prefixes fit on one worker, so a
worker that sees every group, as under round-robin, keeps evicting, while 2 groups per worker
fit easily — the situation KV routing exists for), ``--speedup-ratio 0.5``: the simulated prefill
of a cold 4k-token prompt (~175 ms) and of a cached one (~35 ms) dominate over the CPU work of
the frontends, the 8 worker processes and the client on this 2-core machine (the whole stack
uses about 0.4 of a core at ~18 req/s: frontend ~11 ms CPU per request, the 8 mockers ~20 ms
together; the rest of the machine's load is other users').

Workload (``armature.bench``): synthetic prefix sharing, 16 groups, 4,096-token shared prefix,
64-token private suffix, 32 output tokens (ignore_eos), streaming chat, a new connection per
request, closed loop at concurrency 32 (4 requests per worker: enough that requests of one group
run side by side on its worker and share its blocks). Every phase draws fresh prefixes (its own
seed), so no phase profits from the caches an earlier one left behind. Phases alternate between
systems and modes per round, so drifts in the machine's background load hit all alike. A phase
is 256 requests = 16 per group.

Both KV routers use their default cost (prefill weight 1.0) unless ``--overlap-weight W`` sets
the same weight for both (Armature ``--router-kv-overlap-score-weight``, Dynamo
``--router-prefill-load-scale``). On this workload weight 1.0 sits on a knife edge: a hit saves
64 prefill blocks, and one more active request of another group costs 66 decode blocks, so a
worker holding a group loses its next request to any worker running one request fewer.

    .venv/bin/python benchmarks/kv_routing.py                     # needs Dynamo's venv:
    /work/shared/anchors/dynamo-venv.sh /work/dynamo-venv
    .venv/bin/python benchmarks/kv_routing.py --systems armature  # Armature alone

The cached-share target compares the engines' reported cached share with the workload's
shareable share computed over the same token ids (the rendered chat prompt; see
``engine_shareable_share``).

Prints a table and writes benchmarks/results/kv_routing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_vs_dynamo import MODEL_NAME, System, free_port, http_get, loopback_env  # noqa: E402

from armature.bench import RunConfig, Slo, Workload, prefix_sharing, run  # noqa: E402
from armature.bench.workload import block_shareable_share  # noqa: E402
from armature.frontend.tokenizer import ModelTokenizer  # noqa: E402

MODES = ("kv", "round-robin")


class Cluster(System):
    """Worker processes and one frontend per routing mode, started and stopped together."""

    def __init__(self, name: str, cmds: dict[str, list[str]], env: dict[str, str], ports: dict[str, int], logdir: Path):
        super().__init__(name, [], [], env, 0, logdir)
        self._cmds = cmds
        self.ports = ports

    async def wait_serving(self, workers: int, timeout_s: float) -> float:
        """Until every frontend lists the model and, where /health says, sees all workers."""
        started = time.perf_counter()
        deadline = started + timeout_s
        pending = dict(self.ports)
        while pending:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name}: frontends {sorted(pending)} not ready; logs in {self._logdir}")
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.name} {role} exited with {p.returncode}; see {self._logdir}")
            for mode, port in list(pending.items()):
                try:
                    models = await http_get("127.0.0.1", port, "/v1/models")
                    health = await http_get("127.0.0.1", port, "/health")
                except (OSError, asyncio.TimeoutError):
                    continue
                if MODEL_NAME not in models:
                    continue
                body = health.partition("\r\n\r\n")[2]
                try:
                    instances = json.loads(body).get("instances")
                except ValueError:
                    instances = None
                if isinstance(instances, list) and len(instances) < workers:
                    continue
                pending.pop(mode)
            await asyncio.sleep(0.25)
        return time.perf_counter() - started


def mocker_engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--block-size", str(args.block_size), "--num-gpu-blocks-override", str(args.num_blocks),
            "--speedup-ratio", str(args.speedup)]  # fmt: skip


def kv_weight_flags(flag: str, args: argparse.Namespace) -> list[str]:
    """The prefill weight of the KV cost for one system's KV frontend; none at the default (1.0).

    Dynamo 1.6.1 calls it ``--router-prefill-load-scale`` (its ``--router-kv-overlap-score-weight``
    is a deprecated alias): ``cost = scale * max(active prefill + prompt - overlap, 0) blocks +
    decode blocks``, Armature's ``--router-kv-overlap-score-weight`` formula, so both systems get
    the same cost function either way.
    """
    return [] if args.overlap_weight == 1.0 else [flag, str(args.overlap_weight)]


def armature_cluster(args: argparse.Namespace, model_dir: Path, tmp: Path) -> Cluster:
    kv = tmp / "armature-kv"
    kv.mkdir()
    py = args.python
    plane = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    cmds: dict[str, list[str]] = {}
    ports: dict[str, int] = {}
    for i in range(args.workers):
        cmds[f"mocker-{i}"] = [py, "-m", "armature.mocker", "--model-path", str(model_dir), "--model-name", MODEL_NAME,
                               "--log-level", "warning", *mocker_engine_flags(args), *plane]  # fmt: skip
    for mode in MODES:
        port = ports[mode] = free_port()
        cmds[f"frontend-{mode}"] = [py, "-m", "armature.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                                    "--router-mode", mode, "--log-level", "warning", *plane,
                                    *(kv_weight_flags("--router-kv-overlap-score-weight", args) if mode == "kv" else [])]  # fmt: skip
    env = loopback_env("ARMATURE_FILE_KV", kv)
    env["PYTHONPATH"] = str(ROOT / "src")
    return Cluster("armature", cmds, env, ports, tmp)


def dynamo_cluster(args: argparse.Namespace, model_dir: Path, tmp: Path) -> Cluster:
    kv = tmp / "dynamo-kv"
    kv.mkdir()
    py = str(Path(args.dynamo_venv) / "bin" / "python")
    plane = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    cmds = {
        "mocker": [py, "-m", "dynamo.mocker", "--model-path", str(model_dir), "--model-name", MODEL_NAME,
                   "--num-workers", str(args.workers), *mocker_engine_flags(args), *plane],  # fmt: skip
    }
    ports: dict[str, int] = {}
    for mode in MODES:
        port = ports[mode] = free_port()
        cmds[f"frontend-{mode}"] = [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                                    "--router-mode", mode, *plane,
                                    *(kv_weight_flags("--router-prefill-load-scale", args) if mode == "kv" else [])]  # fmt: skip
    return Cluster("dynamo", cmds, loopback_env("DYN_FILE_KV", kv), ports, tmp)


def engine_shareable_share(workload: Workload, tokenizer: ModelTokenizer, block_size: int) -> float:
    """The workload's shareable share over the token ids the engines see.

    The cached share the engines report (usage ``cached_tokens / prompt_tokens``) counts the
    rendered chat prompt: SmolLM2's template adds ~30 tokens (a default system turn ahead of the
    prefix, the turn markers after the suffix), which shifts the prefix's block boundaries. The
    workload's own estimate counts prompt words only, so comparing the two would mix bases (it
    put the yardstick ~0.7 points too high). Both systems render the same template from the same
    model folder, so one computation serves both.
    """
    template = tokenizer.chat_template()
    if template is None:
        raise RuntimeError("the model has no chat template; the workload is sent as chat")
    seqs = []
    for s in workload.sessions:
        messages = [{"role": "user", "content": s.turns[0].prompt.text or ""}]  # as armature.bench sends it
        text = template.render(messages, add_generation_prompt=True)
        seqs.append(tokenizer.encode(text, add_special_tokens=False))
    return block_shareable_share(seqs, block_size)


async def phase(
    args: argparse.Namespace, cluster: Cluster, mode: str, seed: int, tokenizer: ModelTokenizer
) -> dict[str, object]:
    workload = prefix_sharing(
        args.requests, args.groups, args.prefix_len, args.suffix_len, args.output_len, seed=seed,
        block_size=args.block_size,
    )  # fmt: skip
    prompt_only_share = workload.shareable_share
    workload.shareable_share = engine_shareable_share(workload, tokenizer, args.block_size)
    cfg = RunConfig(
        url=f"http://127.0.0.1:{cluster.ports[mode]}", model=MODEL_NAME, concurrency=args.concurrency,
        new_connection=True, progress=False, slo=Slo(ttft_ms=args.slo_ttft_ms), timeout_s=120,
    )  # fmt: skip
    cpu0 = cluster.cpu_s()
    load0 = os.getloadavg()[0]
    outcome = await run(cfg, workload)
    cpu1 = cluster.cpu_s()
    rep = outcome.report
    return {
        "system": cluster.name, "mode": mode, "seed": seed, **rep.to_dict(),
        "prompt_only_shareable_share": prompt_only_share,
        "loadavg_1m": [load0, os.getloadavg()[0]],
        "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1},
    }  # fmt: skip


def _median(xs: list[float]) -> float:
    ys = sorted(x for x in xs if x is not None)
    if not ys:
        return float("nan")
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def summarize(results: list[dict[str, object]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        out.setdefault(str(r["system"]), {}).setdefault(str(r["mode"]), {})
    for system, modes in out.items():
        for mode in modes:
            rs = [r for r in results if r["system"] == system and r["mode"] == mode]
            modes[mode] = {
                "ttft_p50_ms": _median([r["ttft_ms"]["p50"] for r in rs]),  # type: ignore[index]
                "ttft_p90_ms": _median([r["ttft_ms"]["p90"] for r in rs]),  # type: ignore[index]
                "itl_mean_ms": _median([r["itl_ms"]["mean"] for r in rs]),  # type: ignore[index]
                "e2e_p50_ms": _median([r["e2e_ms"]["p50"] for r in rs]),  # type: ignore[index]
                "req_per_s": _median([r["request_throughput"] for r in rs]),  # type: ignore[misc]
                "errors": sum(int(r["errors"]) + int(r["rejections"]) for r in rs),  # type: ignore[call-overload]
                "cached_share": _median([r["cached_token_share"] for r in rs]),  # type: ignore[misc]
                "shareable_share": _median([r["shareable_share"] for r in rs]),  # type: ignore[misc]
            }
    return out


def print_table(summary: dict[str, dict[str, dict[str, float]]]) -> None:
    head = f"{'system':<9} {'mode':<12} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL':>7} {'E2E p50':>8} {'req/s':>7} {'err':>4} {'cached':>7} {'shareable':>9}"
    print(head)
    print("-" * len(head))
    for system, modes in summary.items():
        for mode, m in modes.items():
            cached = "n/a" if m["cached_share"] != m["cached_share"] else f"{m['cached_share']:.1%}"
            print(
                f"{system:<9} {mode:<12} {m['ttft_p50_ms']:9.1f} {m['ttft_p90_ms']:9.1f} {m['itl_mean_ms']:7.2f} "
                f"{m['e2e_p50_ms']:8.1f} {m['req_per_s']:7.1f} {int(m['errors']):4d} {cached:>7} {m['shareable_share']:9.1%}"
            )


def verdict(summary: dict[str, dict[str, dict[str, float]]]) -> tuple[dict[str, float], list[str]]:
    ratios: dict[str, float] = {}
    lines: list[str] = []
    for system, modes in summary.items():
        if "kv" in modes and "round-robin" in modes:
            kv, rr = modes["kv"], modes["round-robin"]
            ratios[f"{system}_ttft_p50_gain"] = rr["ttft_p50_ms"] / kv["ttft_p50_ms"]
            ratios[f"{system}_throughput_ratio"] = kv["req_per_s"] / rr["req_per_s"]
    a = summary.get("armature", {})
    if "armature_ttft_p50_gain" in ratios:
        g = ratios["armature_ttft_p50_gain"]
        lines.append(f"Armature TTFT p50 gain (round-robin / kv): {g:.2f}x (target >= 2x): {'MET' if g >= 2 else 'NOT MET'}")
        t = ratios["armature_throughput_ratio"]
        lines.append(f"Armature throughput kv / round-robin: {t:.2f} (target >= 1): {'MET' if t >= 1 else 'NOT MET'}")
        errs = int(a["kv"]["errors"] + a["round-robin"]["errors"])
        lines.append(f"Armature errors: {errs} (target 0): {'MET' if errs == 0 else 'NOT MET'}")
        c, s = a["kv"]["cached_share"], a["kv"]["shareable_share"]
        ok = c == c and c >= 0.9 * s
        lines.append(f"Armature kv cached-token share {c:.1%} vs 90% of shareable {0.9 * s:.1%}: {'MET' if ok else 'NOT MET'}")
    if "dynamo_ttft_p50_gain" in ratios and "armature_ttft_p50_gain" in ratios:
        ga, gd = ratios["armature_ttft_p50_gain"], ratios["dynamo_ttft_p50_gain"]
        lines.append(f"TTFT gain Armature {ga:.2f}x vs Dynamo {gd:.2f}x (target >=): {'MET' if ga >= gd else 'NOT MET'}")
    return ratios, lines


async def bench(args: argparse.Namespace) -> int:
    from armature.engine.loader import resolve_model_path

    model_dir = Path(args.model_path) if args.model_path else resolve_model_path(None)
    tmp = Path(tempfile.mkdtemp(prefix="kv-routing-"))
    tokenizer = ModelTokenizer.from_dir(model_dir)
    clusters: list[Cluster] = []
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if name == "armature":
            clusters.append(armature_cluster(args, model_dir, tmp))
        elif name == "dynamo":
            if not (Path(args.dynamo_venv) / "bin" / "python").exists():
                print(f"no Dynamo venv at {args.dynamo_venv}; build it with /work/shared/anchors/dynamo-venv.sh")
                return 2
            clusters.append(dynamo_cluster(args, model_dir, tmp))
        else:
            print(f"unknown system {name!r} (armature, dynamo)")
            return 2
    results: list[dict[str, object]] = []
    load_before = os.getloadavg()
    try:
        for c in clusters:
            c.start()
        for c in clusters:
            took = await c.wait_serving(args.workers, args.start_timeout)
            print(f"{c.name}: serving after {took:.1f} s (ports {c.ports}, logs in {tmp})", flush=True)
        await asyncio.sleep(2.0)  # let late workers' KV subscriptions settle
        for c in clusters:  # warm-up: lazy imports and connection pools, on prefixes never reused
            for mode in MODES:
                warm = argparse.Namespace(**{**vars(args), "requests": 16})
                await phase(warm, c, mode, 10_000 + MODES.index(mode), tokenizer)
        seed = 0
        for rnd in range(args.rounds):
            order = [(c, m) for c in clusters for m in MODES]
            if rnd % 2:
                order.reverse()
            for c, mode in order:
                seed += 1
                r = await phase(args, c, mode, seed, tokenizer)
                results.append(r)
                ttft = r["ttft_ms"] or {}  # type: ignore[assignment]
                p50, p90 = ttft.get("p50") or float("nan"), ttft.get("p90") or float("nan")  # type: ignore[union-attr]
                print(
                    f"round {rnd} {c.name:<9} {mode:<12} {r['ok']}/{r['requests']} ok  "
                    f"TTFT p50 {p50:7.1f} ms  p90 {p90:7.1f} ms  "
                    f"{r['request_throughput']:6.1f} req/s  cached {r['cached_token_share']}  "
                    f"load {r['loadavg_1m'][0]:.1f}->{r['loadavg_1m'][1]:.1f}"  # type: ignore[index]
                    + (f"  errors {r['error_samples']}" if r["error_samples"] else ""),
                    flush=True,
                )
    finally:
        for c in clusters:
            c.stop()
    summary = summarize(results)
    print(f"\nKV cost prefill weight {args.overlap_weight} (both systems)")
    print_table(summary)
    ratios, lines = verdict(summary)
    print()
    for line in lines:
        print(line)
    load_after = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    out = ROOT / "benchmarks" / "results" / "kv_routing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "load_before": load_before, "load_after": load_after,
        "args": {k: v for k, v in vars(args).items()}, "summary": summary, "ratios": ratios, "verdict": lines,
        "phases": results,
    }, indent=2, default=str))  # fmt: skip
    print(f"wrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="armature,dynamo")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--speedup", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per mocker worker")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=4096)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--requests", type=int, default=256, help="requests per phase")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slo-ttft-ms", type=float, default=100.0)
    p.add_argument("--overlap-weight", type=float, default=1.0,
                   help="prefill weight of both systems' KV cost (default 1.0, both systems' default)")
    p.add_argument("--model-path", default=None, help="HF folder with tokenizer + chat template (default: SmolLM2's)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dynamo-venv", default="/work/dynamo-venv")
    p.add_argument("--start-timeout", type=float, default=180.0)
    args = p.parse_args()
    try:
        import uvloop

        return int(uvloop.run(bench(args)))
    except ImportError:
        return asyncio.run(bench(args))


if __name__ == "__main__":
    raise SystemExit(main())
