"""Disaggregated prefill handler: compute the prompt's KV and hand it to a decode worker.

The first (and only) item tells the caller where the KV can be fetched — this worker's bootstrap
host and port and a room number — so the caller can start the decode request at once; the stream
then stays open until the engine has finished the prefill and the KV transfer (Dynamo's shape).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

from armature.engine.api import (
    Engine,
    EngineError,
    EngineFinishReason,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from armature.protocols.llm import BootstrapInfo, LLMEngineOutput, PreprocessedRequest
from armature.runtime.context import Context
from armature.runtime.request_plane.base import EngineShutdown, ErrorKind, RequestPlaneError
from armature.sglang.handlers.base import BaseWorkerHandler
from armature.sglang.handlers.decode import closing_stream, to_generate_request


WARMUP_PROMPT_TOKENS = 16


async def warm_up(engine: Engine) -> None:
    """One short greedy request through the engine before the worker registers (as SGLang's
    prefill server does), so the first real prompt does not pay for first-call setup."""
    info = engine.info
    token = info.bos_token_id if info.bos_token_id is not None else 0
    req = GenerateRequest(
        rid=f"warmup-{uuid.uuid4().hex[:8]}",
        input_ids=[token] * min(WARMUP_PROMPT_TOKENS, max(1, info.context_length - 2)),
        sampling=SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
    )
    last = None
    async with closing_stream(engine.generate_stream(req)) as stream:
        async for out in stream:
            last = out
    if last is None or last.finish_reason is EngineFinishReason.ERROR:
        raise EngineError(f"the warm-up request failed: {last.error if last else 'no output'}")


class PrefillWorkerHandler(BaseWorkerHandler):
    """Serves ``{ns}.prefill.generate``."""

    def bootstrap_for(self, request: PreprocessedRequest) -> BootstrapInfo:
        info = self.engine.info
        if info.bootstrap_port is None:
            raise RequestPlaneError(ErrorKind.HANDLER_ERROR, "this engine has no bootstrap server", migratable=False)
        # A router may pick the room ahead (so it can tell the decode worker at once).
        room = request.bootstrap_info.bootstrap_room if request.bootstrap_info else secrets.randbits(63)
        return BootstrapInfo(
            bootstrap_host=info.bootstrap_host or "127.0.0.1", bootstrap_port=info.bootstrap_port, bootstrap_room=room
        )

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[LLMEngineOutput]:
        await self.wait_ready()
        if self.shutdown_event.is_set():
            raise EngineShutdown("worker is shutting down")
        rid = f"{context.id()}-{uuid.uuid4().hex[:8]}"
        boot = self.bootstrap_for(request)
        try:
            greq = to_generate_request(request, rid, self.engine.info)
            # Prefill computes the prompt and one token; the decode worker continues from there.
            # min_new_tokens stays: it keeps a stop token from being that first token, as in
            # aggregated serving.
            greq.sampling.max_new_tokens = 1
            greq.bootstrap = boot
            greq.sampling.validate()
        except InvalidRequestError as exc:
            raise RequestPlaneError(ErrorKind.INVALID_REQUEST, str(exc), migratable=False) from exc
        yield LLMEngineOutput(disaggregated_params=boot)
        finished = False
        async with self.cancellation_monitor(rid, context) as cancel:
            try:
                async with closing_stream(self.engine.generate_stream(greq)) as stream:
                    async for out in stream:
                        if not out.finished:
                            continue
                        finished = True
                        if out.finish_reason is EngineFinishReason.ERROR:
                            raise RequestPlaneError(
                                ErrorKind.HANDLER_ERROR, out.error or "prefill failed", migratable=True
                            )
                        if cancel.shutdown and out.finish_reason is EngineFinishReason.ABORT:
                            raise EngineShutdown("engine was shut down during prefill")
                        return
                raise EngineShutdown("the engine ended the prefill stream without finishing it")
            except InvalidRequestError as exc:
                finished = True
                raise RequestPlaneError(ErrorKind.INVALID_REQUEST, str(exc), migratable=False) from exc
            finally:
                if not finished:
                    await self.engine.abort(rid)
