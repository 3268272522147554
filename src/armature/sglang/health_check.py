"""Canary payloads the runtime sends to an idle endpoint to prove the engine still answers.

As in Dynamo: the smallest real generation (the BOS token, ``max_tokens: 1``, greedy). An operator
may replace it with ``DYN_HEALTH_CHECK_PAYLOAD`` (a JSON object, or ``@/path/to/file.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec

from armature.protocols.embedding import EmbeddingRequest
from armature.protocols.llm import PreprocessedRequest, SamplingOptions, StopConditions

ENV_PAYLOAD = "DYN_HEALTH_CHECK_PAYLOAD"
# Dynamo's fallback when the tokenizer has no BOS token.
FALLBACK_BOS = 1


class HealthCheckPayloadError(ValueError):
    """``DYN_HEALTH_CHECK_PAYLOAD`` is set but is not a JSON object."""


def _env_override() -> dict[str, Any] | None:
    raw = os.environ.get(ENV_PAYLOAD)
    if not raw:
        return None
    source = ENV_PAYLOAD
    if raw.startswith("@"):
        source = raw[1:]
        try:
            raw = Path(source).read_text()
        except OSError as exc:
            raise HealthCheckPayloadError(f"{ENV_PAYLOAD}: cannot read {source}: {exc}") from exc
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HealthCheckPayloadError(f"{ENV_PAYLOAD} ({source}) is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HealthCheckPayloadError(f"{ENV_PAYLOAD} ({source}) must be a JSON object")
    return value


def decode_request(model: str, bos_token_id: int | None) -> PreprocessedRequest:
    """The aggregated/decode canary as a wire request."""
    return PreprocessedRequest(
        model=model,
        token_ids=[bos_token_id if bos_token_id is not None else FALLBACK_BOS],
        stop_conditions=StopConditions(max_tokens=1, ignore_eos=False),
        sampling_options=SamplingOptions(temperature=0.0, top_p=1.0, top_k=-1),
        eos_token_ids=[],
    )


def decode_payload(model: str, bos_token_id: int | None) -> dict[str, Any]:
    """JSON object form (what the runtime stores and sends), env override applied."""
    override = _env_override()
    if override is not None:
        # Dynamo's payloads carry no model name; our request struct requires one.
        override.setdefault("model", model)
        return override
    return msgspec.to_builtins(decode_request(model, bos_token_id))


def embedding_payload(model: str, bos_token_id: int | None) -> dict[str, Any]:
    """An embedding worker's canary: the BOS token embedded (env override applied)."""
    override = _env_override()
    if override is not None:
        override.setdefault("model", model)
        return override
    bos = bos_token_id if bos_token_id is not None else FALLBACK_BOS
    return msgspec.to_builtins(EmbeddingRequest(model=model, token_ids=[[bos]]))
