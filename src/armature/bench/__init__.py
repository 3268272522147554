"""``armature bench``: a load generator for any OpenAI-compatible endpoint (docs/bench.md)."""

from __future__ import annotations

from armature.bench.client import RequestResult, StreamingClient
from armature.bench.report import BenchReport, Distribution, Slo, format_report, summarize
from armature.bench.runner import RunConfig, RunOutcome, run
from armature.bench.workload import Workload, mooncake_trace, multi_turn, prefix_sharing, read_mooncake_trace

__all__ = [
    "BenchReport", "Distribution", "RequestResult", "RunConfig", "RunOutcome", "Slo", "StreamingClient",
    "Workload", "format_report", "mooncake_trace", "multi_turn", "prefix_sharing", "read_mooncake_trace",
    "run", "summarize",
]  # fmt: skip
