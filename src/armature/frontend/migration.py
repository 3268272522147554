"""Request migration: when a worker fails mid-stream, continue the sequence on another one.

On a migratable failure (the connection dropped, the worker shut down, it could not be reached)
the request is re-sent with every token generated so far appended to the prompt and the token
budget reduced by as many, so the new worker re-prefills and continues; the client sees one
uninterrupted stream. At most ``limit`` times per request (Dynamo's ``--migration-limit``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from armature.frontend.metrics import FrontendMetrics
from armature.protocols.llm import LLMEngineOutput, OutputOptions, PreprocessedRequest, StopConditions
from armature.router.push import StreamRouter
from armature.runtime.context import Context
from armature.runtime.request_plane.base import RequestPlaneError

log = logging.getLogger(__name__)


class MigratingStream:
    """The engine outputs of one sequence, across however many workers it takes."""

    def __init__(
        self,
        router: StreamRouter,
        request: PreprocessedRequest,
        context: Context,
        limit: int,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self._router = router
        self._request = request
        self._context = context
        self._retries_left = limit
        self._metrics = metrics
        self._generated: list[int] = []
        self._failed: set[int] = set()
        self._stream: AsyncIterator[Any] | None = None
        self._instance: int | None = None
        self._target = request.routing.backend_instance_id if request.routing is not None else None

    @property
    def instance_id(self) -> int | None:
        return self._instance

    async def open(self) -> None:
        """Route and open the first stream; errors here happen before any output."""
        while True:
            try:
                await self._open(self._request)
                return
            except RequestPlaneError as exc:
                self._retry_or_raise(exc, "new_request")

    async def _open(self, request: PreprocessedRequest) -> None:
        child = self._context.child()
        self._instance = None
        self._instance, self._stream = await self._router.generate(
            request, child, target=self._target, exclude=self._failed
        )

    def _retry_or_raise(self, exc: RequestPlaneError, kind: str) -> None:
        if not exc.migratable or self._retries_left <= 0 or self._context.is_stopped() or self._target is not None:
            raise exc
        self._retries_left -= 1
        if self._instance is not None:
            self._failed.add(self._instance)
        if self._metrics is not None:
            self._metrics.migrations.labels(self._request.model, kind).inc()
        log.warning(
            "migrating request after %s (%d tokens so far, %d retries left)",
            exc,
            len(self._generated),
            self._retries_left,
        )

    def _continued_request(self) -> PreprocessedRequest:
        req = self._request
        sc = req.stop_conditions
        done = len(self._generated)
        stop = StopConditions(
            max_tokens=None if sc.max_tokens is None else max(sc.max_tokens - done, 1),
            stop=sc.stop,
            stop_token_ids_hidden=sc.stop_token_ids_hidden,
            min_tokens=None if sc.min_tokens is None else max(sc.min_tokens - done, 0) or None,
            ignore_eos=sc.ignore_eos,
        )
        # Prompt logprobs were already delivered; the new worker's "prompt" includes our output.
        out_opts = OutputOptions(
            logprobs=req.output_options.logprobs,
            prompt_logprobs=None,
            skip_special_tokens=req.output_options.skip_special_tokens,
        )
        return msgspec.structs.replace(
            req, token_ids=[*req.token_ids, *self._generated], stop_conditions=stop, output_options=out_opts
        )

    def __aiter__(self) -> AsyncIterator[LLMEngineOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[LLMEngineOutput]:
        async for batch in self.batches():
            for out in batch:
                yield out

    def install_push(self, fn: Callable[[LLMEngineOutput], bool]) -> None:
        """Have the current stream hand outputs to ``fn`` where they arrive (``ResponseStream.on_item``).

        Nothing where it cannot: a router that wraps the stream (the KV router watches its items).
        A stream opened after a migration is iterated only.
        """
        stream = self._stream
        if stream is None or not hasattr(stream, "on_item"):
            return
        generated = self._generated

        def push(out: LLMEngineOutput) -> bool:
            if not fn(out):
                return False
            if out.token_ids:
                generated.extend(out.token_ids)
            return True

        stream.on_item = push

    async def batches(self) -> AsyncIterator[list[LLMEngineOutput]]:
        """The outputs in bursts: each is what had arrived by the time the caller asked.

        A caller that keeps up gets one output at a time; one that fell behind gets everything
        already buffered at once, so it can answer a burst with one write.
        """
        if self._stream is None:
            await self.open()
        while True:
            stream = self._stream
            assert stream is not None
            take = getattr(stream, "take_buffered", None)
            try:
                async for out in stream:
                    batch = [out]
                    if take is not None:
                        batch += take()
                    generated = self._generated
                    for o in batch:
                        if o.token_ids:
                            generated.extend(o.token_ids)
                    yield batch
                return
            except RequestPlaneError as exc:
                self._retry_or_raise(exc, "ongoing_request" if self._generated else "new_request")
            while True:
                try:
                    await self._open(self._continued_request())
                    break
                except RequestPlaneError as exc:
                    self._retry_or_raise(exc, "new_request")
