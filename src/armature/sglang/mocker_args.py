"""Command line of ``python -m armature.mocker`` (flags and defaults as ``dynamo.mocker``).

The mocker is the same worker as ``python -m armature.sglang`` on the simulated engine: it
registers a real model card (tokenizer and chat template from ``--model-path``), publishes KV
events and load, and streams token ids at the pace of a timing model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from armature.sglang.args import (
    DEFAULT_NAMESPACE,
    DISCOVERY_CHOICES,
    EVENT_PLANE_CHOICES,
    LOG_LEVELS,
    REQUEST_PLANE_CHOICES,
    ConfigError,
    DynamoConfig,
    EndpointId,
    ServingMode,
    SglangServerConfig,
    WorkerConfig,
    add_env_flag,
    default_discovery_backend,
    log_level_from_env,
    apply_namespace_suffix,
    parse_endpoint_types,
    resolve_model_path,
)

PROG = "python -m armature.mocker"


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Armature mocker: a GPU-free simulated worker.",
                                allow_abbrev=False)
    p.add_argument("--model-path", default=None,
                   help="model folder or .gguf whose tokenizer and chat template the card carries "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", default=None, help="served model name (default: --model-path)")
    p.add_argument("--endpoint", default=None, help="dyn://namespace.component.endpoint "
                   "(default dyn://{namespace}.backend.generate)")
    add_env_flag(p, "--namespace", env="DYN_NAMESPACE", default=DEFAULT_NAMESPACE, help="namespace")
    p.add_argument("--num-gpu-blocks-override", type=_positive_int, default=16384, help="KV blocks in the pool")
    p.add_argument("--block-size", type=_positive_int, default=64, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=_positive_int, default=256, help="running requests at most")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192, help="prefill tokens per step")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--watermark", type=float, default=0.01, help="fraction of blocks kept free at admission")
    p.add_argument("--speedup-ratio", type=_non_negative_float, default=1.0,
                   help="divide simulated step times by this (0: no delays)")
    p.add_argument("--data-parallel-size", type=_positive_int, default=1)
    p.add_argument("--num-workers", type=_positive_int, default=1,
                   help="mocker engines in this process, each its own instance")
    p.add_argument("--startup-time", type=_non_negative_float, default=None,
                   help="seconds to wait before the engine starts (simulates model loading)")
    p.add_argument("--extra-engine-args", default=None,
                   help="JSON file of mocker engine args (same names as the flags, with underscores); "
                        "flags given on the command line win")
    p.add_argument("--context-length", type=_positive_int, default=None,
                   help="override the context length read from the model config")
    add_env_flag(p, "--discovery-backend", env="DYN_DISCOVERY_BACKEND", default=default_discovery_backend(),
                 choices=DISCOVERY_CHOICES, help="discovery store")
    add_env_flag(p, "--request-plane", env="DYN_REQUEST_PLANE", default="tcp", choices=REQUEST_PLANE_CHOICES,
                 help="transport for requests")
    add_env_flag(p, "--event-plane", env="DYN_EVENT_PLANE", default="zmq", choices=EVENT_PLANE_CHOICES,
                 help="transport for KV events and load metrics")
    add_env_flag(p, "--endpoint-types", env="DYN_ENDPOINT_TYPES", default="chat,completions",
                 help="comma list of OpenAI endpoints to register")
    add_env_flag(p, "--migration-limit", env="DYN_MIGRATION_LIMIT", default=0, type=int,
                 help="times a request may migrate to another worker")
    add_env_flag(p, "--system-port", env="DYN_SYSTEM_PORT", default=-1, type=int,
                 help="status server port of the first worker (0 picks one, -1 disables)")
    p.add_argument("--log-level", default=log_level_from_env(), choices=LOG_LEVELS, help="env DYN_LOG")
    return p


def parse_mocker_args(argv: Sequence[str]) -> list[WorkerConfig]:
    """One ``WorkerConfig`` per ``--num-workers`` (they differ only in their instance)."""
    argv = list(argv)
    args = build_parser().parse_args(argv)
    if args.extra_engine_args:
        _apply_extra_engine_args(args, args.extra_engine_args, argv)
    if args.data_parallel_size != 1:
        raise ConfigError("--data-parallel-size: the mocker runs one rank per worker; use --num-workers")
    if not 0.0 <= args.watermark < 1.0:
        raise ConfigError(f"--watermark must be in [0, 1), got {args.watermark}")
    resolved = _resolve_default(args.model_path)
    model_path = args.model_path or resolved
    served = args.model_name or (args.model_path or "SmolLM2-135M-Instruct")
    namespace = apply_namespace_suffix(args.namespace)
    endpoint = EndpointId.parse(args.endpoint) if args.endpoint else EndpointId(namespace, "backend", "generate")
    mocker_extra: dict[str, Any] = {
        "num_gpu_blocks": args.num_gpu_blocks_override,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": args.enable_prefix_caching,
        "enable_chunked_prefill": args.enable_chunked_prefill,
        "watermark": args.watermark,
        "speedup_ratio": args.speedup_ratio,
    }
    configs: list[WorkerConfig] = []
    for i in range(args.num_workers):
        server = SglangServerConfig(
            model_path=model_path,
            served_model_name=served,
            page_size=args.block_size,
            context_length=args.context_length,
            max_running_requests=args.max_num_seqs,
            max_prefill_tokens=args.max_num_batched_tokens,
            chunked_prefill_size=args.max_num_batched_tokens if args.enable_chunked_prefill else -1,
            max_total_tokens=args.num_gpu_blocks_override * args.block_size,
            disable_radix_cache=not args.enable_prefix_caching,
            log_level=args.log_level,
        )
        dynamo = DynamoConfig(
            namespace=namespace,
            endpoint=endpoint.url,
            discovery_backend=args.discovery_backend,
            request_plane=args.request_plane,
            event_plane=args.event_plane,
            endpoint_types=args.endpoint_types,
            migration_limit=args.migration_limit,
            # Only the first worker may own the status port; the others would collide on it.
            system_port=args.system_port if i == 0 else -1,
        )
        configs.append(
            WorkerConfig(
                server=server,
                dynamo=dynamo,
                engine="mocker",
                endpoint=endpoint,
                serving_mode=ServingMode.AGGREGATED,
                model_types=parse_endpoint_types(args.endpoint_types),
                resolved_model_path=resolved,
                engine_extra={"mocker": dict(mocker_extra), "startup_time_s": args.startup_time or 0.0},
                log_level=args.log_level,
            )
        )
    return configs


# Engine args a --extra-engine-args file may set (the mocker flags, underscored) and their types.
EXTRA_ENGINE_KEYS: dict[str, type] = {
    "num_gpu_blocks_override": int, "block_size": int, "max_num_seqs": int, "max_num_batched_tokens": int,
    "enable_prefix_caching": bool, "enable_chunked_prefill": bool, "watermark": float, "speedup_ratio": float,
    "context_length": int, "startup_time": float,
}


def _valid_engine_value(kind: type, value: object) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind is int:
        return isinstance(value, int) and value > 0
    return value >= 0


def _apply_extra_engine_args(args: argparse.Namespace, path: str, argv: list[str]) -> None:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(f"--extra-engine-args {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--extra-engine-args {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--extra-engine-args {path} must hold a JSON object")
    unknown = sorted(set(data) - set(EXTRA_ENGINE_KEYS))
    if unknown:
        raise ConfigError(f"--extra-engine-args {path}: unknown keys {unknown}; known: {sorted(EXTRA_ENGINE_KEYS)}")
    given = {a.split("=", 1)[0].removeprefix("--no-").removeprefix("--").replace("-", "_")
             for a in argv if a.startswith("--")}
    for key, value in data.items():
        kind = EXTRA_ENGINE_KEYS[key]
        if not _valid_engine_value(kind, value):
            wanted = {int: "positive int", float: "non-negative number", bool: "boolean"}[kind]
            raise ConfigError(f"--extra-engine-args {path}: {key} must be a {wanted}, got {value!r}")
        if key not in given:
            setattr(args, key, value)


def _resolve_default(model_path: str | None) -> str:
    if model_path is None:
        from armature.engine.loader import resolve_model_path as loader_resolve

        return str(loader_resolve(None))
    return resolve_model_path(model_path)
