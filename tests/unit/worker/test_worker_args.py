"""``python -m armature.sglang`` argument parsing behaves as dynamo.sglang's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from armature.protocols.model_card import ModelType
from armature.sglang.args import ConfigError, ServingMode, parse_args
from armature.sglang.config_dump import dump_config


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def _parse(model_dir: str, *extra: str):
    return parse_args(["--model-path", model_dir, "--engine", "native", *extra])


def test_defaults(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DYN_NAMESPACE", "DYN_ENDPOINT", "DYN_DISCOVERY_BACKEND", "DYN_NAMESPACE_WORKER_SUFFIX"):
        monkeypatch.delenv(var, raising=False)
    cfg = _parse(model_dir)
    assert cfg.endpoint.url == "dyn://dynamo.backend.generate"
    assert cfg.server.served_model_name == model_dir  # defaults to the model path, as Dynamo
    assert cfg.model_types == [ModelType.CHAT, ModelType.COMPLETIONS]
    assert cfg.serving_mode is ServingMode.AGGREGATED
    assert cfg.server.tp_size == 1 and cfg.engine == "native"
    assert cfg.resolved_model_path == str(Path(model_dir).resolve())
    # Unset: the engine binds a free port when it starts, so several workers on one host never collide.
    assert cfg.server.disaggregation_bootstrap_port is None


def test_endpoint_inference(model_dir: str) -> None:
    assert _parse(model_dir, "--namespace", "ns1").endpoint.url == "dyn://ns1.backend.generate"
    assert _parse(model_dir, "--embedding-worker").endpoint.url == "dyn://dynamo.backend.generate"
    assert _parse(model_dir, "--embedding-worker").model_types == [ModelType.EMBEDDING]
    cfg = parse_args(["--model-path", model_dir, "--engine", "sglang", "--disaggregation-mode", "prefill"])
    assert cfg.endpoint.url == "dyn://dynamo.prefill.generate"
    assert cfg.serving_mode is ServingMode.PREFILL and cfg.model_types == [ModelType.PREFILL]
    explicit = _parse(model_dir, "--endpoint", "dyn://a.b.c")
    assert (explicit.endpoint.namespace, explicit.endpoint.component, explicit.endpoint.name) == ("a", "b", "c")


@pytest.mark.parametrize("bad", ["dyn://a.b", "a.b.c.d", "dyn://a..c"])
def test_malformed_endpoint_is_an_error(model_dir: str, bad: str) -> None:
    with pytest.raises(ConfigError, match="namespace.component.endpoint"):
        _parse(model_dir, "--endpoint", bad)


def test_env_vars_are_defaults_and_flags_win(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_NAMESPACE", "fromenv")
    monkeypatch.setenv("DYN_SGL_EMBEDDING_WORKER", "yes")
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "file")
    cfg = _parse(model_dir)
    assert cfg.dynamo.namespace == "fromenv" and cfg.dynamo.embedding_worker is True
    assert cfg.dynamo.discovery_backend == "file"
    cfg = _parse(model_dir, "--namespace", "fromflag", "--no-embedding-worker")
    assert cfg.dynamo.namespace == "fromflag" and cfg.dynamo.embedding_worker is False
    monkeypatch.setenv("DYN_NAMESPACE_WORKER_SUFFIX", "w3")
    assert _parse(model_dir).endpoint.namespace == "fromenv-w3"


def test_bad_env_values_are_clear_errors(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_SGL_EMBEDDING_WORKER", "maybe")
    with pytest.raises(ConfigError, match="DYN_SGL_EMBEDDING_WORKER"):
        _parse(model_dir)
    monkeypatch.delenv("DYN_SGL_EMBEDDING_WORKER")
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "zookeeper")
    with pytest.raises(ConfigError, match="DYN_DISCOVERY_BACKEND"):
        _parse(model_dir)


def test_unknown_argument_exits(model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(model_dir, "--no-such-flag", "1")
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_missing_model_path_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--engine", "native"])
    assert "--model-path" in capsys.readouterr().err


def test_hub_id_fails_offline_with_clear_message() -> None:
    with pytest.raises(ConfigError, match="Hugging Face Hub id.*does not download"):
        parse_args(["--model-path", "Qwen/Qwen3-0.6B", "--engine", "native"])


def test_parser_mutual_exclusion(model_dir: str) -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        _parse(model_dir, "--tool-call-parser", "hermes", "--dyn-tool-call-parser", "hermes")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        _parse(model_dir, "--reasoning-parser", "qwen3", "--dyn-reasoning-parser", "qwen3")


def test_tensor_parallel_needs_sglang_engine(model_dir: str) -> None:
    with pytest.raises(ConfigError, match="--tp 2.*--tp 1"):
        _parse(model_dir, "--tp", "2")
    assert parse_args(["--model-path", model_dir, "--engine", "sglang", "--tp", "2"]).server.tp_size == 2


def test_custom_template_must_exist(model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        _parse(model_dir, "--custom-jinja-template", str(tmp_path / "missing.jinja"))
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    monkeypatch.setenv("TEMPLATES", str(tmp_path))
    cfg = _parse(model_dir, "--custom-jinja-template", "$TEMPLATES/t.jinja")
    assert cfg.dynamo.custom_jinja_template == str(tmp_path / "t.jinja")


def test_endpoint_types(model_dir: str) -> None:
    assert _parse(model_dir, "--endpoint-types", "chat").model_types == [ModelType.CHAT]
    assert _parse(model_dir, "--dyn-endpoint-types", "completions").model_types == [ModelType.COMPLETIONS]
    with pytest.raises(ConfigError, match="unknown type 'images'"):
        _parse(model_dir, "--endpoint-types", "chat,images")


def test_kv_events_config_needs_endpoint(model_dir: str) -> None:
    with pytest.raises(ConfigError, match="endpoint"):
        _parse(model_dir, "--kv-events-config", '{"publisher":"zmq","topic":"kv-events"}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        _parse(model_dir, "--kv-events-config", "{nope")
    cfg = _parse(model_dir, "--kv-events-config", '{"publisher":"zmq","endpoint":"tcp://127.0.0.1:5557"}')
    assert cfg.server.use_kv_events and cfg.server.kv_events_endpoint == "tcp://127.0.0.1:5557"


DISAGG_YAML = """
prefill:
  page-size: 32
  disaggregation-mode: prefill
  disaggregation-bootstrap-port: 12345
  max-running-requests: 7
decode:
  page_size: 32
  disaggregation_mode: decode
  enable-metrics: true
listy: [1, 2]
"""


def test_disagg_config_section(model_dir: str, tmp_path: Path) -> None:
    cfg_file = tmp_path / "disagg.yaml"
    cfg_file.write_text(DISAGG_YAML)
    cfg = parse_args(["--model-path", model_dir, "--engine", "sglang",
                      "--disagg-config", str(cfg_file), "--disagg-config-key", "prefill"])
    assert cfg.server.page_size == 32 and cfg.server.max_running_requests == 7
    assert cfg.serving_mode is ServingMode.PREFILL
    assert cfg.server.disaggregation_bootstrap_port == 12345  # the section's port is kept
    assert cfg.endpoint.url == "dyn://dynamo.prefill.generate"
    # Flags on the command line win over the section.
    cfg = parse_args(["--model-path", model_dir, "--engine", "sglang", "--page-size", "8",
                      "--disagg-config", str(cfg_file), "--disagg-config-key", "decode"])
    assert cfg.server.page_size == 8 and cfg.server.enable_metrics
    assert cfg.serving_mode is ServingMode.DECODE


def test_disagg_config_errors(model_dir: str, tmp_path: Path) -> None:
    cfg_file = tmp_path / "disagg.yaml"
    cfg_file.write_text(DISAGG_YAML)
    with pytest.raises(ConfigError, match="provided together"):
        _parse(model_dir, "--disagg-config", str(cfg_file))
    with pytest.raises(ConfigError, match="provided together"):
        _parse(model_dir, "--disagg-config-key", "prefill")
    with pytest.raises(ConfigError, match="'nope' not found.*decode, listy, prefill"):
        _parse(model_dir, "--disagg-config", str(cfg_file), "--disagg-config-key", "nope")
    with pytest.raises(ConfigError, match="must be a mapping"):
        _parse(model_dir, "--disagg-config", str(cfg_file), "--disagg-config-key", "listy")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        _parse(model_dir, "--disagg-config", str(tmp_path / "list.yaml"), "--disagg-config-key", "a")


def test_disagg_config_rejects_dynamo_keys(model_dir: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "disagg.yaml"
    cfg_file.write_text("decode:\n  namespace: other\n  page-size: 16\n")
    with pytest.raises(SystemExit):
        _parse(model_dir, "--disagg-config", str(cfg_file), "--disagg-config-key", "decode")
    assert "--namespace" in capsys.readouterr().err


def test_sglang_config_file_then_flags(model_dir: str, tmp_path: Path) -> None:
    cfg_file = tmp_path / "sgl.yaml"
    cfg_file.write_text("context-length: 128\nmax_prefill_tokens: 64\ndisable-radix-cache: true\n")
    cfg = _parse(model_dir, "--config", str(cfg_file), "--max-prefill-tokens", "32")
    assert cfg.server.context_length == 128 and cfg.server.max_prefill_tokens == 32
    assert cfg.server.disable_radix_cache is True


def test_dump_config_to(model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_API_TOKEN", "hunter2")
    target = tmp_path / "out" / "config.json"
    cfg = _parse(model_dir, "--dump-config-to", str(target), "--namespace", "dumped")
    dump_config(cfg.dynamo.dump_config_to, cfg)
    data = json.loads(target.read_text())
    assert set(data) >= {"system_info", "environment", "config", "runtime_info", "installed_packages"}
    assert data["config"]["endpoint"] == "dyn://dumped.backend.generate"
    assert data["config"]["server"]["model_path"] == model_dir
    assert data["environment"]["DYN_API_TOKEN"] == "<redacted>"
    assert "hunter2" not in target.read_text()


def test_help_lists_both_groups(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--discovery-backend" in text and "DYN_DISCOVERY_BACKEND" in text and "--page-size" in text


def test_disaggregation_on_the_native_engine(model_dir: str) -> None:
    with pytest.raises(ConfigError, match="not supported by the mocker engine"):
        parse_args(["--model-path", model_dir, "--engine", "mocker", "--disaggregation-mode", "decode"])
    base = ["--model-path", model_dir, "--engine", "native"]
    cfg = parse_args([*base, "--disaggregation-mode", "prefill"])
    assert cfg.server.disaggregation_transfer_backend == "tcp"
    assert cfg.endpoint.component == "prefill" and cfg.server.disaggregation_bootstrap_port is None
    cfg = parse_args([*base, "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "shm",
                      "--disaggregation-bootstrap-timeout", "7.5"])
    assert cfg.server.disaggregation_transfer_backend == "shm" and cfg.server.disaggregation_bootstrap_timeout == 7.5
    with pytest.raises(ConfigError, match="tcp or shm"):
        parse_args([*base, "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "nixl"])


def test_log_level_from_dyn_log(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_LOG", "warn,dynamo_runtime=debug")
    assert _parse(model_dir).log_level == "warning"
    monkeypatch.setenv("DYN_LOG", "nonsense")
    assert _parse(model_dir).log_level == "info"
    assert _parse(model_dir, "--log-level", "debug").log_level == "debug"


def test_output_parsers_are_checked_and_sglang_spellings_reach_the_frontend(model_dir: str) -> None:
    cfg = _parse(model_dir, "--dyn-reasoning-parser", "deepseek_r1", "--dyn-tool-call-parser", "hermes")
    assert (cfg.dynamo.dyn_reasoning_parser, cfg.dynamo.dyn_tool_call_parser) == ("deepseek_r1", "hermes")
    # SGLang's own flags: the frontend is where output is parsed, so they become the --dyn- ones.
    cfg = _parse(model_dir, "--reasoning-parser", "qwen3", "--tool-call-parser", "pythonic")
    assert (cfg.dynamo.dyn_reasoning_parser, cfg.dynamo.dyn_tool_call_parser) == ("qwen3", "pythonic")
    assert cfg.server.reasoning_parser is None and cfg.server.tool_call_parser is None
    with pytest.raises(ConfigError, match="unknown parser; choose from .*hermes"):
        _parse(model_dir, "--dyn-tool-call-parser", "nope")
    with pytest.raises(ConfigError, match="--dyn-reasoning-parser 'nope'"):
        _parse(model_dir, "--dyn-reasoning-parser", "nope")
