"""Embedding handler: ``EmbeddingRequest`` in, one ``EmbeddingResponse`` out.

Every input of a request goes to the engine at once; the native engine packs inputs that arrive
together (from this request and others) into shared forwards. A caller who stops or kills the
request, or a worker shutdown, cancels what has not run yet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from armature.engine.api import EncodeOutput, EncodeRequest, InvalidRequestError
from armature.protocols.embedding import EmbeddingRequest, EmbeddingResponse, pack_vector
from armature.runtime.context import Context, new_span_id
from armature.runtime.request_plane.base import EngineShutdown, ErrorKind, RequestPlaneError
from armature.sglang.handlers.base import BaseWorkerHandler


class EmbeddingWorkerHandler(BaseWorkerHandler):
    """Serves ``{ns}.backend.generate`` for ``--embedding-worker``."""

    async def generate(self, request: EmbeddingRequest, context: Context) -> AsyncIterator[EmbeddingResponse]:
        await self.wait_ready()
        if self.shutdown_event.is_set():
            raise EngineShutdown("worker is shutting down")
        if not request.token_ids:
            raise RequestPlaneError(ErrorKind.INVALID_REQUEST, "the request has no inputs", migratable=False)
        prefix = f"{context.id()}-{new_span_id()[:8]}"
        work = asyncio.gather(
            *(
                self.engine.encode(EncodeRequest(rid=f"{prefix}-{i}", input_ids=ids))
                for i, ids in enumerate(request.token_ids)
            )
        )

        def give_up(_: Context | None = None) -> None:
            work.cancel()

        context.add_callback(give_up)
        stop_on_shutdown = asyncio.ensure_future(self.shutdown_event.wait())
        stop_on_shutdown.add_done_callback(lambda _: work.cancel())
        try:
            outputs: list[EncodeOutput] = await work
        except InvalidRequestError as exc:
            raise RequestPlaneError(ErrorKind.INVALID_REQUEST, str(exc), migratable=False) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if context.is_stopped():
                return  # the caller gave up: nothing to send
            # Cut short by shutdown, not by the caller: the frontend may send it elsewhere.
            raise EngineShutdown("worker shut down during the embedding") from None
        finally:
            context.remove_callback(give_up)
            stop_on_shutdown.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
        width = len(outputs[0].embedding)
        if request.dimensions is not None and request.dimensions != width:
            raise RequestPlaneError(
                ErrorKind.INVALID_REQUEST,
                f"this model's embeddings have {width} dimensions; 'dimensions' {request.dimensions} "
                "would need a Matryoshka-trained model",
                migratable=False,
            )
        yield EmbeddingResponse(
            embeddings=[pack_vector(o.embedding) for o in outputs],
            prompt_tokens=sum(o.prompt_tokens for o in outputs),
        )
