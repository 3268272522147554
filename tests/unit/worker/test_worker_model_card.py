"""The model card a worker registers, and the readiness gate around registration."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sglang_standin import StandInSglEngine

from armature.engine.api import EngineInfo
from armature.protocols.model_card import ModelType
from armature.sglang.args import SglangServerConfig, parse_args
from armature.sglang.register import RegistrationError, build_model_card, register_with_readiness_gate
from armature.sglang.sgl_compat import SglangEngine

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return folder


def _info() -> EngineInfo:
    return EngineInfo(model_path="x", served_model_name="x", page_size=16, total_kv_blocks=512,
                      max_running_requests=64, max_prefill_tokens=4096, context_length=2048,
                      vocab_size=100, bos_token_id=1, eos_token_ids=[2, 3])


def test_card_fields(model_dir: Path) -> None:
    cfg = parse_args(["--model-path", str(model_dir), "--engine", "native", "--served-model-name", "tiny",
                      "--namespace", "ns", "--dyn-tool-call-parser", "hermes", "--migration-limit", "3"])
    card = build_model_card(cfg, _info())
    assert card.name == "tiny" and card.endpoint == "ns.backend.generate"
    assert card.model_types == [ModelType.CHAT, ModelType.COMPLETIONS]
    assert card.tokenizer_path == str(model_dir.resolve())
    assert card.chat_template == TEMPLATE
    assert (card.context_length, card.kv_cache_block_size) == (2048, 16)
    assert (card.eos_token_ids, card.bos_token_id, card.migration_limit) == ([2, 3], 1, 3)
    rc = card.runtime_config
    assert (rc.total_kv_blocks, rc.max_num_seqs, rc.max_num_batched_tokens, rc.data_parallel_size) == (512, 64, 4096, 1)
    assert rc.tool_call_parser == "hermes" and rc.reasoning_parser is None
    assert rc.bootstrap_port is None  # aggregated workers publish no bootstrap endpoint
    assert rc.enable_local_indexer is True


def test_custom_template_wins(model_dir: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom.jinja"
    custom.write_text("CUSTOM {{ messages }}")
    cfg = parse_args(["--model-path", str(model_dir), "--engine", "native", "--custom-jinja-template", str(custom)])
    assert build_model_card(cfg, _info()).chat_template == "CUSTOM {{ messages }}"


def test_named_templates_and_missing_template(model_dir: Path) -> None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    cfg = parse_args(["--model-path", str(model_dir), "--engine", "native"])
    assert build_model_card(cfg, _info()).chat_template == "D"
    (model_dir / "tokenizer_config.json").write_text("{}")
    with pytest.raises(RegistrationError, match="no chat template"):
        build_model_card(cfg, _info())
    cfg = parse_args(["--model-path", str(model_dir), "--engine", "native", "--endpoint-types", "completions"])
    assert build_model_card(cfg, _info()).chat_template is None


async def test_failed_registration_shuts_engine_down() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, SglangServerConfig(model_path="/m", served_model_name="m"))
    ready = asyncio.Event()

    async def failing() -> None:
        raise ConnectionError("discovery unreachable")

    with pytest.raises(RegistrationError, match="discovery unreachable"):
        await register_with_readiness_gate(failing, ready, engine)
    assert sgl.shut_down and not ready.is_set()

    async def ok() -> None:
        return None

    await register_with_readiness_gate(ok, ready, engine)
    assert ready.is_set()
