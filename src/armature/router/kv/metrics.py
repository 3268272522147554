"""Prometheus metrics of the KV router (registry passed in, so tests and processes own theirs)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Router overheads are tens to hundreds of microseconds; buckets resolve that range.
_OVERHEAD_BUCKETS_MS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str = "armature_router") -> None:
        self.requests_total = Counter(
            f"{prefix}_requests_total", "Requests routed by the KV router", registry=registry
        )
        self.kv_hit_rate = Histogram(
            f"{prefix}_kv_hit_rate",
            "Share of a routed request's blocks already cached on the chosen worker",
            buckets=_RATIO_BUCKETS,
            registry=registry,
        )
        self.overhead_hashing_ms = Histogram(
            f"{prefix}_overhead_hashing_ms", "Block hashing time per decision (ms)",
            buckets=_OVERHEAD_BUCKETS_MS, registry=registry,
        )
        self.overhead_find_matches_ms = Histogram(
            f"{prefix}_overhead_find_matches_ms", "Indexer match time per decision (ms)",
            buckets=_OVERHEAD_BUCKETS_MS, registry=registry,
        )
        self.overhead_scheduling_ms = Histogram(
            f"{prefix}_overhead_scheduling_ms", "Cost and selection time per decision (ms)",
            buckets=_OVERHEAD_BUCKETS_MS, registry=registry,
        )
        self.overhead_total_ms = Histogram(
            f"{prefix}_overhead_total_ms", "Whole routing decision time (ms)",
            buckets=_OVERHEAD_BUCKETS_MS, registry=registry,
        )
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
        self.worker_active_decode_blocks = Gauge(
            f"{prefix}_worker_active_decode_blocks", "KV blocks of requests this router has active",
            ["worker_id", "dp_rank"], registry=registry,
        )
        self.worker_active_prefill_tokens = Gauge(
            f"{prefix}_worker_active_prefill_tokens", "Prefill tokens this router still expects",
            ["worker_id", "dp_rank"], registry=registry,
        )
        self.worker_cached_blocks = Gauge(
            f"{prefix}_worker_cached_blocks", "KV blocks the index says the worker holds",
            ["worker_id", "dp_rank"], registry=registry,
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
