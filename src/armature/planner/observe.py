"""What the planner sees of a component: its live workers (discovery), their load (the
event plane's ``load_metrics``) and their latency (the frontend's per-worker gauges)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from armature.planner.decide import WorkerSample
from armature.protocols.load import LOAD_TOPIC, ActiveLoad
from armature.router.prefill import instance_of_key
from armature.runtime.discovery.base import WatchEventKind
from armature.runtime.event_plane.base import EventScope
from armature.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)
_load_decoder = msgspec.msgpack.Decoder(ActiveLoad)


def scrape_worker_latency(text: str, prefix: str, model: str | None) -> dict[int, dict[str, float]]:
    """``worker_id -> {"ttft", "itl", "isl"}`` from a frontend's Prometheus page."""
    names = {
        f"{prefix}_worker_last_time_to_first_token_seconds": "ttft",
        f"{prefix}_worker_last_inter_token_latency_seconds": "itl",
        f"{prefix}_worker_last_input_sequence_tokens": "isl",
    }
    out: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = names.get(s.name)
            if key is None or (model is not None and s.labels.get("model") != model):
                continue
            try:
                worker = int(s.labels["worker_id"], 16)
            except (KeyError, ValueError):
                continue
            out.setdefault(worker, {})[key] = float(s.value)
    return out


class ComponentObserver:
    def __init__(
        self, runtime: DistributedRuntime, namespace: str, component: str, metrics_url: str | None,
        metrics_prefix: str = "armature_frontend", model: str | None = None,
    ) -> None:  # fmt: skip
        self.runtime = runtime
        self.namespace = namespace
        self.component = component
        self._metrics_url = metrics_url
        self._prefix = metrics_prefix
        self._model = model
        self.live: set[int] = set()
        self._loads: dict[int, ActiveLoad] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Any = None
        self._scrape_failing = False
        self.changed = asyncio.Event()

    async def start(self) -> None:
        plane = await self.runtime.events()
        self._sub = plane.subscriber(EventScope(self.namespace, self.component), LOAD_TOPIC)
        await self._sub.start()
        self._tasks.append(asyncio.create_task(self._read_loads(), name=f"planner-loads-{self.component}"))
        self._tasks.append(asyncio.create_task(self._watch(), name=f"planner-instances-{self.component}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.close()

    async def _read_loads(self) -> None:
        async for envelope in self._sub:
            try:
                load = _load_decoder.decode(envelope.payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            self._loads[load.worker_id] = load  # dp rank 0: a worker's planner view is its first rank

    async def _watch(self) -> None:
        prefix = f"v1/instances/{self.namespace}/{self.component}/generate/"
        async for ev in self.runtime.discovery.watch_prefix(prefix):
            try:
                worker = instance_of_key(ev.key)
            except ValueError:
                continue
            if ev.kind is WatchEventKind.DELETE or ev.value is None:
                self.live.discard(worker)
                self._loads.pop(worker, None)
            else:
                self.live.add(worker)
            self.changed.set()

    async def _latency(self) -> dict[int, dict[str, float]]:
        if self._metrics_url is None:
            return {}
        url = self._metrics_url

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())

        try:
            page = await asyncio.to_thread(fetch)
        except OSError as exc:
            if not self._scrape_failing:  # once per outage, not once per sample
                log.warning("cannot read the frontend's metrics at %s: %s", url, exc)
            self._scrape_failing = True
            return {}
        if self._scrape_failing:
            log.info("reading the frontend's metrics at %s again", url)
        self._scrape_failing = False
        return scrape_worker_latency(page, self._prefix, self._model)

    async def sample(self) -> list[WorkerSample]:
        latency = await self._latency()
        out = []
        for worker in sorted(self.live):
            load = self._loads.get(worker)
            lat = latency.get(worker, {})
            out.append(
                WorkerSample(
                    worker_id=worker,
                    prefill_load=(load.active_prefill_tokens if load else 0) + lat.get("isl", 0.0),
                    decode_load=float(load.active_decode_blocks if load else 0),
                    ttft_s=lat.get("ttft"),
                    itl_s=lat.get("itl"),
                )
            )
        return out
