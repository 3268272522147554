"""The frontend's Prometheus metrics (``armature_frontend_*``), labelled by model."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HistogramChild:
    """One label set's buckets: an observation is a C bisect and two additions.

    prometheus_client's histogram takes a lock and walks its buckets in Python on every
    observation; the inter-token histogram is observed for every token the frontend streams.
    Observed only from the frontend's event loop, so no lock.
    """

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopHistogram(Collector):
    """A labelled Prometheus histogram for one event loop; ``labels(...).observe(x)`` as usual."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self._bounds)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, n in zip(self._les, child.counts, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class FrontendMetrics:
    def __init__(self, prefix: str = "armature_frontend", registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{prefix}_requests",
            "Requests handled, by model, endpoint, streaming or not, and outcome",
            ["model", "endpoint", "request_type", "status"],
            registry=r,
        )
        self.inflight = Gauge(f"{prefix}_inflight_requests", "Requests in flight", ["model"], registry=r)
        self.ttft = LoopHistogram(
            f"{prefix}_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = LoopHistogram(
            f"{prefix}_inter_token_latency_seconds",
            "Time between generated tokens",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.isl = LoopHistogram(
            f"{prefix}_input_sequence_tokens", "Prompt length in tokens", ["model"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.osl = LoopHistogram(
            f"{prefix}_output_sequence_tokens",
            "Generated tokens per request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = LoopHistogram(
            f"{prefix}_request_duration_seconds",
            "Time from request arrival to its last byte",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.migrations = Counter(
            f"{prefix}_model_migration",
            "Requests re-sent to another worker after a failure",
            ["model", "migration_type"],
            registry=r,
        )
        self.disconnects = Counter(
            f"{prefix}_client_disconnects", "Requests whose client went away before the end", ["model"], registry=r
        )
        # Per worker, from the last request it finished: what the planner regresses load against.
        per_worker = ["model", "worker_id"]
        self.worker_last_ttft = Gauge(f"{prefix}_worker_last_time_to_first_token_seconds",
                                      "TTFT of the worker's last finished request", per_worker, registry=r)
        self.worker_last_itl = Gauge(f"{prefix}_worker_last_inter_token_latency_seconds",
                                     "Mean ITL of the worker's last finished request", per_worker, registry=r)
        self.worker_last_isl = Gauge(f"{prefix}_worker_last_input_sequence_tokens",
                                     "Prompt tokens of the worker's last finished request", per_worker, registry=r)  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
