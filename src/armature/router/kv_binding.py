"""Ties a ``KvRouter`` to a running system: discovery, the event plane and the request plane.

One binding per routed endpoint (``ns.component.endpoint``):

- **workers**: a worker is a routing candidate from the moment its model card appears under
  ``v1/mdc/{ns}/{component}/{endpoint}/`` (it is ready to serve then) until the card goes — a
  clean exit, or its lease expiring after a crash. A new worker's KV state is loaded from its
  local indexer (``kv_indexer_snapshot``) before its live events apply.
- **KV events**: the ``kv-events`` topic of the component, decoded into the index; a gap in a
  worker's event ids is recovered through ``kv_indexer_query`` (``RequestPlaneGapHandler``).
- **replica sync** (``--router-replica-sync``): this router's active-sequence changes go out on
  ``active_sequences_events`` and the other replicas' come in.
- **housekeeping**: requests nobody reported on expire; the cached-block gauges are refreshed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from armature.protocols.model_card import ModelCard
from armature.router.kv.config import KvRouterConfig
from armature.router.kv.event_feed import (
    KV_EVENTS_TOPIC,
    REPLICA_SYNC_TOPIC,
    EventPlaneSyncPublisher,
    consume_kv_events,
    consume_replica_sync,
)
from armature.router.kv.gap_recovery import RequestPlaneGapHandler
from armature.router.kv.metrics import RouterMetrics
from armature.router.kv.service import KvRouter
from armature.router.kv_push import KvPushRouter
from armature.router.push import EndpointClient
from armature.runtime.discovery.base import WatchEventKind
from armature.runtime.event_plane.base import EventScope
from armature.runtime.runtime import DistributedRuntime, parse_endpoint_path

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 5.0

_card_json = msgspec.json.Decoder(ModelCard)
_card_msgpack = msgspec.msgpack.Decoder(ModelCard)


def _decode_card(value: bytes) -> ModelCard | None:
    for decoder in (_card_json, _card_msgpack):
        try:
            return decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return None


class KvRouterBinding:
    """Feeds one ``KvRouter`` for one endpoint; ``start`` it, use ``.router``, then ``close`` it."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        endpoint: str,
        config: KvRouterConfig,
        block_size: int,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.namespace, self.component, self.endpoint = parse_endpoint_path(endpoint)
        self.config = config
        self.scope = EventScope(self.namespace, self.component)
        self.gap_handler = RequestPlaneGapHandler(runtime, self.namespace, self.component)
        self._sync: EventPlaneSyncPublisher | None = None
        self._block_size = block_size
        self._metrics = metrics
        self.router: KvRouter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._adds: dict[int, asyncio.Task[None]] = {}
        self._kv_sub: Any = None
        self._subs: list[Any] = []
        self.workers_seen = asyncio.Event()

    @property
    def kv(self) -> KvRouter:
        if self.router is None:
            raise RuntimeError("the KV router binding is not started")
        return self.router

    async def start(self) -> KvRouter:
        if self.router is not None:
            return self.router
        plane = await self.runtime.events()
        if self.config.router_replica_sync:
            self._sync = EventPlaneSyncPublisher(plane.publisher(self.scope, REPLICA_SYNC_TOPIC))
            await self._sync.start()
        self.router = KvRouter(
            self.config,
            block_size=self._block_size,
            router_id=self.runtime.instance_id,
            metrics=self._metrics,
            gap_handler=self.gap_handler if self.config.use_kv_events else None,
            sync_publisher=self._sync,
        )
        if self.config.use_kv_events:
            await self.subscribe_kv_events()
        if self._sync is not None:
            sub = plane.subscriber(self.scope, REPLICA_SYNC_TOPIC)
            await sub.start()
            self._subs.append(sub)
            self._spawn(consume_replica_sync(self.router, sub), "kv-router-replica-sync-in")
        self._spawn(self._watch_workers(), "kv-router-workers")
        self._spawn(self._housekeeping(), "kv-router-housekeeping")
        log.info(
            "KV router for %s.%s.%s: block size %d, %s, replica sync %s",
            self.namespace, self.component, self.endpoint, self.router.block_size,
            "KV events" if self.config.use_kv_events else "approximate (no KV events)",
            "on" if self._sync is not None else "off",
        )  # fmt: skip
        return self.router

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    # ------------------------------------------------------------------ KV events

    async def subscribe_kv_events(self) -> None:
        """(Re)join the workers' ``kv-events``; events published meanwhile are recovered as gaps."""
        if self._kv_sub is not None:
            return
        plane = await self.runtime.events()
        sub = plane.subscriber(self.scope, KV_EVENTS_TOPIC)
        await sub.start()
        self._kv_sub = sub
        self._kv_task = self._spawn(consume_kv_events(self.kv, sub), "kv-router-kv-events")

    async def unsubscribe_kv_events(self) -> None:
        """Leave ``kv-events`` (the index keeps what it has; a later subscribe catches up)."""
        sub, self._kv_sub = self._kv_sub, None
        if sub is None:
            return
        task = self._kv_task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self._tasks.remove(task)
        with contextlib.suppress(Exception):
            await sub.close()

    # ------------------------------------------------------------------ workers

    async def _watch_workers(self) -> None:
        prefix = f"v1/mdc/{self.namespace}/{self.component}/{self.endpoint}/"
        async for ev in self.runtime.discovery.watch_prefix(prefix):
            try:
                worker_id = int(ev.key.rsplit("/", 1)[1], 16)
            except ValueError:
                continue
            if ev.kind is WatchEventKind.DELETE or ev.value is None:
                task = self._adds.pop(worker_id, None)
                if task is not None:
                    task.cancel()
                if worker_id in self.kv.workers():
                    self.kv.remove_worker(worker_id)
                continue
            card = _decode_card(ev.value)
            if card is None:
                log.warning("ignoring an unreadable model card at %s", ev.key)
                continue
            dp = card.runtime_config.data_parallel_size if card.runtime_config is not None else 1
            if self.kv.workers().get(worker_id) == dp:
                continue
            self._adds[worker_id] = asyncio.create_task(self._add(worker_id, max(1, dp)), name=f"kv-add-{worker_id:x}")

    async def _add(self, worker_id: int, dp_size: int) -> None:
        try:
            await self.kv.add_worker(worker_id, dp_size)
            log.info("worker %x (dp %d) joined the KV router", worker_id, dp_size)
        except Exception:
            log.exception("adding worker %x to the KV router failed", worker_id)
        finally:
            self._adds.pop(worker_id, None)
            self.workers_seen.set()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                expired = self.kv.expire()
                if expired:
                    log.warning("%d routed requests expired without a finish report", expired)
                self.kv.refresh_gauges()
            except Exception:
                log.exception("KV router housekeeping failed")

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        for task in [*self._tasks, *self._adds.values()]:
            task.cancel()
        for task in [*self._tasks, *self._adds.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._adds.clear()
        subs = [*self._subs, *([self._kv_sub] if self._kv_sub is not None else [])]
        self._kv_sub = None
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.close()
        if self._sync is not None:
            with contextlib.suppress(Exception):
                await self._sync.close()
        await self.gap_handler.close()


def kv_router_factory(
    runtime: DistributedRuntime, config: KvRouterConfig, metrics: RouterMetrics | None = None
) -> Callable[[ModelCard, EndpointClient], Awaitable[KvPushRouter]]:
    """The frontend's router factory for ``--router-mode kv``: one bound KV router per model.

    The block size is ``--kv-cache-block-size`` when given, else the model card's.
    """

    async def factory(card: ModelCard, client: EndpointClient) -> KvPushRouter:
        block_size = config.kv_cache_block_size or card.kv_cache_block_size
        binding = KvRouterBinding(runtime, card.endpoint, config, block_size, metrics)
        await binding.start()
        return KvPushRouter(client, binding.kv, on_close=binding.close)

    return factory
