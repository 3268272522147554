"""Command line of ``python -m armature.sglang``: SGLang server args plus Dynamo's runtime flags.

Parsing follows Dynamo's ``dynamo.sglang`` pipeline so launch scripts port unchanged:

1. Dynamo flags (each with a ``DYN_*`` env var whose value becomes the default) are parsed with
   ``parse_known_args``; whatever is left must be an SGLang server arg, or parsing fails.
2. ``--disagg-config FILE --disagg-config-key KEY`` picks one section of a YAML file and feeds it
   to the SGLang parser as a ``--config`` file. Only SGLang keys may appear there: a Dynamo key
   in the section is an unknown SGLang argument, exactly as in Dynamo.
3. ``--config FILE`` (SGLang's) supplies defaults; flags on the command line win.
4. Validation (mutual exclusions, template file, kv-events config), endpoint inference, model
   path resolution, then a typed ``WorkerConfig``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from armature.protocols.model_card import ModelType
from armature.runtime.discovery.factory import discovery_backend_name

log = logging.getLogger(__name__)

ENGINE_CHOICES = ("native", "mocker", "sglang")
DISCOVERY_CHOICES = ("etcd", "file", "mem")
REQUEST_PLANE_CHOICES = ("tcp", "nats")
EVENT_PLANE_CHOICES = ("zmq", "nats")
DISAGGREGATION_CHOICES = ("null", "prefill", "decode")
NATIVE_TRANSFER_BACKENDS = ("tcp", "shm")
ENDPOINT_TYPE_CHOICES = {"chat": ModelType.CHAT, "completions": ModelType.COMPLETIONS}
DEFAULT_NAMESPACE = "dynamo"
TRUE_STRINGS = frozenset({"true", "1", "yes", "on"})
FALSE_STRINGS = frozenset({"false", "0", "no", "off", ""})


class ConfigError(ValueError):
    """The command line (or its env vars / config files) cannot start a worker."""


class ServingMode(str, Enum):
    AGGREGATED = "agg"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class SglangServerConfig:
    """The SGLang ``ServerArgs`` that apply to an Armature worker (SGLang's names and defaults)."""

    model_path: str
    served_model_name: str
    page_size: int | None = None
    tp_size: int = 1
    dp_size: int = 1
    context_length: int | None = None
    max_running_requests: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    dtype: str = "auto"
    device: str | None = None
    kv_events_config: str | None = None
    enable_metrics: bool = False
    skip_tokenizer_init: bool = False
    chat_template: str | None = None
    disaggregation_mode: str = "null"
    # None: the native engine binds a free port itself (and advertises it); the SGLang adapter
    # reserves one when it starts the engine, after the status server has bound its own.
    disaggregation_bootstrap_port: int | None = None
    # None: the engine's default (tcp for native, mooncake for sglang).
    disaggregation_transfer_backend: str | None = None
    disaggregation_bootstrap_timeout: float = 300.0
    # Where the prefill engine's bootstrap server listens (SGLang binds it on --host).
    host: str = "127.0.0.1"
    stream_interval: int = 1
    disable_radix_cache: bool = False
    # GPU: the native engine takes auto/torch/triton; SGLang its own backend names.
    attention_backend: str | None = None
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False
    trust_remote_code: bool = False
    random_seed: int | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    is_embedding: bool = False
    log_level: str = "info"

    @property
    def kv_events_endpoint(self) -> str | None:
        if not self.kv_events_config:
            return None
        return str(json.loads(self.kv_events_config).get("endpoint") or "") or None

    @property
    def use_kv_events(self) -> bool:
        if not self.kv_events_config:
            return False
        return json.loads(self.kv_events_config).get("publisher", "null") != "null"


@dataclass
class DynamoConfig:
    """Dynamo's runtime and backend flags (names and env vars as ``dynamo.sglang``)."""

    namespace: str = DEFAULT_NAMESPACE
    endpoint: str | None = None
    discovery_backend: str = "mem"
    request_plane: str = "tcp"
    event_plane: str = "zmq"
    dyn_tool_call_parser: str | None = None
    dyn_reasoning_parser: str | None = None
    custom_jinja_template: str | None = None
    endpoint_types: str = "chat,completions"
    dump_config_to: str | None = None
    disagg_config: str | None = None
    disagg_config_key: str | None = None
    embedding_worker: bool = False
    migration_limit: int = 0
    system_port: int = -1


@dataclass(frozen=True)
class EndpointId:
    namespace: str
    component: str
    name: str

    @classmethod
    def parse(cls, text: str) -> EndpointId:
        """``dyn://ns.component.endpoint`` (scheme optional) into its three parts."""
        body = text.removeprefix("dyn://")
        parts = body.split(".")
        if len(parts) != 3 or not all(parts):
            raise ConfigError(
                f"invalid endpoint {text!r}: expected 'dyn://namespace.component.endpoint' (three non-empty parts)"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.namespace}.{self.component}.{self.name}"

    @property
    def url(self) -> str:
        return f"dyn://{self}"


@dataclass
class WorkerConfig:
    """Everything a worker process needs, resolved and validated."""

    server: SglangServerConfig
    dynamo: DynamoConfig
    engine: str
    endpoint: EndpointId
    serving_mode: ServingMode
    model_types: list[ModelType]
    # The folder (or GGUF file) the model loads from; tokenizer files sit next to it.
    resolved_model_path: str
    # Engine-specific extras (e.g. the mocker's timing args), keyed by engine kind.
    engine_extra: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"

    def to_json_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        out["endpoint"] = self.endpoint.url
        out["serving_mode"] = self.serving_mode.value
        out["model_types"] = [t.value for t in self.model_types]
        return out


# --- env-var backed flags ------------------------------------------------------------------


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    low = raw.strip().lower()
    if low in TRUE_STRINGS:
        return True
    if low in FALSE_STRINGS:
        return False
    raise ConfigError(f"env var {name}={raw!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _env_value(name: str, default: Any, convert: Callable[[str], Any]) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise ConfigError(f"env var {name}={raw!r} is invalid: {exc}") from exc


def add_env_flag(
    group: argparse._ActionsContainer,
    *flags: str,
    env: str,
    default: Any,
    help: str,
    type: Callable[[str], Any] = str,
    choices: Sequence[str] | None = None,
) -> None:
    """An option whose default comes from ``env``; bools get ``--x/--no-x`` like Dynamo."""
    if type is bool:
        value = _env_bool(env, default)
        group.add_argument(
            *flags,
            action=argparse.BooleanOptionalAction,
            default=value,
            help=f"{help} (env var: {env} | default: {default})",
        )
        return
    value = _env_value(env, default, type)
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"env var {env}={value!r} is not one of {', '.join(choices)}")
    group.add_argument(
        *flags,
        type=type,
        default=value,
        choices=choices,
        help=f"{help} (env var: {env} | default: {default})",
    )


def default_discovery_backend() -> str:
    """The runtime's own default (ARMATURE_/DYN_DISCOVERY_BACKEND, else mem); bad env is reported later."""
    try:
        return discovery_backend_name()
    except ValueError:
        return "mem"


def build_dynamo_parser(
    *, add_help: bool = True, prog: str = "python -m armature.sglang"
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Armature SGLang worker: serves one model on the distributed runtime.",
        add_help=add_help,
        allow_abbrev=False,
    )
    runtime = parser.add_argument_group("Dynamo runtime")
    add_env_flag(runtime, "--namespace", env="DYN_NAMESPACE", default=DEFAULT_NAMESPACE,
                 help="namespace of the served endpoint")
    add_env_flag(runtime, "--endpoint", env="DYN_ENDPOINT", default=None,
                 help="dyn://namespace.component.endpoint; inferred from the worker kind when unset")
    add_env_flag(runtime, "--discovery-backend", env="DYN_DISCOVERY_BACKEND", default=default_discovery_backend(),
                 choices=DISCOVERY_CHOICES, help="discovery store (file root: DYN_FILE_KV)")
    add_env_flag(runtime, "--request-plane", env="DYN_REQUEST_PLANE", default="tcp",
                 choices=REQUEST_PLANE_CHOICES, help="transport for requests")
    add_env_flag(runtime, "--event-plane", env="DYN_EVENT_PLANE", default="zmq",
                 choices=EVENT_PLANE_CHOICES, help="transport for KV events and load metrics")
    add_env_flag(runtime, "--dyn-tool-call-parser", env="DYN_TOOL_CALL_PARSER", default=None,
                 help="tool-call parser the frontend applies to this model's output")
    add_env_flag(runtime, "--dyn-reasoning-parser", env="DYN_REASONING_PARSER", default=None,
                 help="reasoning parser the frontend applies to this model's output")
    add_env_flag(runtime, "--custom-jinja-template", env="DYN_CUSTOM_JINJA_TEMPLATE", default=None,
                 help="chat template file sent in the model card instead of the model's own")
    add_env_flag(runtime, "--endpoint-types", "--dyn-endpoint-types", env="DYN_ENDPOINT_TYPES",
                 default="chat,completions", help="comma list of OpenAI endpoints to register: chat, completions")
    add_env_flag(runtime, "--dump-config-to", env="DYN_DUMP_CONFIG_TO", default=None,
                 help="write the resolved configuration as JSON to this file")
    add_env_flag(runtime, "--migration-limit", env="DYN_MIGRATION_LIMIT", default=0, type=int,
                 help="how many times a request may migrate to another worker when this one fails")
    add_env_flag(runtime, "--system-port", env="DYN_SYSTEM_PORT", default=-1, type=int,
                 help="port of the status server (/health /live /metrics); 0 picks one, -1 disables")
    backend = parser.add_argument_group("Dynamo SGLang")
    add_env_flag(backend, "--embedding-worker", env="DYN_SGL_EMBEDDING_WORKER", default=False, type=bool,
                 help="serve an embedding model")
    add_env_flag(backend, "--disagg-config", env="DYN_SGL_DISAGG_CONFIG", default=None,
                 help="YAML file with named sections of SGLang args")
    add_env_flag(backend, "--disagg-config-key", env="DYN_SGL_DISAGG_CONFIG_KEY", default=None,
                 help="section of --disagg-config to use (e.g. prefill, decode)")
    add_env_flag(backend, "--engine", env="ARMATURE_ENGINE", default=None, choices=ENGINE_CHOICES,
                 help="engine behind the worker: native (our PyTorch engine), mocker (simulated), "
                      "sglang (the real sgl.Engine); default sglang when importable with CUDA, else native")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level_from_env() -> str:
    """``DYN_LOG`` may be a Rust-style filter (``debug,dynamo_runtime=info``): take its level."""
    raw = os.environ.get("DYN_LOG", "")
    for part in raw.split(","):
        level = part.strip().lower()
        level = {"warn": "warning", "trace": "debug"}.get(level, level)
        if level in LOG_LEVELS:
            return level
    return "info"


def build_sglang_parser(prog: str = "python -m armature.sglang") -> argparse.ArgumentParser:
    """The SGLang server args Armature honours, named and defaulted as in ``sglang.ServerArgs``."""
    p = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    p.add_argument("--model-path", "--model", dest="model_path", help="model folder or .gguf file")
    p.add_argument("--served-model-name", default=None, help="name clients use; default: --model-path")
    p.add_argument("--page-size", type=_positive_int, default=None, help="tokens per KV page (= KV block)")
    p.add_argument("--tp-size", "--tp", dest="tp_size", type=_positive_int, default=1, help="tensor parallelism")
    p.add_argument("--dp-size", "--dp", dest="dp_size", type=_positive_int, default=1, help="data parallelism")
    p.add_argument("--context-length", type=_positive_int, default=None, help="override the model's context")
    p.add_argument("--max-running-requests", type=_positive_int, default=None)
    p.add_argument("--max-prefill-tokens", type=_positive_int, default=16384)
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="-1 disables chunking")
    p.add_argument("--max-total-tokens", type=_positive_int, default=None, help="KV pool size in tokens")
    p.add_argument("--mem-fraction-static", type=_fraction, default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "half", "float16", "bfloat16", "float", "float32"))
    p.add_argument("--device", default=None, help="cpu or cuda; default: cuda when present")
    p.add_argument("--kv-events-config", default=None,
                   help='JSON, e.g. {"publisher":"zmq","topic":"kv-events","endpoint":"tcp://127.0.0.1:5557"}')
    p.add_argument("--enable-metrics", action="store_true")
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--chat-template", default=None)
    p.add_argument("--disaggregation-mode", default="null", choices=DISAGGREGATION_CHOICES)
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=None)
    p.add_argument("--disaggregation-transfer-backend", default=None,
                   help="KV transfer: tcp (across hosts) or shm (one host) for the native engine; "
                        "mooncake/nixl for sglang. Default tcp (native), mooncake (sglang)")
    p.add_argument("--disaggregation-bootstrap-timeout", type=_positive_float,
                   default=float(os.environ.get("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300)),
                   help="seconds a prefill room waits for its decode side (and a decode side for the "
                        "bootstrap server) before both let go (env SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the prefill worker's bootstrap server binds (0.0.0.0 for other hosts)")
    p.add_argument("--stream-interval", type=_positive_int, default=1)
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--attention-backend", default=None,
                   help="native engine: auto (triton on CUDA, torch on CPU), triton or torch; "
                        "--engine sglang: any SGLang backend (flashinfer, fa3, triton, ...)")
    p.add_argument("--cuda-graph-max-bs", type=_positive_int, default=None,
                   help="largest decode batch replayed from a CUDA graph")
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="read each step's tokens before scheduling the next (overlap is on by default on GPUs)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--random-seed", type=int, default=None)
    p.add_argument("--tool-call-parser", default=None)
    p.add_argument("--reasoning-parser", default=None)
    p.add_argument("--log-level", default=log_level_from_env(), choices=LOG_LEVELS,
                   help="env DYN_LOG (its first level; Dynamo's per-target filters are ignored)")
    p.add_argument("--config", default=None, help="YAML file of SGLang args; command-line flags win")
    return p


# --- config files ---------------------------------------------------------------------------


def _yaml_to_argv(data: dict[str, Any], source: str) -> list[str]:
    """Turn a YAML mapping of SGLang args into argv tokens (SGLang's --config convention)."""
    argv: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, list):
            argv.append(flag)
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.extend([flag, json.dumps(value)])
        else:
            argv.extend([flag, str(value)])
    if not argv and data:
        log.debug("config %s has only false/null values", source)
    return argv


def _load_yaml_mapping(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of args, got {type(data).__name__}")
    return data


def extract_disagg_section(path: str, key: str) -> dict[str, Any]:
    """The ``key`` section of a multi-section YAML file (Dynamo's nested config extraction)."""
    data = _load_yaml_mapping(path)
    if key not in data:
        available = ", ".join(sorted(map(str, data))) or "none"
        raise ConfigError(f"--disagg-config-key {key!r} not found in {path}; available keys: {available}")
    section = data[key]
    if not isinstance(section, dict):
        raise ConfigError(
            f"section {key!r} of {path} must be a mapping of SGLang args, got {type(section).__name__}"
        )
    return section


def _strip_config_flag(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--config FILE`` / ``--config=FILE`` from ``argv``; return the rest and the file."""
    out: list[str] = []
    config: str | None = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config = argv[i + 1]
            i += 2
            continue
        if token.startswith("--config="):
            config = token.split("=", 1)[1]
        else:
            out.append(token)
        i += 1
    return out, config


# --- validation -----------------------------------------------------------------------------


def parse_endpoint_types(text: str) -> list[ModelType]:
    types: list[ModelType] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in ENDPOINT_TYPE_CHOICES:
            raise ConfigError(
                f"--endpoint-types: unknown type {name!r}; choose from {', '.join(ENDPOINT_TYPE_CHOICES)}"
            )
        if ENDPOINT_TYPE_CHOICES[name] not in types:
            types.append(ENDPOINT_TYPE_CHOICES[name])
    if not types:
        raise ConfigError("--endpoint-types must name at least one of chat, completions")
    return types


def apply_namespace_suffix(namespace: str) -> str:
    suffix = os.environ.get("DYN_NAMESPACE_WORKER_SUFFIX")
    return f"{namespace}-{suffix}" if suffix else namespace


def infer_endpoint(dynamo: DynamoConfig, server: SglangServerConfig) -> EndpointId:
    if dynamo.endpoint:
        return EndpointId.parse(dynamo.endpoint)
    ns = dynamo.namespace
    if dynamo.embedding_worker:
        return EndpointId(ns, "backend", "generate")
    if server.disaggregation_mode == "prefill":
        return EndpointId(ns, "prefill", "generate")
    return EndpointId(ns, "backend", "generate")


def _validate_kv_events_config(raw: str | None) -> None:
    if raw is None:
        return
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kv-events-config is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError("--kv-events-config must be a JSON object")
    if cfg.get("publisher", "null") != "null" and not cfg.get("endpoint"):
        raise ConfigError('--kv-events-config needs an "endpoint", e.g. "tcp://127.0.0.1:5557"')


def default_engine() -> str:
    """sglang when the real package is importable and CUDA is present, else our native engine."""
    from armature.sglang import sgl_compat

    return "sglang" if sgl_compat.sglang_usable() else "native"


def _validate(dynamo: DynamoConfig, server: SglangServerConfig, engine: str) -> None:
    if server.tool_call_parser and dynamo.dyn_tool_call_parser:
        raise ConfigError(
            "--tool-call-parser (SGLang) and --dyn-tool-call-parser (Armature frontend) are mutually "
            "exclusive; the frontend parses tool calls, so use --dyn-tool-call-parser"
        )
    if server.reasoning_parser and dynamo.dyn_reasoning_parser:
        raise ConfigError(
            "--reasoning-parser (SGLang) and --dyn-reasoning-parser (Armature frontend) are mutually "
            "exclusive; the frontend parses reasoning, so use --dyn-reasoning-parser"
        )
    _adopt_parsers(dynamo, server)
    if engine != "sglang" and server.tp_size != 1:
        raise ConfigError(
            f"--tp {server.tp_size}: the {engine} engine runs on one device; use --tp 1 "
            "(tensor parallelism needs --engine sglang)"
        )
    if engine != "sglang" and server.dp_size != 1:
        raise ConfigError(f"--dp-size {server.dp_size}: the {engine} engine supports only --dp-size 1")
    if dynamo.embedding_worker and engine == "mocker":
        raise ConfigError("--embedding-worker needs a real model: use --engine native or sglang, not mocker")
    if dynamo.embedding_worker and server.disaggregation_mode != "null":
        raise ConfigError("--embedding-worker embeds whole inputs in one pass; it takes no --disaggregation-mode")
    if engine == "mocker" and server.disaggregation_mode != "null":
        raise ConfigError(
            f"--disaggregation-mode {server.disaggregation_mode} is not supported by the mocker engine "
            "(it has no KV to transfer); use --engine native"
        )
    if engine == "native":
        backend = server.disaggregation_transfer_backend or NATIVE_TRANSFER_BACKENDS[0]
        if backend not in NATIVE_TRANSFER_BACKENDS:
            raise ConfigError(
                f"--disaggregation-transfer-backend {backend}: the native engine transfers KV over "
                f"{' or '.join(NATIVE_TRANSFER_BACKENDS)} (tcp across hosts, shm between processes of one host)"
            )
        server.disaggregation_transfer_backend = backend
    elif server.disaggregation_transfer_backend is None:
        server.disaggregation_transfer_backend = "mooncake"
    _validate_kv_events_config(server.kv_events_config)


def _adopt_parsers(dynamo: DynamoConfig, server: SglangServerConfig) -> None:
    """The frontend tokenizes and detokenizes, so it is where output is parsed: SGLang's own
    ``--reasoning-parser`` / ``--tool-call-parser`` are taken as the ``--dyn-`` flags."""
    from armature.frontend.parsers import REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES

    if server.reasoning_parser:
        dynamo.dyn_reasoning_parser, server.reasoning_parser = server.reasoning_parser, None
    if server.tool_call_parser:
        dynamo.dyn_tool_call_parser, server.tool_call_parser = server.tool_call_parser, None
    for flag, name, known in (
        ("--dyn-reasoning-parser", dynamo.dyn_reasoning_parser, REASONING_PARSER_NAMES),
        ("--dyn-tool-call-parser", dynamo.dyn_tool_call_parser, TOOL_CALL_PARSER_NAMES),
    ):
        if name is not None and name not in known:
            raise ConfigError(f"{flag} {name!r}: unknown parser; choose from {', '.join(known)}")


def _resolve_template(path: str) -> str:
    expanded = os.path.expandvars(os.path.expanduser(path))
    if not os.path.isfile(expanded):
        raise ConfigError(f"--custom-jinja-template {path!r}: no such file ({expanded})")
    return expanded


def resolve_model_path(model_path: str) -> str:
    """The local folder or GGUF file of ``model_path``; a hub id fails offline with a clear error."""
    from armature.engine.loader import resolve_model_path as loader_resolve

    try:
        return str(loader_resolve(model_path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(f"--model-path {model_path!r}: {exc}") from exc


# --- the pipeline ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str], *, prog: str = "python -m armature.sglang") -> WorkerConfig:
    """Parse a worker command line into a ``WorkerConfig``.

    Raises ``ConfigError`` for invalid combinations and ``SystemExit`` (argparse) for unknown or
    malformed arguments, as Dynamo does.
    """
    argv = list(argv)
    dyn_parser = build_dynamo_parser(add_help=False, prog=prog)
    sgl_parser = build_sglang_parser(prog=prog)
    if "-h" in argv or "--help" in argv:
        _print_help(dyn_parser, sgl_parser, prog)
        raise SystemExit(0)

    dyn_ns, rest = dyn_parser.parse_known_args(argv)
    dynamo = DynamoConfig(**{k: v for k, v in vars(dyn_ns).items() if k != "engine"})
    if bool(dynamo.disagg_config) != bool(dynamo.disagg_config_key):
        raise ConfigError("Both --disagg-config and --disagg-config-key must be provided together")

    rest, config_file = _strip_config_flag(rest)
    file_argv: list[str] = []
    if dynamo.disagg_config and dynamo.disagg_config_key:
        # The selected section replaces any --config: it is the SGLang config of this worker.
        section = extract_disagg_section(dynamo.disagg_config, dynamo.disagg_config_key)
        file_argv = _yaml_to_argv(section, f"{dynamo.disagg_config}[{dynamo.disagg_config_key}]")
    elif config_file:
        file_argv = _yaml_to_argv(_load_yaml_mapping(config_file), config_file)
    # File values first so the command line wins (argparse keeps the last occurrence).
    sgl_ns = sgl_parser.parse_args(file_argv + rest)
    sgl_vals = vars(sgl_ns)
    sgl_vals.pop("config")

    if not sgl_vals.get("model_path"):
        sgl_parser.error("the following arguments are required: --model-path")
    if not sgl_vals.get("served_model_name"):
        sgl_vals["served_model_name"] = sgl_vals["model_path"]
    server = SglangServerConfig(**sgl_vals)
    server.is_embedding = dynamo.embedding_worker

    dynamo.namespace = apply_namespace_suffix(dynamo.namespace)
    engine = dyn_ns.engine or default_engine()
    _validate(dynamo, server, engine)
    model_types = parse_endpoint_types(dynamo.endpoint_types)
    if dynamo.custom_jinja_template:
        dynamo.custom_jinja_template = _resolve_template(dynamo.custom_jinja_template)
        if ModelType.CHAT not in model_types:
            log.warning("--custom-jinja-template is set but 'chat' is not in --endpoint-types; it is unused")
    if dynamo.embedding_worker:
        model_types = [ModelType.EMBEDDING]
    elif server.disaggregation_mode == "prefill":
        model_types = [ModelType.PREFILL]

    endpoint = infer_endpoint(dynamo, server)
    serving_mode = {
        "prefill": ServingMode.PREFILL,
        "decode": ServingMode.DECODE,
    }.get(server.disaggregation_mode, ServingMode.AGGREGATED)
    resolved = resolve_model_path(server.model_path)
    config = WorkerConfig(
        server=server,
        dynamo=dynamo,
        engine=engine,
        endpoint=endpoint,
        serving_mode=serving_mode,
        model_types=model_types,
        resolved_model_path=resolved,
        log_level=server.log_level,
    )
    return config


def _print_help(dyn: argparse.ArgumentParser, sgl: argparse.ArgumentParser, prog: str) -> None:
    combined = argparse.ArgumentParser(prog=prog, description=dyn.description, add_help=True)
    for parent in (dyn, sgl):
        for group in parent._action_groups:
            if not group._group_actions:
                continue
            title = group.title if parent is dyn else "SGLang server args"
            target = combined.add_argument_group(title)
            for action in group._group_actions:
                target._add_action(action)
    combined.print_help(sys.stdout)
