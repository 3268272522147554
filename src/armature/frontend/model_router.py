"""A served model's router: its endpoint's router narrowed to the model's own workers, and with
busy thresholds set, to those that are not busy.

An endpoint (``ns.backend.generate`` by default) may be served by workers of several models, or
of an embedding model and a generative one, so the endpoint's client sees them all. A model's
workers are those whose model card it holds. The rest are excluded from every pick, as busy
workers are (``busy.py``). When every worker of the model is busy, a new request fails at once
with ``ServiceOverloaded``. A request pinned to one of the model's workers is never shed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from armature.frontend.busy import BusyThresholds, LoadBoard, ServiceOverloaded
from armature.router.push import DirectTargetError, StreamRouter
from armature.runtime.context import Context


class ModelRouter:
    def __init__(
        self,
        inner: Any,
        model: str,
        members: Callable[[], Collection[int]],
        thresholds: Callable[[], BusyThresholds] | None = None,
        max_batched_tokens: Callable[[int], int | None] = lambda _: None,
    ) -> None:
        self.inner: StreamRouter = inner
        self._model = model
        self._members = members
        # None: no busy detection for this model (embedding models).
        self._thresholds = thresholds
        self._max_batched = max_batched_tokens
        # Set once thresholds are first enabled for the model: no load subscription before that.
        self.board: LoadBoard | None = None

    @property
    def can_shed(self) -> bool:
        return self._thresholds is not None

    def __getattr__(self, name: str) -> Any:
        # close(), client, kv, ... are the endpoint router's.
        return getattr(self.inner, name)

    def instance_ids(self) -> list[int]:
        members = self._members()
        return [i for i in self.inner.instance_ids() if i in members]

    async def generate(
        self, request: Any, context: Context, target: int | None = None, exclude: Collection[int] = ()
    ) -> tuple[int, AsyncIterator[Any]]:
        members = self._members()
        everyone = self.inner.instance_ids()
        if target is not None:
            if target in everyone and target not in members:
                raise DirectTargetError(f"instance {target:x} does not serve model '{self._model}'")
            return await self.inner.generate(request, context, target=target, exclude=exclude)
        others = [i for i in everyone if i not in members]
        if others:
            exclude = {*exclude, *others}
        thresholds = self._thresholds() if self._thresholds is not None else None
        board = self.board
        if board is not None and thresholds is not None and thresholds.enabled:
            busy = board.busy_workers(thresholds, self._max_batched)
            if busy:
                open_ids = [i for i in everyone if i not in exclude]
                if open_ids and all(i in busy for i in open_ids):
                    raise ServiceOverloaded(
                        "Service temporarily unavailable: All workers are busy, please retry later"
                    )
                exclude = {*exclude, *busy}
        return await self.inner.generate(request, context, target=target, exclude=exclude)
