"""Prometheus view of a native worker's KV transfers (``armature_disagg_*`` on /metrics).

Read from the engine's counters at scrape time, so the step loop never touches Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "armature_disagg"


class DisaggCollector(Collector):
    def __init__(self, engine: Any, role: str, backend: str) -> None:
        self.engine = engine
        self.labels = [role, backend]

    def collect(self) -> Iterator[Any]:
        link = getattr(self.engine, "disagg", None)
        if link is None:
            return
        names = ["role", "backend"]
        sched = self.engine.scheduler
        st = getattr(sched, "transfer_stats", None)
        if link.puller is not None and st is not None:
            for name, doc, value in (
                ("kv_transfers", "KV transfers received", st.transfers),
                ("kv_transfer_failures", "KV transfers that failed", st.failures),
                ("kv_transfer_bytes", "KV bytes received", st.bytes),
                ("kv_transfer_wire_seconds", "Seconds reading KV (tcp) or mapping it (shm)", st.wire_s),
                ("kv_transfer_copy_seconds", "Seconds copying received KV pages into the pool", st.copy_s),
                ("kv_transfer_seconds", "Seconds from the prefill side staging KV to the pages in the pool",
                 st.total_s),
            ):
                c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=names)
                c.add_metric(self.labels, value)
                yield c
            g = GaugeMetricFamily(
                f"{PREFIX}_transfers_in_flight", "Requests whose KV is on its way", labels=names
            )
            g.add_metric(self.labels, sched.transfers_in_flight)
            yield g
        if link.server is not None:
            s = link.server.stats
            for name, doc, value in (
                ("rooms_served", "Bootstrap rooms whose KV was sent", s.rooms_served),
                ("rooms_failed", "Bootstrap rooms that failed (prefill aborted or errored)", s.rooms_failed),
                ("rooms_expired", "Bootstrap rooms dropped at the bootstrap timeout", s.rooms_expired),
                ("bytes_sent", "KV bytes sent", s.bytes_sent),
                ("direct_writes", "shm transfers written from the pool into the segment", s.direct_writes),
            ):
                c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=names)
                c.add_metric(self.labels, value)
                yield c
            g = GaugeMetricFamily(f"{PREFIX}_open_rooms", "Bootstrap rooms open now", labels=names)
            g.add_metric(self.labels, link.server.open_rooms)
            yield g


def register_disagg_metrics(registry: CollectorRegistry, engine: Any, role: str, backend: str) -> None:
    if getattr(engine, "disagg", None) is not None:
        registry.register(DisaggCollector(engine, role, backend))
