"""The model card a worker publishes, and registration behind a readiness gate.

The card tells frontends everything they need to serve the model without loading it: its name,
the OpenAI endpoints it answers, where the tokenizer and chat template live, the context length,
the KV block size (= the engine's page size) and the runtime limits the router and planner use.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from armature.engine.api import Engine, EngineInfo
from armature.protocols.model_card import ModelCard, ModelType, RuntimeConfig
from armature.sglang.args import ServingMode, WorkerConfig

log = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """The model card could not be published; the worker must not keep running unseen."""


def _template_from_tokenizer_config(folder: Path) -> str | None:
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistrationError(f"cannot read {cfg_path}: {exc}") from exc
        template = cfg.get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            # Several named templates (HF convention): the frontend renders the default one.
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            chosen = named.get("default") or next((v for v in named.values() if v), None)
            if chosen:
                return str(chosen)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return None


def resolve_chat_template(config: WorkerConfig, model_folder: Path) -> str | None:
    """``--custom-jinja-template`` wins, then a ``--chat-template`` file, then the model's own."""
    if config.dynamo.custom_jinja_template:
        return Path(config.dynamo.custom_jinja_template).read_text()
    if config.server.chat_template and Path(config.server.chat_template).is_file():
        return Path(config.server.chat_template).read_text()
    return _template_from_tokenizer_config(model_folder)


def build_runtime_config(config: WorkerConfig, info: EngineInfo) -> RuntimeConfig:
    disaggregated = config.serving_mode is not ServingMode.AGGREGATED
    return RuntimeConfig(
        total_kv_blocks=info.total_kv_blocks,
        max_num_seqs=info.max_running_requests,
        max_num_batched_tokens=info.max_prefill_tokens,
        data_parallel_size=info.dp_size,
        bootstrap_host=info.bootstrap_host if disaggregated else None,
        bootstrap_port=info.bootstrap_port if disaggregated else None,
        tool_call_parser=config.dynamo.dyn_tool_call_parser,
        reasoning_parser=config.dynamo.dyn_reasoning_parser,
        # The worker answers kv_indexer_query / kv_indexer_snapshot (handlers/kv_query.py);
        # as in Dynamo, decode workers leave KV-aware routing to the prefill side.
        enable_local_indexer=config.serving_mode is not ServingMode.DECODE,
    )


def build_model_card(config: WorkerConfig, info: EngineInfo) -> ModelCard:
    folder = Path(config.resolved_model_path)
    if not folder.is_dir():
        raise RegistrationError(f"model folder {folder} does not exist; the frontend needs its tokenizer files")
    model_types = list(config.model_types)
    chat_template = resolve_chat_template(config, folder)
    if ModelType.CHAT in model_types and chat_template is None:
        raise RegistrationError(
            f"{folder} has no chat template (tokenizer_config.json or chat_template.jinja); pass "
            "--custom-jinja-template FILE or register completions only with --endpoint-types completions"
        )
    return ModelCard(
        name=config.server.served_model_name,
        model_types=model_types,
        tokenizer_path=str(folder),
        chat_template=chat_template,
        context_length=info.context_length,
        kv_cache_block_size=info.page_size,
        eos_token_ids=list(info.eos_token_ids),
        bos_token_id=info.bos_token_id,
        runtime_config=build_runtime_config(config, info),
        endpoint=str(config.endpoint),
        migration_limit=config.dynamo.migration_limit,
    )


async def register_with_readiness_gate(
    register: Callable[[], Awaitable[None]],
    ready: asyncio.Event,
    engine: Engine,
) -> None:
    """Run ``register``; open the gate on success, shut the engine down and raise on failure.

    Requests that reach the handler before the gate opens wait on ``ready`` (the endpoint serves
    concurrently with registration, as in Dynamo).
    """
    try:
        await register()
    except Exception as exc:
        log.error("model registration failed: %s", exc)
        await engine.shutdown()
        raise RegistrationError(f"model registration failed: {exc}") from exc
    ready.set()
