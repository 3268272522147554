"""``POST /v1/embeddings``: OpenAI's embeddings API in front of ``--embedding-worker`` workers.

The frontend tokenizes ``input`` (a string, strings, token ids or token-id lists, as OpenAI
takes them) and sends the whole batch to one worker, which answers every input at once. An
embedding is idempotent, so a worker that fails or goes away mid-request (a migratable error)
is simply asked again elsewhere, up to the model's migration limit.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from armature.frontend.errors import ApiError
from armature.frontend.model_router import ModelRouter
from armature.frontend.models import ServedModel
from armature.frontend.openai import PROMPT_SCHEMA, PromptItem
from armature.protocols.embedding import EmbeddingRequest, EmbeddingResponse, unpack_vector
from armature.router.push import PushRouter
from armature.runtime.context import Context
from armature.runtime.request_plane.base import RequestPlaneError


class EmbeddingCreateRequest(msgspec.Struct, kw_only=True):
    model: str
    input: Annotated[str | list[PromptItem], Meta(extra_json_schema=PROMPT_SCHEMA)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class EmbeddingObject(msgspec.Struct):
    object: str
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format "base64"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    object: str
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


embedding_request_decoder = msgspec.json.Decoder(EmbeddingCreateRequest)
_encoder = msgspec.json.Encoder()



async def _ask(model: ServedModel, request: EmbeddingRequest, context: Context) -> EmbeddingResponse:
    # ModelManager gives embedding models a plain router (no KV index, no prefill phase) behind
    # the model's own-workers layer.
    router = model.router
    assert isinstance(router, ModelRouter) and isinstance(router.inner, PushRouter), type(router).__name__
    failed: set[int] = set()
    retries = model.migration_limit
    while True:
        instance = None
        try:
            instance, stream = await router.generate(request, context.child(), exclude=failed)
            answer: Any = None
            async for item in stream:
                answer = item
        except RequestPlaneError as exc:
            if not exc.migratable or retries <= 0 or context.is_stopped():
                raise
            retries -= 1
            if instance is not None:
                failed.add(instance)
            continue
        if not isinstance(answer, EmbeddingResponse):
            raise ApiError(500, "the worker ended the request without embeddings", code="engine_error")
        return answer


async def create_embeddings(
    model: ServedModel, req: EmbeddingCreateRequest, context: Context
) -> tuple[bytes, int]:
    """The response body and the number of prompt tokens."""
    token_ids = await model.preprocessor.embedding_inputs(req.input)
    wire = EmbeddingRequest(model=model.name, token_ids=token_ids, dimensions=req.dimensions)
    answer = await _ask(model, wire, context)
    if len(answer.embeddings) != len(token_ids):
        raise ApiError(
            500,
            f"the worker returned {len(answer.embeddings)} embeddings for {len(token_ids)} inputs",
            code="engine_error",
        )
    as_base64 = req.encoding_format == "base64"
    data = [
        EmbeddingObject("embedding", i, base64.b64encode(raw).decode() if as_base64 else unpack_vector(raw))
        for i, raw in enumerate(answer.embeddings)
    ]
    usage = EmbeddingUsage(answer.prompt_tokens, answer.prompt_tokens)
    return _encoder.encode(EmbeddingList("list", data, model.name, usage)), answer.prompt_tokens
