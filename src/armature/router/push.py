"""Push routing over a runtime endpoint client: round-robin, random, or direct to an instance.

The router only chooses an instance id; the runtime's client opens the stream. Choosing here
(rather than calling the client's own round-robin) lets migration exclude the instance that
just failed, and lets ``direct`` requests name their target through routing hints.
"""

from __future__ import annotations

import enum
import random
from collections.abc import AsyncIterator, Collection
from typing import Any, Protocol

from armature.protocols.llm import PreprocessedRequest
from armature.runtime.context import Context


class RouterMode(str, enum.Enum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    DIRECT = "direct"
    KV = "kv"


class NoInstancesError(RuntimeError):
    """No live instance serves the endpoint (or none is left after exclusions)."""


class DirectTargetError(ValueError):
    """Direct mode without a target instance, or with one that is not serving."""


class EndpointClient(Protocol):
    """What the runtime's endpoint client offers the router."""

    def instance_ids(self) -> list[int]: ...

    async def direct(self, request: Any, instance_id: int, context: Context | None = None) -> AsyncIterator[Any]: ...


class StreamRouter(Protocol):
    """What sending a request needs of a router, and re-sending it elsewhere on migration:
    ``PushRouter``, ``KvPushRouter`` and ``DisaggRouter`` all offer it."""

    def instance_ids(self) -> list[int]: ...

    async def generate(
        self, request: PreprocessedRequest, context: Context, target: int | None = None, exclude: Collection[int] = ()
    ) -> tuple[int, AsyncIterator[Any]]: ...


class PushRouter:
    def __init__(self, client: EndpointClient, mode: RouterMode, rng: random.Random | None = None) -> None:
        if mode is RouterMode.KV:
            raise ValueError("PushRouter does not do KV routing; use the KV router")
        self.client = client
        self.mode = mode
        self._rng = rng or random.Random()
        self._next = 0

    def instance_ids(self) -> list[int]:
        return self.client.instance_ids()

    def pick(self, target: int | None = None, exclude: Collection[int] = ()) -> int:
        ids = sorted(self.client.instance_ids())
        if self.mode is RouterMode.DIRECT or target is not None:
            if target is None:
                raise DirectTargetError("router mode 'direct' needs a target instance id (backend_instance_id)")
            if target not in ids:
                raise DirectTargetError(f"instance {target:x} is not serving this endpoint")
            return target
        candidates = [i for i in ids if i not in exclude] if exclude else ids
        if not candidates:
            raise NoInstancesError("no worker instance is serving this model")
        if self.mode is RouterMode.RANDOM:
            return self._rng.choice(candidates)
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice

    async def generate(
        self, request: Any, context: Context, target: int | None = None, exclude: Collection[int] = ()
    ) -> tuple[int, AsyncIterator[Any]]:
        instance_id = self.pick(target, exclude)
        stream = await self.client.direct(request, instance_id, context=context)
        return instance_id, stream
