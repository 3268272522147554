"""Prometheus metrics of the KV router (registry passed in, so tests and processes own theirs)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Router overheads are tens to hundreds of microseconds; buckets resolve that range.
_OVERHEAD_BUCKETS_MS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class DecisionHistogram(Collector):
    """A Prometheus histogram whose ``observe`` costs one ``bisect`` and two additions.

    ``prometheus_client.Histogram.observe`` walks its buckets in Python under a lock (about
    1.5 µs); the router observes five values per decision on its hot path. The router is
    single-threaded (one asyncio loop), so plain ints suffice; a scrape from another thread may
    read a count one observation ahead of the sum, never a torn value.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = [float(b) for b in buckets]
        if self._bounds != sorted(self._bounds):
            raise ValueError(f"{name}: buckets must be sorted")
        self._labels = [str(b) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._doc)]

    def collect(self) -> Iterator[Metric]:
        cumulative = 0
        buckets = []
        for le, n in zip(self._labels, list(self._counts)):
            cumulative += n
            buckets.append((le, cumulative))
        yield HistogramMetricFamily(self._name, self._doc, buckets=buckets, sum_value=self._sum)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str = "armature_router") -> None:
        self.requests_total = Counter(
            f"{prefix}_requests_total", "Requests routed by the KV router", registry=registry
        )
        self.kv_hit_rate = DecisionHistogram(
            f"{prefix}_kv_hit_rate",
            "Share of a routed request's blocks already cached on the chosen worker",
            _RATIO_BUCKETS,
            registry,
        )

        def overhead(phase: str, documentation: str) -> DecisionHistogram:
            name = f"{prefix}_overhead_{phase}_ms"
            return DecisionHistogram(name, documentation, _OVERHEAD_BUCKETS_MS, registry)

        self.overhead_hashing_ms = overhead("hashing", "Block hashing time per decision (ms)")
        self.overhead_find_matches_ms = overhead("find_matches", "Indexer match time per decision (ms)")
        self.overhead_scheduling_ms = overhead("scheduling", "Cost and selection time per decision (ms)")
        self.overhead_total_ms = overhead("total", "Whole routing decision time (ms)")

        self.kv_events_applied = Counter(
            f"{prefix}_kv_events_applied_total", "KV events received from workers",
            ["event_type"], registry=registry,
        )
        self.kv_event_gaps = Counter(
            f"{prefix}_kv_event_gaps_total", "Gaps detected in workers' KV event ids", registry=registry
        )
        self.kv_recoveries = Counter(
            f"{prefix}_kv_recoveries_total", "Recoveries from workers' local indexers",
            ["kind", "outcome"], registry=registry,
        )

        def per_worker(name: str, documentation: str) -> Gauge:
            return Gauge(f"{prefix}_{name}", documentation, ["worker_id", "dp_rank"], registry=registry)

        self.worker_active_decode_blocks = per_worker(
            "worker_active_decode_blocks", "KV blocks of requests this router has active"
        )
        self.worker_active_prefill_tokens = per_worker(
            "worker_active_prefill_tokens", "Prefill tokens this router still expects"
        )
        self.worker_cached_blocks = per_worker(
            "worker_cached_blocks", "KV blocks the index says the worker holds"
        )

        self.event_types = {
            name: self.kv_events_applied.labels(event_type=name) for name in ("stored", "removed", "cleared")
        }

    def set_worker_load(self, worker_id: int, dp_rank: int, decode_blocks: int, prefill_tokens: int) -> None:
        labels = (f"{worker_id:x}", str(dp_rank))
        self.worker_active_decode_blocks.labels(*labels).set(decode_blocks)
        self.worker_active_prefill_tokens.labels(*labels).set(prefill_tokens)

    def remove_worker(self, worker_id: int, dp_ranks: list[int]) -> None:
        for dp in dp_ranks:
            labels = (f"{worker_id:x}", str(dp))
            for g in (self.worker_active_decode_blocks, self.worker_active_prefill_tokens,
                      self.worker_cached_blocks):
                try:
                    g.remove(*labels)
                except KeyError:
                    pass
