"""``python -m armature.planner`` flags (Dynamo's planner field names, as flags)."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from armature.runtime.runtime import RuntimeSettings


@dataclass
class PlannerConfig:
    namespace: str
    environment: str  # local | virtual
    mode: str  # agg | decode
    component: str
    worker_command: list[str]
    metrics_url: str | None
    metrics_prefix: str
    model_name: str | None
    ttft_s: float
    itl_s: float
    interval_s: float
    samples: int
    window: int
    min_observations: int
    down_sensitivity: float
    min_endpoint: int
    max_replicas: int | None
    settle_timeout_s: float
    no_operation: bool
    log_dir: Path
    runtime: RuntimeSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m armature.planner",
        description="Scale a namespace's workers to keep TTFT and ITL within an SLA, from live load "
        "(the event plane) and latency (the frontend's per-worker gauges).",
    )
    p.add_argument("--namespace", default="dynamo")
    p.add_argument(
        "--environment",
        choices=("local", "virtual"),
        default="local",
        help="local: start/stop worker processes here; virtual: publish decisions for an orchestrator",
    )
    p.add_argument(
        "--mode",
        choices=("agg", "decode"),
        default="agg",
        help="agg: aggregated workers (TTFT and ITL); decode: a disaggregated decode pool (ITL)",
    )
    p.add_argument(
        "--component", default="backend", help="the workers' component (SGLang decode/agg: backend)"
    )
    p.add_argument(
        "--worker-command",
        default=None,
        help="one worker's command line (local environment), e.g. 'python -m armature.sglang ...'",
    )
    p.add_argument(
        "--metrics-url",
        default=None,
        help="the frontend's /metrics (per-worker latency); Dynamo's load_router_metrics_url",
    )
    p.add_argument("--metrics-prefix", default="armature_frontend")
    p.add_argument("--model-name", default=None, help="only this model's latency (default: any)")
    p.add_argument("--ttft", type=float, default=500.0, help="TTFT target in ms")
    p.add_argument("--itl", type=float, default=50.0, help="ITL target in ms")
    p.add_argument("--load-adjustment-interval", type=float, default=5.0, help="seconds between decisions")
    p.add_argument("--load-metric-samples", type=int, default=10, help="samples per interval")
    p.add_argument("--load-learning-window", type=int, default=50, help="observations the regression keeps")
    p.add_argument("--load-min-observations", type=int, default=5, help="observations before any decision")
    p.add_argument(
        "--load-scaling-down-sensitivity",
        type=float,
        default=80.0,
        help="percent of the SLA load, with one worker fewer, under which to scale down",
    )
    p.add_argument("--min-endpoint", type=int, default=1, help="fewest workers")
    p.add_argument("--max-gpu-budget", type=int, default=8, help="GPUs the workers may use (-1: no limit)")
    p.add_argument("--decode-engine-num-gpu", type=int, default=1, help="GPUs per worker")
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for a scaling step to show in discovery before deciding again",
    )
    p.add_argument("--no-operation", action="store_true", help="decide and log, change nothing")
    p.add_argument("--log-dir", default="planner-logs", help="workers' logs (local environment)")
    p.add_argument("--log-level", default="info")  # fmt: skip
    RuntimeSettings.add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[PlannerConfig, str]:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.environment == "local" and not ns.worker_command and not ns.no_operation:
        parser.error("--environment local needs --worker-command (the command line of one worker)")
    for name in ("load_adjustment_interval", "ttft", "itl"):
        if getattr(ns, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if (
        ns.load_metric_samples < 1
        or ns.load_min_observations < 2
        or ns.load_learning_window < ns.load_min_observations
    ):
        parser.error(
            "need --load-metric-samples >= 1 and 2 <= --load-min-observations <= --load-learning-window"
        )
    if ns.min_endpoint < 0 or ns.decode_engine_num_gpu < 1:
        parser.error("need --min-endpoint >= 0 and --decode-engine-num-gpu >= 1")
    max_replicas = None if ns.max_gpu_budget < 0 else ns.max_gpu_budget // ns.decode_engine_num_gpu
    if max_replicas is not None and max_replicas < ns.min_endpoint:
        parser.error(
            f"--max-gpu-budget {ns.max_gpu_budget} cannot hold --min-endpoint {ns.min_endpoint} workers"
        )
    try:
        runtime = RuntimeSettings.from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = PlannerConfig(
        namespace=ns.namespace,
        environment=ns.environment,
        mode=ns.mode,
        component=ns.component,
        worker_command=shlex.split(ns.worker_command) if ns.worker_command else [],
        metrics_url=ns.metrics_url,
        metrics_prefix=ns.metrics_prefix,
        model_name=ns.model_name,
        ttft_s=ns.ttft / 1000.0,
        itl_s=ns.itl / 1000.0,
        interval_s=ns.load_adjustment_interval,
        samples=ns.load_metric_samples,
        window=ns.load_learning_window,
        min_observations=ns.load_min_observations,
        down_sensitivity=ns.load_scaling_down_sensitivity / 100.0,
        min_endpoint=ns.min_endpoint,
        max_replicas=max_replicas,
        settle_timeout_s=ns.settle_timeout,
        no_operation=ns.no_operation,
        log_dir=Path(ns.log_dir),
        runtime=runtime,
    )
    return cfg, ns.log_level
