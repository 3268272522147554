"""Model deployment card: what a worker registers in discovery so frontends can serve it."""

from __future__ import annotations

from enum import Enum

import msgspec


class ModelType(str, Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDING = "embedding"
    PREFILL = "prefill"


class RuntimeConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    data_parallel_size: int = 1
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_local_indexer: bool = False


class ModelCard(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str  # the served model name clients put in "model"
    model_types: list[ModelType]
    # Folder holding tokenizer.json / tokenizer_config.json (shared disk or same host).
    tokenizer_path: str
    chat_template: str | None = None
    context_length: int
    kv_cache_block_size: int
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    bos_token_id: int | None = None
    runtime_config: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    # Namespace.component.endpoint that serves this card, e.g. "dynamo.backend.generate".
    endpoint: str = ""
    migration_limit: int = 0
