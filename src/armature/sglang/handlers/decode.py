"""Aggregated / decode handler: ``PreprocessedRequest`` in, ``LLMEngineOutput`` deltas out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import cast

from armature.engine.api import (
    EngineFinishReason,
    EngineInfo,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    PushEngine,
    SamplingParams,
)
from armature.engine.disagg.scheduler import is_transfer_error
from armature.protocols.llm import (
    CompletionUsage,
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    TopLogprob,
)
from armature.runtime.context import Context, new_span_id
from armature.runtime.request_plane.base import EngineShutdown, ErrorKind, RequestPlaneError
from armature.sglang.handlers.base import BaseWorkerHandler

log = logging.getLogger(__name__)

_FINISH = {
    EngineFinishReason.STOP: FinishReason.STOP,
    EngineFinishReason.LENGTH: FinishReason.LENGTH,
    EngineFinishReason.ABORT: FinishReason.CANCELLED,
    EngineFinishReason.ERROR: FinishReason.ERROR,
}


def to_sampling_params(request: PreprocessedRequest, info: EngineInfo) -> SamplingParams:
    stop = request.stop_conditions
    opts = request.sampling_options
    max_new = stop.max_tokens
    if max_new is None:
        # No limit asked for: generate up to the context, as an OpenAI server does.
        max_new = max(info.context_length - len(request.token_ids), 0)
    eos = set(request.eos_token_ids) | set(info.eos_token_ids)
    stop_ids = list(dict.fromkeys(stop.stop_token_ids_hidden or []))
    if stop.ignore_eos:
        stop_ids = [t for t in stop_ids if t not in eos]
    else:
        stop_ids += [t for t in request.eos_token_ids if t not in stop_ids]
    params = SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=stop.min_tokens or 0,
        stop_token_ids=stop_ids,
        ignore_eos=stop.ignore_eos,
    )
    for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "seed"):
        value = getattr(opts, name)
        if value is not None:
            setattr(params, name, value)
    return params


def to_generate_request(request: PreprocessedRequest, rid: str, info: EngineInfo) -> GenerateRequest:
    if not request.token_ids:
        raise InvalidRequestError("the request has no prompt tokens")
    out = request.output_options
    top = 0
    return_logprob = False
    logprob_start_len: int | None = None
    if out.logprobs is not None:
        return_logprob = True
        top = max(top, out.logprobs)
    if out.prompt_logprobs is not None:
        return_logprob = True
        logprob_start_len = 0
        top = max(top, out.prompt_logprobs)
    return GenerateRequest(
        rid=rid,
        input_ids=list(request.token_ids),
        sampling=to_sampling_params(request, info),
        return_logprob=return_logprob,
        top_logprobs_num=top,
        logprob_start_len=logprob_start_len,
        bootstrap=request.bootstrap_info,
        dp_rank=request.routing.dp_rank if request.routing is not None else None,
    )


@contextlib.asynccontextmanager
async def closing_stream(
    stream: AsyncIterator[GenerateOutput],
) -> AsyncIterator[AsyncIterator[GenerateOutput]]:
    """``contextlib.aclosing`` for ``Engine.generate_stream``, which promises only an iterator: the
    engines return async generators, and closing one when a handler stops early runs its cleanup
    now rather than whenever it is collected."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _tops(rows: list[list[tuple[int, float]]] | None, k: int | None) -> list[list[TopLogprob]] | None:
    if rows is None or not k:
        return None
    return [[TopLogprob(token_id=t, logprob=lp) for t, lp in row[:k]] for row in rows]


def to_engine_output(out: GenerateOutput, request: PreprocessedRequest) -> LLMEngineOutput:
    opts = request.output_options
    item = LLMEngineOutput(token_ids=out.token_ids)
    if opts.logprobs is not None and out.logprobs is not None:
        item.log_probs = out.logprobs
        item.top_logprobs = _tops(out.top_logprobs, opts.logprobs)
    if opts.prompt_logprobs is not None and out.input_logprobs is not None:
        item.prompt_logprobs = out.input_logprobs
        item.prompt_top_logprobs = _tops(out.input_top_logprobs, opts.prompt_logprobs)
    if out.finish_reason is not None:
        item.finish_reason = _FINISH[out.finish_reason]
        if out.finish_reason is EngineFinishReason.STOP:
            item.matched_stop = out.matched_stop
        if out.error:
            item.error = out.error
        item.usage = CompletionUsage(
            prompt_tokens=out.prompt_tokens or len(request.token_ids),
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
        )
    return item


class DecodeWorkerHandler(BaseWorkerHandler):
    """Serves ``{ns}.backend.generate`` for aggregated and disaggregated-decode workers.

    A disaggregated decode worker continues requests whose ``bootstrap_info`` names the prefill
    worker holding their KV; one without it is served aggregated (the frontend's
    ``--decode-fallback`` when no prefill worker is left) — except on the sglang engine, whose
    decode mode cannot prefill, so there such a request is refused.
    """

    require_bootstrap = False

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[LLMEngineOutput]:
        await self.wait_ready()
        if self.shutdown_event.is_set():
            raise EngineShutdown("worker is shutting down")
        rid, greq = self._admit(request, context)
        finished = False
        async with self.cancellation_monitor(rid, context) as cancel:
            try:
                async with closing_stream(self.engine.generate_stream(greq)) as stream:
                    async for out in stream:
                        finished = out.finished
                        stop, item = _item_for(out, request, context, cancel.shutdown)
                        if item is not None:
                            yield item
                        if stop:
                            return
                # The engine ended the stream without a finish reason: it is going away, so the
                # caller should continue the request elsewhere rather than see a silent cut.
                raise EngineShutdown("the engine ended the stream without finishing the request")
            except InvalidRequestError as exc:
                finished = True
                raise RequestPlaneError(ErrorKind.INVALID_REQUEST, str(exc), migratable=False) from exc
            finally:
                if not finished:
                    # Killed, or the caller went away: free the request's pages now.
                    await self.engine.abort(rid)

    def _admit(self, request: PreprocessedRequest, context: Context) -> tuple[str, GenerateRequest]:
        rid = f"{context.id()}-{new_span_id()[:8]}"
        try:
            if self.require_bootstrap and request.bootstrap_info is None:
                raise InvalidRequestError(
                    "this is a disaggregated decode worker: the request needs bootstrap_info from a prefill worker"
                )
            greq = to_generate_request(request, rid, self.engine.info)
            greq.sampling.validate()
        except InvalidRequestError as exc:
            raise RequestPlaneError(ErrorKind.INVALID_REQUEST, str(exc), migratable=False) from exc
        return rid, greq

    @functools.cached_property
    def can_push(self) -> bool:
        # Once: isinstance against a runtime-checkable Protocol walks its members (~20 µs).
        return isinstance(self.engine, PushEngine)

    async def generate_push(
        self, request: PreprocessedRequest, context: Context, emit: Callable[[LLMEngineOutput], None]
    ) -> None:
        """``generate`` by pushing: each engine output is converted and sent from the engine's
        output callback, with no task wake-up per token (the request plane's ``PushHandler``)."""
        if not self.can_push:
            async for item in self.generate(request, context):
                emit(item)
            return
        engine = cast(PushEngine, self.engine)
        await self.wait_ready()
        if self.shutdown_event.is_set():
            raise EngineShutdown("worker is shutting down")
        rid, greq = self._admit(request, context)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        finished = False
        async with self.cancellation_monitor(rid, context) as cancel:

            def on_output(out: GenerateOutput) -> None:
                nonlocal finished
                if done.done():
                    return
                try:
                    finished = out.finished
                    stop, item = _item_for(out, request, context, cancel.shutdown)
                    if item is not None:
                        emit(item)
                    if stop:
                        done.set_result(None)
                except BaseException as exc:  # noqa: BLE001 - ends this stream with it, as the generator would
                    done.set_exception(exc)

            try:
                engine.generate_push(greq, on_output)
                await done
            except InvalidRequestError as exc:
                finished = True
                raise RequestPlaneError(ErrorKind.INVALID_REQUEST, str(exc), migratable=False) from exc
            finally:
                if not finished:
                    # Killed, or the caller went away: free the request's pages now.
                    await self.engine.abort(rid)


def _item_for(
    out: GenerateOutput, request: PreprocessedRequest, context: Context, shutting_down: bool
) -> tuple[bool, LLMEngineOutput | None]:
    """For one engine output: whether the stream ends with it, and the item to send (None: none).
    Raises what ends the stream with an error."""
    if shutting_down and out.finish_reason is EngineFinishReason.ABORT:
        # Cut short by shutdown, not by the caller: let the frontend migrate it.
        raise EngineShutdown("engine was shut down during token generation")
    if context.is_killed():
        return True, None
    if out.finish_reason is EngineFinishReason.ERROR and is_transfer_error(out.error):
        # The prefill worker (or the way to it) failed before any token: the frontend may run
        # the request again with another prefill worker.
        raise RequestPlaneError(ErrorKind.HANDLER_ERROR, out.error or "", migratable=True)
    if not out.token_ids and not out.finished and out.input_logprobs is None:
        return False, None
    return out.finished, to_engine_output(out, request)
