"""KV-aware push routing: ``PushRouter``'s interface with ``KvRouter`` choosing the worker.

The frontend's model manager and migration call ``instance_ids``, ``pick`` and ``generate`` on
whichever router the model has; this one asks ``KvRouter.best_worker`` over the request's token
ids, books the request as active on the chosen worker, and follows the response stream so the
booking is released exactly once: prefill tokens at the first token, everything when the stream
finishes, fails, or its context is killed (client gone, stop string, migration).

Which workers exist comes from ``KvRouterBinding`` (``router/kv_binding.py``), which feeds the
same ``KvRouter`` from discovery and the event plane.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import msgspec

from armature.protocols.llm import LLMEngineOutput, PreprocessedRequest, RoutingHints
from armature.router.kv.service import KvRouter, NoWorkersError, RoutingDecision, UnknownWorkerError
from armature.router.push import DirectTargetError, EndpointClient, NoInstancesError, RouterMode
from armature.runtime.context import Context

log = logging.getLogger(__name__)


class TrackedStream:
    """A worker's response stream that reports the request's progress back to the KV router."""

    __slots__ = ("_stream", "_kv", "_request_id", "_context", "_prefilled", "_freed", "_on_context", "instance_id")

    def __init__(self, stream: Any, kv: KvRouter, request_id: str, context: Context, instance_id: int) -> None:
        self._stream = stream
        self._kv = kv
        self._request_id = request_id
        self._context = context
        self._prefilled = False
        self._freed = False
        self.instance_id = instance_id

        def on_context(ctx: Context) -> None:
            # Stop asks the worker to finish (tokens still come); only a kill ends the request.
            if ctx.is_killed():
                self.release()

        self._on_context = on_context
        context.add_callback(on_context)
        if context.is_killed():
            self.release()

    @property
    def request_id(self) -> str:
        return self._request_id

    def release(self) -> None:
        """Free the booking (idempotent)."""
        if self._freed:
            return
        self._freed = True
        self._context.remove_callback(self._on_context)
        self._kv.free(self._request_id)

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            out = await self._stream.__anext__()
        except BaseException:
            # StopAsyncIteration (the worker ended the stream), a request-plane error, or
            # cancellation: in every case the request no longer loads the worker.
            self.release()
            raise
        if not self._prefilled and isinstance(out, LLMEngineOutput) and (out.token_ids or out.finish_reason):
            self._prefilled = True
            self._kv.mark_prefill_completed(self._request_id)
        if isinstance(out, LLMEngineOutput) and out.finish_reason is not None:
            self.release()
        return out

    async def __aenter__(self) -> TrackedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        aexit = getattr(self._stream, "__aexit__", None)
        if aexit is not None:
            await aexit(*exc)


class KvPushRouter:
    """Routes ``PreprocessedRequest``s to the cheapest worker by KV overlap and load."""

    mode = RouterMode.KV

    def __init__(
        self, client: EndpointClient, kv: KvRouter, on_close: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.client = client
        self.kv = kv
        self._on_close = on_close

    async def close(self) -> None:
        """Stop feeding the KV router (its binding's subscriptions and tasks)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            await on_close()

    def instance_ids(self) -> list[int]:
        return self.client.instance_ids()

    def decide(
        self,
        request: PreprocessedRequest,
        request_id: str | None,
        target: int | None = None,
        exclude: Collection[int] = (),
    ) -> RoutingDecision:
        """Choose (and with ``request_id`` book) a worker; the routing errors of ``PushRouter``."""
        hints = request.routing
        if target is not None and (hints is None or hints.backend_instance_id != target):
            hints = RoutingHints(backend_instance_id=target) if hints is None else msgspec.structs.replace(
                hints, backend_instance_id=target
            )
        if exclude and (hints is None or hints.backend_instance_id is None):
            hints = self._avoid(request, hints, exclude)
        try:
            return self.kv.best_worker(request.token_ids, hints=hints, request_id=request_id)
        except UnknownWorkerError as exc:
            raise DirectTargetError(str(exc)) from None
        except NoWorkersError as exc:
            raise NoInstancesError(f"no worker instance is serving this model ({exc})") from None
        except ValueError as exc:  # a hint out of range (negative weight, dp_rank)
            raise DirectTargetError(str(exc)) from None

    def _avoid(self, request: PreprocessedRequest, hints: RoutingHints | None, exclude: Collection[int]) -> RoutingHints:
        """Migration: the cheapest worker that has not failed this request, pinned."""
        costs = [c for c in self.kv.potential_loads(request.token_ids, hints=hints) if c.worker_id not in exclude]
        if not costs:
            raise NoInstancesError("no worker is left to migrate this request to")
        best = min(costs, key=lambda c: (c.logit, c.tree_size))
        base = hints if hints is not None else RoutingHints()
        return msgspec.structs.replace(base, backend_instance_id=best.worker_id, dp_rank=best.dp_rank)

    def pick(self, target: int | None = None, exclude: Collection[int] = ()) -> int:
        raise TypeError("the KV router chooses per request: call generate(request, context)")

    async def generate(
        self,
        request: PreprocessedRequest,
        context: Context,
        target: int | None = None,
        exclude: Collection[int] = (),
    ) -> tuple[int, AsyncIterator[Any]]:
        request_id = f"{context.id()}-{uuid.uuid4().hex[:8]}"
        decision = self.decide(request, request_id, target, exclude)
        routed = request
        if self.kv.workers().get(decision.worker_id, 1) > 1:
            hints = request.routing or RoutingHints()
            routed = msgspec.structs.replace(
                request, routing=msgspec.structs.replace(hints, dp_rank=decision.dp_rank)
            )
        try:
            stream = await self.client.direct(routed, decision.worker_id, context=context)
        except BaseException:
            self.kv.free(request_id)
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s -> worker %x dp %d (overlap %d/%d blocks%s)",
                request_id, decision.worker_id, decision.dp_rank, decision.overlap_blocks,
                decision.request_blocks, ", pinned" if decision.pinned else "",
            )  # fmt: skip
        return decision.worker_id, TrackedStream(stream, self.kv, request_id, context, decision.worker_id)
