"""``python -m armature.mocker`` flags (dynamo.mocker's names and defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest

from armature.sglang.args import ConfigError
from armature.sglang.mocker_args import parse_mocker_args


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_defaults_match_dynamo(model_dir: str) -> None:
    (cfg,) = parse_mocker_args(["--model-path", model_dir])
    extra = cfg.engine_extra["mocker"]
    assert cfg.engine == "mocker" and cfg.endpoint.url == "dyn://dynamo.backend.generate"
    assert extra == {"num_gpu_blocks": 16384, "block_size": 64, "max_num_seqs": 256,
                     "max_num_batched_tokens": 8192, "enable_prefix_caching": True,
                     "enable_chunked_prefill": True, "watermark": 0.01, "speedup_ratio": 1.0}
    assert cfg.server.page_size == 64 and cfg.server.served_model_name == model_dir


def test_flags_map_onto_worker_config(model_dir: str) -> None:
    configs = parse_mocker_args([
        "--model-path", model_dir, "--model-name", "mock", "--speedup-ratio", "10", "--block-size", "16",
        "--num-gpu-blocks-override", "100", "--max-num-seqs", "8", "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill", "--num-workers", "3", "--endpoint", "dyn://ns.mock.generate",
        "--system-port", "0",
    ])
    assert len(configs) == 3
    first = configs[0]
    assert first.server.served_model_name == "mock" and first.endpoint.url == "dyn://ns.mock.generate"
    assert first.server.page_size == 16 and first.server.max_total_tokens == 1600
    assert first.server.disable_radix_cache and first.server.chunked_prefill_size == -1
    assert first.engine_extra["mocker"]["speedup_ratio"] == 10.0
    # Only the first worker of the process owns the status port.
    assert [c.dynamo.system_port for c in configs] == [0, -1, -1]


def test_bad_values(model_dir: str) -> None:
    with pytest.raises(ConfigError, match="--data-parallel-size"):
        parse_mocker_args(["--model-path", model_dir, "--data-parallel-size", "2"])
    with pytest.raises(SystemExit):
        parse_mocker_args(["--model-path", model_dir, "--speedup-ratio", "-1"])
    with pytest.raises(ConfigError, match="Hub id"):
        parse_mocker_args(["--model-path", "org/model"])


def test_extra_engine_args_file(model_dir: str, tmp_path: Path) -> None:
    import json

    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"block_size": 32, "speedup_ratio": 4.0, "enable_prefix_caching": False,
                                 "startup_time": 1.5}))
    (cfg,) = parse_mocker_args(["--model-path", model_dir, "--extra-engine-args", str(extra), "--speedup-ratio", "2"])
    assert cfg.server.page_size == 32 and cfg.engine_extra["mocker"]["block_size"] == 32
    assert cfg.engine_extra["mocker"]["speedup_ratio"] == 2.0  # the command line wins
    assert cfg.engine_extra["mocker"]["enable_prefix_caching"] is False
    assert cfg.engine_extra["startup_time_s"] == 1.5
    extra.write_text(json.dumps({"block_sizes": 32}))
    with pytest.raises(ConfigError, match="unknown keys \\['block_sizes'\\]"):
        parse_mocker_args(["--model-path", model_dir, "--extra-engine-args", str(extra)])
    extra.write_text(json.dumps({"block_size": "32"}))
    with pytest.raises(ConfigError, match="block_size must be a positive int"):
        parse_mocker_args(["--model-path", model_dir, "--extra-engine-args", str(extra)])
