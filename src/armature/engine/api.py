"""The typed engine interface every worker handler talks to (native, mocker, sglang).

Handlers never see a concrete engine: they build a ``GenerateRequest`` with a caller-assigned
``rid`` (so ``abort`` works before the first token) and consume ``GenerateOutput`` deltas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from armature.protocols.kv_events import EventBatch
from armature.protocols.llm import BootstrapInfo


class EngineError(Exception):
    """Base class of errors an engine raises to its caller."""


class InvalidRequestError(EngineError):
    """The request can never be served as given (e.g. longer than the context)."""


class EngineFinishReason(str, Enum):
    STOP = "stop"  # matched a stop token id (see ``GenerateOutput.matched_stop``)
    LENGTH = "length"  # max_new_tokens or the context length reached
    ABORT = "abort"  # aborted by the caller or by shutdown
    ERROR = "error"  # the engine failed this request (see ``GenerateOutput.error``)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0  # < 1e-6 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 disables
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise InvalidRequestError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError("frequency_penalty must be in [-2, 2]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError("presence_penalty must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError("repetition_penalty must be in (0, 2]")


@dataclass
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # Return prompt logprobs from this prompt position on; None for none.
    logprob_start_len: int | None = None
    bootstrap: BootstrapInfo | None = None
    dp_rank: int | None = None
    lora_name: str | None = None


@dataclass
class GenerateOutput:
    rid: str
    token_ids: list[int] = field(default_factory=list)  # delta since the previous output
    logprobs: list[float] | None = None  # one per token in token_ids
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob) pairs
    # Prompt logprobs (first output only): entry i is log p(input[i] | input[:i]).
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: EngineFinishReason | None = None
    matched_stop: int | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EncodeRequest:
    rid: str
    input_ids: list[int]


@dataclass
class EncodeOutput:
    rid: str
    embedding: list[float]
    prompt_tokens: int


@dataclass
class EngineInfo:
    model_path: str
    served_model_name: str
    page_size: int
    total_kv_blocks: int
    max_running_requests: int
    max_prefill_tokens: int
    context_length: int
    vocab_size: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dp_size: int = 1
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    kv_events_endpoint: str | None = None
    engine_kind: str = "native"


@dataclass
class LoadMetrics:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_active_blocks: int = 0  # pages locked by running requests
    kv_cached_blocks: int = 0  # pages held by the prefix cache, evictable
    kv_total_blocks: int = 0
    cache_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens since start
    num_retractions: int = 0
    dp_rank: int = 0


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo

    def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream deltas for one request; the last item has ``finish_reason`` set.

        Raises ``InvalidRequestError`` (from the first ``__anext__``) for a request that can
        never run, such as one longer than the context.
        """
        ...

    async def encode(self, req: EncodeRequest) -> EncodeOutput: ...

    async def abort(self, rid: str) -> None:
        """Abort in any phase (waiting, mid-prefill, decoding); frees its pages at once."""
        ...

    def load_metrics(self) -> LoadMetrics: ...

    async def flush_cache(self) -> bool: ...

    async def release_memory(self, tags: list[str] | None = None) -> None: ...

    async def resume_memory(self, tags: list[str] | None = None) -> None: ...

    async def update_weights_from_disk(self, model_path: str) -> None: ...

    async def start_profile(self) -> None: ...

    async def stop_profile(self) -> str | None:
        """The trace's path when the engine writes one."""
        ...

    def shutdown(self) -> Awaitable[None]:
        """Stop the engine; await the result (an ``async def`` qualifies)."""
        ...


OutputCallback = Callable[[GenerateOutput], None]
KvBatchCallback = Callable[[EventBatch], None]


@runtime_checkable
class KvEventSource(Protocol):
    """An engine in the worker's own process that hands its KV event batches to a callback: the
    worker relays them without the ZMQ socket and thread an engine in another process needs.
    Optional: without it (or with ``--kv-events-config``) the worker subscribes to the engine's
    ZMQ endpoint as it would to SGLang's."""

    def add_kv_event_listener(self, on_batch: KvBatchCallback) -> None:
        """``on_batch`` then runs on the calling thread's event loop with each batch, in order."""
        ...


@runtime_checkable
class PushEngine(Protocol):
    """An engine that can also hand a request's outputs to a callback, without a task wake-up per
    output (a worker serving many streams then does per step what ``generate_stream`` does per
    output and per stream). Optional: handlers fall back to ``generate_stream``."""

    def generate_push(self, req: GenerateRequest, on_output: OutputCallback) -> None:
        """Submit ``req``; ``on_output`` then runs on the calling thread's event loop with each
        output, the last one with ``finish_reason`` set. Raises ``InvalidRequestError`` at once for
        a request that can never run. ``abort(rid)`` ends it (with a final ABORT output)."""
        ...
