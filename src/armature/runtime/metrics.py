"""Prometheus metrics of one runtime (one registry per runtime, so several can share a process).

The request-plane server records, per endpoint: requests, duration, in-flight streams, request
and response bytes; the runtime adds its uptime. Byte counts are summed per stream and added
once at its end, so the per-item hot path never touches a metric lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "armature_component"
LABELS = ("namespace", "component", "endpoint")
# Seconds; LLM streams run from milliseconds (one token) to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))


class RuntimeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.started = time.monotonic()
        self.requests = Counter(
            f"{PREFIX}_requests_total", "Requests received by an endpoint", LABELS, registry=self.registry
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from a request's arrival to the end of its response stream",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests", "Response streams open right now", LABELS, registry=self.registry
        )
        self.request_bytes = Counter(
            f"{PREFIX}_request_bytes_total", "Request payload bytes received", LABELS, registry=self.registry
        )
        self.response_bytes = Counter(
            f"{PREFIX}_response_bytes_total", "Response item bytes sent", LABELS, registry=self.registry
        )
        self.uptime = Gauge(f"{PREFIX}_uptime_seconds", "Seconds since the runtime started", registry=self.registry)
        self.uptime.set_function(lambda: time.monotonic() - self.started)

    def endpoint(self, namespace: str, component: str, endpoint: str) -> EndpointMetrics:
        labels = (namespace, component, endpoint)
        return EndpointMetrics(
            requests=self.requests.labels(*labels),
            duration=self.duration.labels(*labels),
            inflight=self.inflight.labels(*labels),
            request_bytes=self.request_bytes.labels(*labels),
            response_bytes=self.response_bytes.labels(*labels),
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class EndpointMetrics:
    requests: Counter
    duration: Histogram
    inflight: Gauge
    request_bytes: Counter
    response_bytes: Counter

    def started(self, request_bytes: int) -> float:
        self.requests.inc()
        self.inflight.inc()
        self.request_bytes.inc(request_bytes)
        return time.perf_counter()

    def finished(self, started: float, response_bytes: int) -> None:
        self.inflight.dec()
        self.duration.observe(time.perf_counter() - started)
        if response_bytes:
            self.response_bytes.inc(response_bytes)
