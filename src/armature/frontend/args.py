"""``python -m armature.frontend`` flags, named as ``dynamo.frontend``'s, each with its env var.

Every flag's default comes from ``ARMATURE_<NAME>`` or Dynamo's ``DYN_<NAME>`` (the Armature name
wins when both are set); a flag on the command line wins over both.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from armature.frontend.busy import BusyThresholds
from armature.frontend.server import DEFAULT_BODY_LIMIT, FrontendConfig
from armature.router.kv.config import KvRouterConfig, add_router_args
from armature.router.push import RouterMode
from armature.runtime.discovery.factory import discovery_backend_name
from armature.runtime.runtime import RuntimeSettings


class FrontendArgsError(ValueError):
    """Flags that cannot work together, or a value out of range."""


def _env(env: Mapping[str, str], name: str) -> str | None:
    for key in (f"ARMATURE_{name}", f"DYN_{name}"):
        value = env.get(key)
        if value is not None and value.strip():
            return value.strip()
    return None


@dataclass
class FrontendArgs:
    http_host: str
    http_port: int
    namespace: str | None
    namespace_prefix: str | None
    router_mode: RouterMode
    kv_cache_block_size: int | None
    migration_limit: int
    tls_cert_path: str | None
    tls_key_path: str | None
    api_key: str | None
    metrics_prefix: str
    body_limit_bytes: int
    graceful_shutdown_timeout_s: float
    log_level: str
    runtime: RuntimeSettings
    kv_router: KvRouterConfig
    decode_fallback: bool = False
    http_processes: int = 1
    stream_write_interval_ms: float = 3.0
    busy: BusyThresholds = field(default_factory=BusyThresholds)

    def frontend_config(self) -> FrontendConfig:
        return FrontendConfig(
            busy=replace(self.busy),
            router_mode=self.router_mode,
            migration_limit=self.migration_limit,
            kv_cache_block_size=self.kv_cache_block_size,
            api_key=self.api_key,
            body_limit_bytes=self.body_limit_bytes,
            decode_fallback=self.decode_fallback,
        )


def _opt(value: str | None, kind: type) -> Any:
    return None if value is None else kind(value)


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    def d(name: str, default: Any = None) -> Any:
        value = _env(env, name)
        return default if value is None else value

    p = argparse.ArgumentParser(
        prog="python -m armature.frontend",
        description="OpenAI-compatible HTTP frontend: discovers workers' model cards and routes requests to them.",
    )
    p.add_argument("--http-host", default=d("HTTP_HOST", "127.0.0.1"), help="bind host (env DYN_HTTP_HOST)")
    p.add_argument("--http-port", type=int, default=int(d("HTTP_PORT", 8000)), help="bind port (env DYN_HTTP_PORT)")
    p.add_argument("--namespace", default=d("NAMESPACE"), help="serve only models of this namespace (DYN_NAMESPACE)")
    p.add_argument(
        "--namespace-prefix", default=d("NAMESPACE_PREFIX"), help="namespace prefix filter; wins over --namespace"
    )
    p.add_argument(
        "--router-mode",
        choices=[m.value for m in RouterMode],
        default=d("ROUTER_MODE", RouterMode.ROUND_ROBIN.value),
        help="how to pick a worker (env DYN_ROUTER_MODE)",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=int(d("MIGRATION_LIMIT", 0)),
        help="times a failed stream is re-sent to another worker (env DYN_MIGRATION_LIMIT); 0 = the card's",
    )
    p.add_argument("--tls-cert-path", default=d("TLS_CERT_PATH"), help="TLS certificate (PEM); needs --tls-key-path")
    p.add_argument("--tls-key-path", default=d("TLS_KEY_PATH"), help="TLS private key (PEM); needs --tls-cert-path")
    p.add_argument("--api-key", default=d("API_KEY"), help="require 'Authorization: Bearer KEY' (env DYN_API_KEY)")
    p.add_argument("--metrics-prefix", default=d("METRICS_PREFIX", "armature_frontend"), help="metric name prefix")
    p.add_argument(
        "--body-limit-mb",
        type=float,
        default=float(d("HTTP_BODY_LIMIT_MB", DEFAULT_BODY_LIMIT / 2**20)),
        help="largest accepted request body in MiB (413 beyond)",
    )
    p.add_argument(
        "--decode-fallback",
        action="store_true",
        default=d("DECODE_FALLBACK", "").lower() in ("1", "true", "yes"),
        help="disaggregated models with no prefill worker: decode aggregated instead of 503 (DYN_DECODE_FALLBACK)",
    )
    p.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=float(d("HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS", 5.0)),
        help="seconds in-flight requests get after SIGTERM",
    )
    p.add_argument(
        "--http-processes",
        type=int,
        default=int(d("HTTP_PROCESSES", 1)),
        help="frontend processes sharing the port, for more than one core of streaming "
        "(env ARMATURE_HTTP_PROCESSES; like vLLM's --api-server-count); needs file or etcd discovery",
    )
    p.add_argument(
        "--stream-write-interval-ms",
        type=float,
        default=float(d("STREAM_WRITE_INTERVAL_MS", 3.0)),
        help="a stream's SSE events go out at most this often per connection; sooner ones ride with "
        "the next write (one token per event still); 0 writes each at once (env ARMATURE_STREAM_WRITE_INTERVAL_MS)",
    )
    p.add_argument(
        "--active-decode-blocks-threshold",
        type=float,
        default=_opt(d("ACTIVE_DECODE_BLOCKS_THRESHOLD"), float),
        help="busy when active decode KV blocks pass this fraction (0-1] of a worker's blocks; a model "
        "whose workers are all busy answers 503 (env DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD)",
    )
    p.add_argument(
        "--active-prefill-tokens-threshold",
        type=int,
        default=_opt(d("ACTIVE_PREFILL_TOKENS_THRESHOLD"), int),
        help="busy when a worker's prefill tokens in flight pass this count",
    )
    p.add_argument(
        "--active-prefill-tokens-threshold-frac",
        type=float,
        default=_opt(d("ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC"), float),
        help="busy when a worker's prefill tokens in flight pass this fraction of its max_num_batched_tokens",
    )
    p.add_argument("--log-level", default=d("LOG_LEVEL", "info"), help="debug|info|warning|error")
    RuntimeSettings.add_arguments(p)
    # The KV router's flags, --kv-cache-block-size among them (it overrides the model cards' block
    # size in every router mode); its default follows this parser's environment mapping.
    add_router_args(p)
    block = d("KV_CACHE_BLOCK_SIZE")
    p.set_defaults(kv_cache_block_size=None if block is None else int(block))
    return p


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> FrontendArgs:
    env = os.environ if env is None else env
    parser = build_parser(env)
    ns = parser.parse_args(argv)
    mode = RouterMode(ns.router_mode)
    if bool(ns.tls_cert_path) != bool(ns.tls_key_path):
        parser.error("--tls-cert-path and --tls-key-path go together: give both or neither")
    if not 0 < ns.http_port < 65536:
        parser.error(f"--http-port {ns.http_port} is not a valid port")
    if ns.migration_limit < 0:
        parser.error("--migration-limit must be >= 0")
    if ns.kv_cache_block_size is not None and ns.kv_cache_block_size <= 0:
        parser.error("--kv-cache-block-size must be positive")
    if ns.body_limit_mb <= 0:
        parser.error("--body-limit-mb must be positive")
    if ns.http_processes < 1:
        parser.error("--http-processes must be >= 1")
    if not 0 <= ns.stream_write_interval_ms <= 1000:
        parser.error("--stream-write-interval-ms must be between 0 and 1000")
    if ns.active_decode_blocks_threshold is not None and not 0 < ns.active_decode_blocks_threshold <= 1:
        parser.error("--active-decode-blocks-threshold is a fraction in (0, 1]")
    if ns.active_prefill_tokens_threshold is not None and ns.active_prefill_tokens_threshold < 0:
        parser.error("--active-prefill-tokens-threshold must be >= 0")
    if ns.active_prefill_tokens_threshold_frac is not None and ns.active_prefill_tokens_threshold_frac <= 0:
        parser.error("--active-prefill-tokens-threshold-frac must be positive")
    try:
        runtime = RuntimeSettings.from_args(ns, env)
        kv_router = KvRouterConfig.from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.http_processes > 1 and discovery_backend_name(runtime.discovery_backend, env) == "mem":
        parser.error("--http-processes > 1 needs discovery the processes share: --discovery-backend file or etcd")
    return FrontendArgs(
        http_host=ns.http_host,
        http_port=ns.http_port,
        namespace=ns.namespace,
        namespace_prefix=ns.namespace_prefix,
        router_mode=mode,
        kv_cache_block_size=ns.kv_cache_block_size,
        migration_limit=ns.migration_limit,
        tls_cert_path=ns.tls_cert_path,
        tls_key_path=ns.tls_key_path,
        api_key=ns.api_key,
        metrics_prefix=ns.metrics_prefix,
        body_limit_bytes=int(ns.body_limit_mb * 2**20),
        graceful_shutdown_timeout_s=ns.graceful_shutdown_timeout,
        log_level=ns.log_level,
        runtime=runtime,
        kv_router=kv_router,
        decode_fallback=ns.decode_fallback,
        http_processes=ns.http_processes,
        stream_write_interval_ms=ns.stream_write_interval_ms,
        busy=BusyThresholds(
            active_decode_blocks=ns.active_decode_blocks_threshold,
            active_prefill_tokens=ns.active_prefill_tokens_threshold,
            active_prefill_tokens_frac=ns.active_prefill_tokens_threshold_frac,
        ),
    )
