"""Turns per-request results into the numbers ``armature bench`` reports (and writes as JSON)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from armature.bench.client import RequestResult


@dataclass(frozen=True, slots=True)
class Distribution:
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            nan = math.nan
            return cls(nan, nan, nan, nan, nan, 0)
        xs = sorted(values)
        return cls(statistics.fmean(xs), percentile(xs, 50), percentile(xs, 90), percentile(xs, 99), xs[-1], len(xs))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_ms: float | None = None
    itl_ms: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > self.ttft_ms):
            return False
        if self.itl_ms is not None and r.itls_s and statistics.fmean(r.itls_s) * 1000 > self.itl_ms:
            return False
        return True


@dataclass(slots=True)
class BenchReport:
    workload: str
    requests: int
    ok: int
    errors: int
    rejections: int
    wall_s: float
    request_throughput: float  # completed requests per second
    output_token_throughput: float
    input_token_throughput: float
    ttft_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    goodput: float | None  # requests per second meeting the SLO (None without an SLO)
    slo: Slo
    cached_token_share: float | None  # cached / prompt tokens over requests that reported both
    shareable_share: float  # what an ideal prefix cache could have served
    error_samples: list[str] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        return {k: _finite(v) for k, v in d.items()}


def _finite(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def summarize(
    results: Sequence[RequestResult],
    wall_s: float,
    workload: str,
    shareable_share: float,
    slo: Slo,
    params: dict[str, object] | None = None,
) -> BenchReport:
    ok = [r for r in results if r.ok]
    rejections = sum(1 for r in results if r.rejected)
    errors = len(results) - len(ok) - rejections
    wall = max(wall_s, 1e-9)
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cached_share = (
        sum(r.cached_tokens or 0 for r in reported) / sum(r.prompt_tokens or 0 for r in reported) if reported else None
    )
    with_slo = slo.ttft_ms is not None or slo.itl_ms is not None
    samples: list[str] = []
    for r in results:
        if not r.ok and r.error and r.error not in samples:
            samples.append(r.error)
            if len(samples) >= 5:
                break
    return BenchReport(
        workload=workload,
        requests=len(results),
        ok=len(ok),
        errors=errors,
        rejections=rejections,
        wall_s=wall_s,
        request_throughput=len(ok) / wall,
        output_token_throughput=sum(r.output_tokens for r in ok) / wall,
        input_token_throughput=sum(r.prompt_tokens or 0 for r in ok) / wall,
        ttft_ms=Distribution.of([r.ttft_s * 1000 for r in ok if r.ttft_s is not None]),
        itl_ms=Distribution.of([x * 1000 for r in ok for x in r.itls_s]),
        e2e_ms=Distribution.of([r.e2e_s * 1000 for r in ok]),
        goodput=sum(1 for r in ok if slo.met_by(r)) / wall if with_slo else None,
        slo=slo,
        cached_token_share=cached_share,
        shareable_share=shareable_share,
        error_samples=samples,
        params=dict(params or {}),
    )


def format_report(rep: BenchReport) -> str:
    def dist(name: str, d: Distribution) -> str:
        return f"{name:<10} mean {d.mean:9.2f}  p50 {d.p50:9.2f}  p90 {d.p90:9.2f}  p99 {d.p99:9.2f}  max {d.max:9.2f} ms"

    lines = [
        f"workload {rep.workload}: {rep.requests} requests in {rep.wall_s:.2f} s — "
        f"{rep.ok} ok, {rep.errors} errors, {rep.rejections} rejected",
        f"throughput  {rep.request_throughput:.2f} req/s, {rep.output_token_throughput:.1f} output tok/s, "
        f"{rep.input_token_throughput:.1f} input tok/s",
        dist("TTFT", rep.ttft_ms),
        dist("ITL", rep.itl_ms),
        dist("E2E", rep.e2e_ms),
    ]
    if rep.goodput is not None:
        slo = ", ".join(
            x for x in (
                f"TTFT ≤ {rep.slo.ttft_ms} ms" if rep.slo.ttft_ms is not None else "",
                f"ITL ≤ {rep.slo.itl_ms} ms" if rep.slo.itl_ms is not None else "",
            ) if x
        )  # fmt: skip
        lines.append(f"goodput     {rep.goodput:.2f} req/s ({slo})")
    share = "not reported by the server" if rep.cached_token_share is None else f"{rep.cached_token_share:.1%}"
    lines.append(f"cached      {share} of prompt tokens (workload shareable: {rep.shareable_share:.1%})")
    for e in rep.error_samples:
        lines.append(f"error       {e}")
    return "\n".join(lines)
