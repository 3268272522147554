"""Disaggregated routing in the frontend: a prefill worker, a room, and the decode request.

A model is served disaggregated once a ``ModelType.PREFILL`` card for it appears (Dynamo's
prefill router activates the same way, and never deactivates). Then each request gets a prefill
worker — KV-aware when the frontend routes by KV, else round-robin — and a random 63-bit
bootstrap room; the prefill request (``max_tokens = 1``) and the decode request, both carrying
the prefill worker's bootstrap host/port and the room, are sent at once, and the two engines
meet in the prefill engine's bootstrap server. The client sees only the decode stream: a
prefill that fails shows up there as a failed (migratable) KV transfer.

With no prefill worker left, requests fail with "no instances" (HTTP 503) unless the frontend
runs with ``--decode-fallback``; then the decode worker serves them aggregated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import msgspec

from armature.protocols.llm import BootstrapInfo, PreprocessedRequest, StopConditions
from armature.protocols.model_card import ModelCard, ModelType
from armature.router.kv_push import KvPushRouter
from armature.router.push import EndpointClient, NoInstancesError, PushRouter, RouterMode
from armature.runtime.context import Context
from armature.runtime.request_plane.base import RequestPlaneError

log = logging.getLogger(__name__)

# A prefill worker whose request failed to connect is skipped this long (its discovery entry
# lingers until its lease expires); long enough to cover a lease, short enough to forgive.
SUSPECT_S = 15.0
# What a decode worker's error says when the KV did not arrive (engine/disagg/scheduler.py).
TRANSFER_FAILED = "KV transfer failed"


def is_prefill_card(card: ModelCard) -> bool:
    return ModelType.PREFILL in card.model_types


def instance_of_key(key: str) -> int:
    """``v1/mdc/{ns}/{component}/{endpoint}/{instance:x}`` -> the instance id."""
    return int(key.rsplit("/", 1)[-1], 16)


class PrefillPool:
    """The prefill workers of one model: their cards (bootstrap addresses) and a picker."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.router: PushRouter | KvPushRouter | None = None
        self.client: EndpointClient | None = None
        self._bootstrap: dict[int, tuple[str, int]] = {}
        self._keys: dict[str, int] = {}
        self._suspect: dict[int, float] = {}
        # Once a prefill card was seen the model is disaggregated, even if every prefill worker
        # leaves later: requests then fail (or fall back) instead of silently going aggregated.
        self.activated = False

    def bind(self, router: PushRouter | KvPushRouter, client: EndpointClient) -> None:
        self.router = router
        self.client = client

    def add_card(self, key: str, card: ModelCard) -> None:
        rc = card.runtime_config
        if rc.bootstrap_host is None or rc.bootstrap_port is None:
            log.error("prefill card %s of model %r has no bootstrap host/port; ignoring it", key, card.name)
            return
        iid = instance_of_key(key)
        self._keys[key] = iid
        self._bootstrap[iid] = (rc.bootstrap_host, rc.bootstrap_port)
        if not self.activated:
            log.info("model %r is served disaggregated: prefill worker %x appeared", self.model, iid)
        self.activated = True

    def remove_card(self, key: str) -> bool:
        """Forget one card; True when it was this pool's."""
        iid = self._keys.pop(key, None)
        if iid is None:
            return False
        self._bootstrap.pop(iid, None)
        self._suspect.pop(iid, None)
        return True

    def instance_ids(self) -> list[int]:
        live = set(self.router.instance_ids()) if self.router is not None else set()
        return sorted(i for i in self._bootstrap if i in live)

    def available_ids(self) -> list[int]:
        """Live prefill workers that have not failed a request lately."""
        suspect = self._excluded()
        return [i for i in self.instance_ids() if i not in suspect]

    def _excluded(self) -> set[int]:
        now = time.monotonic()
        for iid, until in list(self._suspect.items()):
            if until <= now:
                del self._suspect[iid]
        return set(self._suspect)

    def suspect(self, instance_id: int) -> None:
        self._suspect[instance_id] = time.monotonic() + SUSPECT_S

    def choose(self, request: PreprocessedRequest) -> tuple[int, BootstrapInfo]:
        """A prefill worker for ``request`` and the bootstrap info both sides will use."""
        if self.router is None:
            raise NoInstancesError(f"no prefill worker is serving model {self.model!r}")
        exclude = self._excluded()
        candidates = [i for i in self.instance_ids() if i not in exclude] or self.instance_ids()
        if not candidates:
            raise NoInstancesError(
                f"model {self.model!r} is served disaggregated and no prefill worker is available "
                "(start one, or run the frontend with --decode-fallback to decode without one)"
            )
        # Everyone else on the prefill endpoint: suspects, and other models' prefill workers.
        avoid = [i for i in self.router.instance_ids() if i not in candidates]
        hinted = request.routing.prefill_worker_id if request.routing is not None else None
        target = hinted if hinted in candidates else None
        if isinstance(self.router, KvPushRouter):
            # KV-aware: the prefill worker with the best cached overlap; nothing is booked, as
            # in Dynamo (the prefill request is short-lived and ends with the transfer).
            iid = self.router.decide(request, None, target=target, exclude=avoid).worker_id
        else:
            iid = self.router.pick(target=target, exclude=avoid)
        host, port = self._bootstrap[iid]
        room = secrets.randbits(63)
        return iid, BootstrapInfo(bootstrap_host=host, bootstrap_port=port, bootstrap_room=room)


class DisaggRouter:
    """The router a served model's requests go through: decode router + its prefill pool.

    Offers what ``MigratingStream`` needs of a router (``generate``, ``instance_ids``); other
    attributes are the decode router's.
    """

    def __init__(
        self, decode: PushRouter | KvPushRouter, prefill: PrefillPool, decode_fallback: bool = False
    ) -> None:
        self.decode = decode
        self.prefill = prefill
        self.decode_fallback = decode_fallback
        self._tasks: set[asyncio.Task[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.decode, name)

    def instance_ids(self) -> list[int]:
        return self.decode.instance_ids()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        close = getattr(self.decode, "close", None)
        if close is not None:
            await close()

    async def generate(
        self,
        request: PreprocessedRequest,
        context: Context,
        target: int | None = None,
        exclude: Collection[int] = (),
    ) -> tuple[int, AsyncIterator[Any]]:
        pool = self.prefill
        if not pool.activated:
            return await self.decode.generate(request, context, target=target, exclude=exclude)
        # After a failed transfer the decode worker is rarely the culprit: with every decode
        # worker excluded, try them again rather than fail the migration outright.
        live = set(self.decode.instance_ids())
        decode_exclude = exclude if live - set(exclude) else ()
        if self.decode_fallback and not pool.available_ids():
            log.warning("model %r: no prefill worker available; serving aggregated on decode", pool.model)
            return await self.decode.generate(request, context, target=target, exclude=decode_exclude)
        prefill_id, boot = pool.choose(request)
        prefill_ctx = context.child()
        prefill_req = msgspec.structs.replace(
            request,
            stop_conditions=_one_token(request.stop_conditions),
            bootstrap_info=boot,
        )
        decode_req = msgspec.structs.replace(request, bootstrap_info=boot)
        task = asyncio.ensure_future(self._run_prefill(prefill_id, prefill_req, prefill_ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            iid, stream = await self.decode.generate(
                decode_req, context, target=target, exclude=decode_exclude
            )
        except BaseException:
            prefill_ctx.kill()
            raise
        return iid, self._follow(stream, task, prefill_ctx, prefill_id)

    async def _run_prefill(self, instance_id: int, request: PreprocessedRequest, context: Context) -> None:
        assert self.prefill.client is not None
        try:
            stream = await self.prefill.client.direct(request, instance_id, context=context)
            async for _ in stream:
                pass
        except asyncio.CancelledError:
            context.kill()
            raise
        except RequestPlaneError as exc:
            if exc.migratable:
                self.prefill.suspect(instance_id)
            # The decode side learns of it through its KV transfer and reports to the client.
            if not context.is_stopped():
                log.warning("prefill on worker %x failed: %s", instance_id, exc)
        except Exception as exc:  # noqa: BLE001 - logged; the decode stream carries the outcome
            if not context.is_stopped():
                log.warning("prefill on worker %x failed: %s", instance_id, exc)
        finally:
            context.detach()

    async def _follow(
        self, stream: AsyncIterator[Any], prefill: asyncio.Task[None], prefill_ctx: Context, prefill_id: int
    ) -> AsyncIterator[Any]:
        try:
            async for item in stream:
                yield item
        except RequestPlaneError as exc:
            if exc.migratable and TRANSFER_FAILED in exc.message:
                # The KV never arrived: skip that prefill worker for a while, so a migration (or
                # the decode fallback) does not walk into the same failure.
                self.prefill.suspect(prefill_id)
            raise
        finally:
            if not prefill.done():
                # The decode request ended (or was dropped) first: nobody needs that prefill.
                prefill_ctx.kill()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(prefill), 1.0)


def _one_token(stop: StopConditions) -> StopConditions:
    # The first token comes from the prefill worker; min_tokens stays so it never ends early.
    return msgspec.structs.replace(stop, max_tokens=1)


class PrefillRegistry:
    """The frontend's prefill pools, one per model name, fed by prefill model cards."""

    def __init__(
        self,
        client_factory: Callable[[str], Awaitable[EndpointClient]],
        router_factory: Callable[[ModelCard, EndpointClient], Awaitable[Any]] | None,
        mode: RouterMode,
        decode_fallback: bool = False,
    ) -> None:
        self._client_factory = client_factory
        self._router_factory = router_factory
        # Direct routing names decode workers; prefill workers are then picked round-robin.
        self._mode = mode if mode in (RouterMode.ROUND_ROBIN, RouterMode.RANDOM) else RouterMode.ROUND_ROBIN
        self.decode_fallback = decode_fallback
        self._pools: dict[str, PrefillPool] = {}
        self._name_by_key: dict[str, str] = {}

    def pool(self, model: str) -> PrefillPool | None:
        return self._pools.get(model)

    async def add(self, key: str, card: ModelCard) -> PrefillPool:
        pool = self._pools.get(card.name)
        if pool is None:
            pool = self._pools[card.name] = PrefillPool(card.name)
        if pool.router is None:
            client = await self._client_factory(card.endpoint)
            if self._router_factory is not None:
                router = await self._router_factory(card, client)
            else:
                router = PushRouter(client, self._mode)
            pool.bind(router, client)
        pool.add_card(key, card)
        self._name_by_key[key] = card.name
        return pool

    def remove(self, key: str) -> bool:
        """Forget a prefill card; False when ``key`` is not one (the caller handles it)."""
        name = self._name_by_key.pop(key, None)
        if name is None:
            return False
        pool = self._pools.get(name)
        if pool is not None:
            pool.remove_card(key)
        return True

    def wrap(self, model: str, router: Any) -> Any:
        """``router`` itself, or a ``DisaggRouter`` over it once the model has prefill workers."""
        pool = self._pools.get(model)
        if pool is None or not pool.activated or isinstance(router, DisaggRouter):
            return router
        return DisaggRouter(router, pool, self.decode_fallback)

    async def close(self) -> None:
        for pool in self._pools.values():
            close = getattr(pool.router, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
