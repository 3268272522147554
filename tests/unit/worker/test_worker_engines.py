"""Worker flags → the engines' own settings (SGLang names carried through)."""

from __future__ import annotations

from pathlib import Path

import pytest

from armature.engine.server_args import ServerArgs
from armature.mocker import MockerArgs
from armature.sglang.args import ConfigError, parse_args
from armature.sglang.engines import create_engine, mocker_kwargs_from_server, native_server_args


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text("{}")
    return str(tmp_path)


def test_native_server_args(model_dir: str) -> None:
    cfg = parse_args(["--model-path", model_dir, "--engine", "native", "--page-size", "8", "--context-length", "256",
                      "--max-running-requests", "4", "--chunked-prefill-size", "64", "--max-total-tokens", "1024",
                      "--disable-radix-cache", "--random-seed", "7", "--served-model-name", "n"])
    args = ServerArgs.from_kwargs(**native_server_args(cfg))
    assert (args.page_size, args.context_length, args.max_running_requests) == (8, 256, 4)
    assert (args.chunked_prefill_size, args.max_total_tokens, args.random_seed) == (64, 1024, 7)
    assert args.disable_radix_cache and args.skip_tokenizer_init and args.served_model_name == "n"
    # No ZMQ socket unless asked for: an in-process engine hands KV events to the worker directly.
    assert args.kv_events_config is None
    given = '{"publisher":"zmq","endpoint":"tcp://127.0.0.1:5999"}'
    cfg = parse_args(["--model-path", model_dir, "--engine", "native", "--kv-events-config", given])
    assert native_server_args(cfg)["kv_events_config"] == given


def test_gpu_flags_reach_the_native_engine(model_dir: str) -> None:
    cfg = parse_args(["--model-path", model_dir, "--engine", "native", "--attention-backend", "triton",
                      "--cuda-graph-max-bs", "48", "--disable-cuda-graph", "--disable-overlap-schedule"])
    args = ServerArgs.from_kwargs(**native_server_args(cfg))
    assert (args.attention_backend, args.cuda_graph_max_bs) == ("triton", 48)
    assert args.disable_cuda_graph is True and args.disable_overlap_schedule is True
    # Unset: the engine decides (triton + graphs + overlap on CUDA, torch on the CPU).
    args = ServerArgs.from_kwargs(**native_server_args(parse_args(["--model-path", model_dir, "--engine", "native"])))
    assert args.attention_backend == "auto" and args.disable_overlap_schedule is None


async def test_unknown_attention_backend_is_a_config_error(model_dir: str) -> None:
    cfg = parse_args(["--model-path", model_dir, "--engine", "native", "--attention-backend", "flashinfer"])
    with pytest.raises(ConfigError, match="attention_backend must be auto, torch or triton"):
        await create_engine(cfg)


def test_mocker_sized_by_sglang_flags(model_dir: str) -> None:
    cfg = parse_args(["--model-path", model_dir, "--engine", "mocker", "--page-size", "16",
                      "--max-total-tokens", "4096", "--max-running-requests", "12", "--chunked-prefill-size", "-1"])
    margs = MockerArgs(**mocker_kwargs_from_server(cfg.server))
    assert (margs.block_size, margs.num_gpu_blocks_override, margs.max_num_seqs) == (16, 256, 12)
    assert margs.enable_chunked_prefill is False and margs.enable_prefix_caching is True


async def test_invalid_engine_settings_are_config_errors(model_dir: str) -> None:
    cfg = parse_args(["--model-path", model_dir, "--engine", "native", "--page-size", "16", "--max-total-tokens", "8"])
    with pytest.raises(ConfigError, match="max_total_tokens"):
        await create_engine(cfg)


async def test_sglang_engine_without_the_package_is_a_clear_error(model_dir: str) -> None:
    from armature.sglang.sgl_compat import sglang_importable

    if sglang_importable():
        pytest.skip("the real sglang package is installed here")
    cfg = parse_args(["--model-path", model_dir, "--engine", "sglang"])
    with pytest.raises(ConfigError, match="needs the 'sglang' package"):
        await create_engine(cfg)
