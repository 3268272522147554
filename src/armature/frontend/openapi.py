"""The OpenAPI document, generated from the same msgspec Structs that validate requests."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec

from armature.frontend.embeddings import EmbeddingCreateRequest, EmbeddingList
from armature.frontend.openai import (
    PROMPT_SCHEMA,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)

_REF = "#/components/schemas/{name}"


def _error_responses(*codes: int) -> dict[str, Any]:
    text = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        503: "No worker serves the model, or the frontend is draining",
    }
    return {
        str(c): {
            "description": text[c],
            "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorResponse")}}},
        }
        for c in codes
    }


def _post(request: str, response: str, summary: str, stream: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(name=response)}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(name=request)}}},
            },
            "responses": {
                "200": {
                    "description": "The completion, or an SSE stream of chunks when stream=true" if stream else "OK",
                    "content": content,
                },
                **_error_responses(400, 401, 404, 413, 503),
            },
        }
    }


def _get(summary: str, content: dict[str, Any], extra: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "OK", "content": content}, **_error_responses(*extra)},
        }
    }


@lru_cache(maxsize=8)
def openapi_document(models: tuple[str, ...] = ()) -> bytes:
    """The document; ``models`` (the names served now) become the examples of ``model``."""
    _, components = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest, EmbeddingCreateRequest, ChatCompletion, Completion, EmbeddingList,
         ModelList, ErrorResponse],
        ref_template=_REF,
    )  # fmt: skip
    components["CompletionRequest"]["properties"]["prompt"] = PROMPT_SCHEMA
    components["EmbeddingCreateRequest"]["properties"]["input"] = PROMPT_SCHEMA
    if models:
        for name in ("ChatCompletionRequest", "CompletionRequest", "EmbeddingCreateRequest"):
            components[name]["properties"]["model"]["examples"] = list(models)
    status = {"application/json": {"schema": {"type": "object"}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Armature OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/chat/completions": _post("ChatCompletionRequest", "ChatCompletion", "Chat completion"),
            "/v1/completions": _post("CompletionRequest", "Completion", "Text completion"),
            "/v1/embeddings": _post("EmbeddingCreateRequest", "EmbeddingList", "Embeddings", stream=False),
            "/v1/models": _get(
                "Served models", {"application/json": {"schema": {"$ref": _REF.format(name="ModelList")}}}, (401,)
            ),
            "/health": _get("Ready to serve (503 while no worker serves or while draining)", status, (503,)),
            "/live": _get("Process is alive", status, (503,)),
            "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
        },
        "components": {"schemas": components},
    }
    return msgspec.json.encode(doc)
