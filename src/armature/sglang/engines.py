"""``create_engine(config)``: the engine behind a worker (native | mocker | sglang).

Handlers only see the ``Engine`` protocol; this is the one place that knows how each engine is
built from the worker's SGLang-named settings.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from armature.engine.api import Engine
from armature.sglang.args import ConfigError, SglangServerConfig, WorkerConfig

if TYPE_CHECKING:
    from armature.engine.disagg import DisaggConfig


def native_server_args(config: WorkerConfig) -> dict[str, Any]:
    """Keyword arguments of ``armature.engine.server_args.ServerArgs`` (SGLang names)."""
    s: SglangServerConfig = config.server
    kwargs: dict[str, Any] = {
        "model_path": config.resolved_model_path,
        "served_model_name": s.served_model_name,
        "dtype": s.dtype,
        "max_prefill_tokens": s.max_prefill_tokens,
        "disable_radix_cache": s.disable_radix_cache,
        "stream_interval": s.stream_interval,
        "disable_cuda_graph": s.disable_cuda_graph,
        # The frontend tokenizes; the worker's engine never needs the tokenizer.
        "skip_tokenizer_init": True,
        # Without --kv-events-config the engine hands KV events to the worker in-process
        # (KvEventSource); with it, it also publishes SGLang's ZMQ format where it says.
        "kv_events_config": s.kv_events_config if s.use_kv_events else None,
        "log_level": s.log_level,
    }
    optional = {
        "device": s.device,
        "page_size": s.page_size,
        "max_total_tokens": s.max_total_tokens,
        "mem_fraction_static": s.mem_fraction_static,
        "context_length": s.context_length,
        "chunked_prefill_size": s.chunked_prefill_size,
        "max_running_requests": s.max_running_requests,
        "random_seed": s.random_seed,
        "attention_backend": s.attention_backend,
        "cuda_graph_max_bs": s.cuda_graph_max_bs,
        # Unset keeps the engine's default: overlap on CUDA, off on the CPU.
        "disable_overlap_schedule": True if s.disable_overlap_schedule else None,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def _create_native(config: WorkerConfig) -> Engine:
    from armature.engine.engine import NativeEngine
    from armature.engine.server_args import ServerArgs, ServerArgsError

    try:
        args = ServerArgs.from_kwargs(**native_server_args(config))
    except ServerArgsError as exc:
        raise ConfigError(str(exc)) from exc
    return NativeEngine(args, disaggregation=native_disagg_config(config))


def native_disagg_config(config: WorkerConfig) -> DisaggConfig | None:
    """The native engine's P/D role from ``--disaggregation-*`` (None for an aggregated worker)."""
    from armature.engine.disagg import DisaggConfig, DisaggMode, TransferBackend

    s = config.server
    if s.disaggregation_mode in (None, "null"):
        return None
    return DisaggConfig(
        mode=DisaggMode(s.disaggregation_mode),
        bootstrap_host=s.host,
        bootstrap_port=s.disaggregation_bootstrap_port or 0,
        transfer_backend=TransferBackend(s.disaggregation_transfer_backend or "tcp"),
        bootstrap_timeout_s=s.disaggregation_bootstrap_timeout,
        waiting_timeout_s=max(s.disaggregation_bootstrap_timeout, 300.0),
    )


def mocker_kwargs_from_server(s: SglangServerConfig) -> dict[str, Any]:
    """``--engine mocker`` under ``armature.sglang``: the SGLang flags size the simulated engine."""
    kwargs: dict[str, Any] = {"enable_prefix_caching": not s.disable_radix_cache,
                              "max_num_batched_tokens": s.max_prefill_tokens}
    if s.page_size is not None:
        kwargs["block_size"] = s.page_size
    if s.max_running_requests is not None:
        kwargs["max_num_seqs"] = s.max_running_requests
    if s.max_total_tokens is not None:
        kwargs["num_gpu_blocks_override"] = max(s.max_total_tokens // (s.page_size or 64), 1)
    if s.chunked_prefill_size is not None and s.chunked_prefill_size <= 0:
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def _create_mocker(config: WorkerConfig) -> Engine:
    from armature.engine.server_args import ServerArgs, ServerArgsError
    from armature.mocker import MockerArgs, MockerEngine

    extra = dict(config.engine_extra.get("mocker") or mocker_kwargs_from_server(config.server))
    try:
        server_args = ServerArgs.from_kwargs(**native_server_args(config))
        mocker_args = MockerArgs(**extra)
    except (ServerArgsError, TypeError, ValueError) as exc:
        raise ConfigError(f"mocker: {exc}") from exc
    return MockerEngine(server_args, mocker_args)


def _create_sglang(config: WorkerConfig) -> Engine:
    from armature.sglang import sgl_compat

    if not sgl_compat.sglang_importable():
        raise ConfigError(
            "--engine sglang needs the 'sglang' package (a CUDA host with sglang installed); "
            "use --engine native to run on this machine"
        )
    return sgl_compat.SglangEngine(sgl_compat.create_sgl_engine(config.server), config.server)


_FACTORIES = {"native": _create_native, "mocker": _create_mocker, "sglang": _create_sglang}


async def create_engine(config: WorkerConfig) -> Engine:
    """Build and start the configured engine; loading runs off the event loop."""
    try:
        factory = _FACTORIES[config.engine]
    except KeyError:
        raise ConfigError(f"unknown engine {config.engine!r}; choose one of {', '.join(_FACTORIES)}") from None
    if config.engine == "sglang":
        # sgl.Engine must be built on the main thread (it installs signal handlers, spawns).
        return factory(config)
    return await asyncio.to_thread(factory, config)
