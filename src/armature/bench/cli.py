"""``armature bench``: load an OpenAI-compatible endpoint and report latency, throughput, goodput.

    armature bench --url http://127.0.0.1:8000 --model M --concurrency 16 --num-requests 200 \\
        --workload prefix --num-prefix-groups 16 --prefix-len 1024 --suffix-len 64 --output-len 32
    armature bench --url ... --model M --request-rate 20 --duration 60 --workload multi-turn
    armature bench --url ... --model M --workload trace --trace mooncake.jsonl --time-scale 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from armature.bench.report import Slo, format_report
from armature.bench.runner import RunConfig, run
from armature.bench.workload import Workload, mooncake_trace, multi_turn, prefix_sharing, read_mooncake_trace

DEFAULT_REQUESTS = 200
# With --duration alone the workload must outlast it; this many requests are prepared.
DURATION_ONLY_REQUESTS = 20_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="armature bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000 (…/v1 is added)")
    p.add_argument("--model", required=True, help="model name to request")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests (sessions) in flight")
    load.add_argument("--request-rate", type=float, default=None,
                      help="open loop: Poisson arrivals per second ('inf': all at once); --concurrency caps it")  # fmt: skip
    load.add_argument("--num-requests", type=int, default=None, help=f"requests to send (default {DEFAULT_REQUESTS})")
    load.add_argument("--duration", type=float, default=None, help="seconds; stop starting requests after this")
    load.add_argument("--new-connection", action="store_true", help="a new TCP connection per request")
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                      help="let the model stop at EOS (default: ignore_eos so outputs have --output-len tokens)")  # fmt: skip
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=("prefix", "multi-turn", "trace"), default="prefix")
    w.add_argument("--num-prefix-groups", type=int, default=16)
    w.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens per group")
    w.add_argument("--suffix-len", type=int, default=64, help="private tokens per request")
    w.add_argument("--output-len", type=int, default=32, help="max_tokens per request")
    w.add_argument("--tokens", action="store_true",
                   help="send token-id prompts to /v1/completions (exact lengths) instead of word prompts to chat")  # fmt: skip
    w.add_argument("--token-id-range", default="1000,20000", help="token ids are drawn from [LOW, HIGH)")
    w.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="where word prompts go (token-id prompts always use completions)")  # fmt: skip
    w.add_argument("--turns", type=int, default=4, help="multi-turn: user turns per session")
    w.add_argument("--system-len", type=int, default=256, help="multi-turn: system prompt tokens")
    w.add_argument("--user-len", type=int, default=128, help="multi-turn: tokens per user turn")
    w.add_argument("--trace", type=Path, default=None, help="Mooncake JSONL trace (timestamp ms, input_length, "
                   "output_length, hash_ids; one hash id = one 512-token block)")  # fmt: skip
    w.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply timestamps by this")
    w.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("report")
    r.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    r.add_argument("--slo-itl-ms", type=float, default=None, help="goodput: mean ITL at most this")
    r.add_argument("--output-dir", type=Path, default=Path("bench-results"), help="where JSON and PNG go")
    r.add_argument("--name", default=None, help="file stem (default: workload and time)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    return p


def build_workload(ns: argparse.Namespace) -> Workload:
    low, _, high = ns.token_id_range.partition(",")
    id_range = (int(low), int(high))
    if not 0 <= id_range[0] < id_range[1]:
        raise ValueError("--token-id-range must be LOW,HIGH with 0 <= LOW < HIGH")
    n = ns.num_requests or (DURATION_ONLY_REQUESTS if ns.duration else DEFAULT_REQUESTS)
    if ns.workload == "prefix":
        return prefix_sharing(
            n, ns.num_prefix_groups, ns.prefix_len, ns.suffix_len, ns.output_len,
            seed=ns.seed, tokens=ns.tokens, token_id_range=id_range,
        )  # fmt: skip
    if ns.workload == "multi-turn":
        if ns.tokens:
            raise ValueError("--tokens does not apply to multi-turn chat")
        sessions = max(1, n // ns.turns)
        return multi_turn(sessions, ns.turns, ns.system_len, ns.user_len, ns.output_len, seed=ns.seed)
    if ns.trace is None:
        raise ValueError("--workload trace needs --trace FILE")
    records = read_mooncake_trace(ns.trace, limit=ns.num_requests)
    return mooncake_trace(records, time_scale=ns.time_scale, tokens=ns.tokens, token_id_range=id_range, seed=ns.seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        workload = build_workload(ns)
        cfg = RunConfig(
            url=ns.url, model=ns.model, concurrency=ns.concurrency, request_rate=ns.request_rate,
            duration_s=ns.duration, endpoint=ns.endpoint, api_key=ns.api_key, new_connection=ns.new_connection,
            ignore_eos=ns.ignore_eos, timeout_s=ns.timeout, slo=Slo(ns.slo_ttft_ms, ns.slo_itl_ms),
            seed=ns.seed, progress=not ns.no_progress and sys.stderr.isatty(),
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    outcome = asyncio.run(run(cfg, workload))
    print(format_report(outcome.report))
    stem = ns.name or f"{workload.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    ns.output_dir.mkdir(parents=True, exist_ok=True)
    out = ns.output_dir / f"{stem}.json"
    out.write_text(json.dumps(outcome.report.to_dict(), indent=2))
    print(f"wrote {out}")
    if not ns.no_plots:
        from armature.bench.plots import write_plots

        for path in write_plots(outcome.results, outcome.started_at, ns.output_dir, stem):
            print(f"wrote {path}")
    return 0 if outcome.report.ok > 0 else 1
