"""The frontend's Prometheus metrics (``armature_frontend_*``), labelled by model."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)

CONTENT_TYPE = CONTENT_TYPE_LATEST


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
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            "Time between generated tokens",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.isl = Histogram(
            f"{prefix}_input_sequence_tokens", "Prompt length in tokens", ["model"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.osl = Histogram(
            f"{prefix}_output_sequence_tokens",
            "Generated tokens per request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
