"""Requests and responses between the frontend (preprocessor/router) and a worker.

The frontend tokenizes and sends a ``PreprocessedRequest``; the worker streams back
``LLMEngineOutput`` deltas (token ids, logprobs, finish reason, usage). Field names follow
Dynamo's common protocol so launch scripts and mental models carry over.
"""

from __future__ import annotations

from enum import Enum

import msgspec


class StopConditions(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_tokens: int | None = None
    # Stop strings are matched by the frontend on detokenized text (the engine sees ids only).
    stop: list[str] | None = None
    # Ids that end generation; the matched id is not shown to the client (e.g. EOS).
    stop_token_ids_hidden: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False


class SamplingOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


class OutputOptions(msgspec.Struct, kw_only=True, omit_defaults=True):
    logprobs: int | None = None  # None: none; 0: chosen token only; k: plus top-k alternatives
    prompt_logprobs: int | None = None  # same, for the prompt positions (completions `echo`)
    skip_special_tokens: bool = True


class BootstrapInfo(msgspec.Struct, kw_only=True):
    bootstrap_host: str
    bootstrap_port: int
    bootstrap_room: int


class RoutingHints(msgspec.Struct, kw_only=True, omit_defaults=True):
    backend_instance_id: int | None = None
    prefill_worker_id: int | None = None
    decode_worker_id: int | None = None
    dp_rank: int | None = None
    overlap_score_weight: float | None = None
    router_temperature: float | None = None


class PreprocessedRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    token_ids: list[int]
    stop_conditions: StopConditions = msgspec.field(default_factory=StopConditions)
    sampling_options: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output_options: OutputOptions = msgspec.field(default_factory=OutputOptions)
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    bootstrap_info: BootstrapInfo | None = None
    routing: RoutingHints | None = None
    # Free-form request annotations (e.g. "request_id"); never interpreted by the engine.
    annotations: list[str] | None = None


class FinishReason(str, Enum):
    STOP = "stop"  # a stop token id matched (EOS or user stop ids) or a stop string (frontend)
    LENGTH = "length"  # max_tokens or the context length reached
    CANCELLED = "cancelled"  # aborted by the caller
    ERROR = "error"


class TopLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class CompletionUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class LLMEngineOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    token_ids: list[int] = msgspec.field(default_factory=list)
    # One logprob per token in ``token_ids`` (when requested), and per token its alternatives.
    log_probs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    # Prompt logprobs arrive once, on the first output: one entry per prompt position
    # (None for position 0, which has no prediction).
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    finish_reason: FinishReason | None = None
    # Which stop token id matched, when finish_reason is STOP.
    matched_stop: int | None = None
    error: str | None = None
    usage: CompletionUsage | None = None
    # For disaggregation: the prefill worker returns where its KV can be fetched.
    disaggregated_params: BootstrapInfo | None = None
    index: int | None = None
