"""Engine settings, named as SGLang's ``ServerArgs`` so launch scripts and habits carry over."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half", "float")


class ServerArgsError(ValueError):
    """A setting is out of range or inconsistent with another one."""


@dataclass
class KvEventsConfig:
    """SGLang's ``--kv-events-config`` JSON (only the ``zmq`` publisher exists)."""

    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    topic: str = ""
    hwm: int = 100_000
    max_queue_size: int = 100_000

    @classmethod
    def from_json(cls, text: str) -> KvEventsConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServerArgsError(f"kv_events_config is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ServerArgsError("kv_events_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        # SGLang accepts replay/snapshot knobs we do not implement; refusing them loudly beats
        # a router that silently never gets a replay.
        unknown = sorted(set(raw) - known - {"buffer_steps"})
        if unknown:
            raise ServerArgsError(f"kv_events_config: unsupported keys {unknown}; known: {sorted(known)}")
        raw.pop("buffer_steps", None)
        cfg = cls(**raw)
        if cfg.publisher != "zmq":
            raise ServerArgsError(f"kv_events_config.publisher must be 'zmq', got {cfg.publisher!r}")
        if not cfg.endpoint or "://" not in cfg.endpoint:
            raise ServerArgsError(f"kv_events_config.endpoint must be a ZMQ URL, got {cfg.endpoint!r}")
        if cfg.hwm <= 0 or cfg.max_queue_size <= 0:
            raise ServerArgsError("kv_events_config.hwm and max_queue_size must be positive")
        return cfg


@dataclass
class ServerArgs:
    model_path: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    page_size: int = 16
    # KV pool size: an explicit token count wins over the memory fraction.
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    context_length: int | None = None
    # Per-step prefill token budget, and the largest piece one prompt is cut into (<= 0: no chunking).
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    disable_radix_cache: bool = False
    # Run prefill chunks and decodes in one forward (SGLang's --enable-mixed-chunk).
    enable_mixed_chunk: bool = False
    kv_events_config: str | None = None
    stream_interval: int = 1
    random_seed: int = 0
    dp_size: int = 1
    skip_tokenizer_init: bool = False
    # GPU: attention kernels (auto = triton on CUDA, torch on CPU), decode CUDA graphs up to this
    # batch size, and overlapping the next step's host work with the current forward.
    attention_backend: str = "auto"
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    # None: overlap where it pays (CUDA); True: never; False: also on the CPU (no speed-up there,
    # but the same code path, which the CPU tests use).
    disable_overlap_schedule: bool | None = None
    log_level: str = "error"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.page_size <= 0:
            raise ServerArgsError(f"page_size must be positive, got {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ServerArgsError(
                f"max_total_tokens ({self.max_total_tokens}) must hold at least one page ({self.page_size})"
            )
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ServerArgsError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.context_length is not None and self.context_length <= 1:
            raise ServerArgsError(f"context_length must be > 1, got {self.context_length}")
        if self.max_prefill_tokens <= 0:
            raise ServerArgsError(f"max_prefill_tokens must be positive, got {self.max_prefill_tokens}")
        if self.max_running_requests <= 0:
            raise ServerArgsError(f"max_running_requests must be positive, got {self.max_running_requests}")
        if self.stream_interval <= 0:
            raise ServerArgsError(f"stream_interval must be positive, got {self.stream_interval}")
        if self.dp_size != 1:
            raise ServerArgsError(f"dp_size={self.dp_size}: the native engine runs one data-parallel rank; launch one worker per rank")
        if self.dtype not in _DTYPES:
            raise ServerArgsError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ServerArgsError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ServerArgsError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs <= 0:
            raise ServerArgsError(f"cuda_graph_max_bs must be positive, got {self.cuda_graph_max_bs}")
        if self.kv_events_config:
            KvEventsConfig.from_json(self.kv_events_config)

    @property
    def prefill_chunk_limit(self) -> int | None:
        return self.chunked_prefill_size if self.chunked_prefill_size > 0 else None

    def kv_events(self) -> KvEventsConfig | None:
        return KvEventsConfig.from_json(self.kv_events_config) if self.kv_events_config else None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ServerArgsError(f"unknown engine arguments {unknown}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
