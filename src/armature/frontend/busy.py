"""Busy detection and load shedding: while every worker of a model is loaded past a threshold,
new requests get a 503 at once instead of queueing behind the ones already there.

Workers publish their ``ActiveLoad`` on the event plane (``load_metrics``: every 0.25 s while it
changes, every 5 s otherwise). A worker's data-parallel rank is busy when its active decode
blocks pass a fraction of its KV blocks, or its prefill tokens in flight pass an absolute count or
a fraction of its ``max_num_batched_tokens``; a worker is busy when all of its ranks are. New
requests skip busy workers (``model_router.py``). The flags and the ``/busy_threshold`` endpoint
are Dynamo's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from armature.protocols.load import LOAD_TOPIC, ActiveLoad
from armature.runtime.event_plane.base import EventScope

log = logging.getLogger(__name__)

# Three missed heartbeats: a worker silent that long is no longer known to be busy.
STALE_S = 15.0
_load_decoder = msgspec.msgpack.Decoder(ActiveLoad)


class ServiceOverloaded(RuntimeError):
    """Every worker of the model is busy."""


@dataclass
class BusyThresholds:
    active_decode_blocks: float | None = None  # fraction of the worker's KV blocks
    active_prefill_tokens: int | None = None  # prefill tokens in flight
    active_prefill_tokens_frac: float | None = None  # fraction of its max_num_batched_tokens

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.active_decode_blocks, self.active_prefill_tokens,
                                           self.active_prefill_tokens_frac))  # fmt: skip

    def rank_busy(self, load: ActiveLoad, max_batched_tokens: int | None) -> bool:
        prefill = load.active_prefill_tokens
        if self.active_prefill_tokens is not None and prefill > self.active_prefill_tokens:
            return True
        frac = self.active_prefill_tokens_frac
        if frac is not None and max_batched_tokens and prefill > frac * max_batched_tokens:
            return True
        decode = self.active_decode_blocks
        return (
            decode is not None
            and load.kv_total_blocks > 0
            and load.active_decode_blocks > decode * load.kv_total_blocks
        )


class LoadBoard:
    """The latest load of every (worker, dp rank) of one component, fed by its load events."""

    def __init__(self, gauges: WorkerLoadGauges | None = None) -> None:
        self._loads: dict[tuple[int, int], tuple[ActiveLoad, float]] = {}
        self._gauges = gauges

    def update(self, load: ActiveLoad, now: float | None = None) -> None:
        self._loads[(load.worker_id, load.dp_rank)] = (load, time.monotonic() if now is None else now)
        if self._gauges is not None:
            self._gauges.set(load)

    def busy_workers(
        self,
        thresholds: BusyThresholds,
        max_batched_tokens: Callable[[int], int | None],
        now: float | None = None,
    ) -> set[int]:
        now = time.monotonic() if now is None else now
        ranks: dict[int, bool] = {}
        for (worker, _), (load, seen) in self._loads.items():
            busy = now - seen <= STALE_S and thresholds.rank_busy(load, max_batched_tokens(worker))
            ranks[worker] = ranks.get(worker, True) and busy
        return {w for w, busy in ranks.items() if busy}

    async def consume(self, envelopes: AsyncIterable[Any]) -> None:
        async for envelope in envelopes:
            try:
                self.update(_load_decoder.decode(envelope.payload))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("skipping an undecodable load report from %x: %s", envelope.publisher_id, exc)


class WorkerLoadGauges:
    """``…_worker_active_decode_blocks`` and ``…_worker_active_prefill_tokens`` per worker and rank."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        labels = ["worker_id", "dp_rank"]
        self.decode = Gauge(f"{prefix}_worker_active_decode_blocks", "Active decode KV blocks per worker",
                            labels, registry=registry)  # fmt: skip
        self.prefill = Gauge(f"{prefix}_worker_active_prefill_tokens", "Prefill tokens in flight per worker",
                             labels, registry=registry)  # fmt: skip

    def set(self, load: ActiveLoad) -> None:
        labels = (f"{load.worker_id:x}", str(load.dp_rank))
        self.decode.labels(*labels).set(load.active_decode_blocks)
        self.prefill.labels(*labels).set(load.active_prefill_tokens)


class LoadBoards:
    """One ``LoadBoard`` per component, subscribed the first time a model needs it."""

    def __init__(self, events: Callable[[], Awaitable[Any]], gauges: WorkerLoadGauges | None = None) -> None:
        self._events = events  # the runtime's event plane (DistributedRuntime.events)
        self._gauges = gauges
        self._boards: dict[tuple[str, str], LoadBoard] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []

    async def board(self, namespace: str, component: str) -> LoadBoard:
        key = (namespace, component)
        board = self._boards.get(key)
        if board is None:
            board = self._boards[key] = LoadBoard(self._gauges)
            plane = await self._events()
            sub = plane.subscriber(EventScope(namespace, component), LOAD_TOPIC)
            await sub.start()
            self._subs.append(sub)
            self._tasks.append(
                asyncio.create_task(board.consume(sub), name=f"load-board-{namespace}.{component}")
            )
        return board

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.close()
        self._tasks.clear()
        self._subs.clear()
