"""KV router configuration: Dynamo's router flag names and defaults, shared by the frontend
(``--router-mode kv``) and the standalone router (``python -m armature.router``)."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, fields

logger = logging.getLogger(__name__)

DEFAULT_MAX_TREE_SIZE = 2**20
# Requests the router booked but never heard back about are dropped after this long.
DEFAULT_ACTIVE_SEQUENCE_TTL_SECS = 300.0


@dataclass(frozen=True, slots=True)
class KvRouterConfig:
    overlap_score_weight: float = 1.0
    router_temperature: float = 0.0
    use_kv_events: bool = True
    router_ttl_secs: float = 120.0
    router_max_tree_size: int = DEFAULT_MAX_TREE_SIZE
    router_prune_target_ratio: float = 0.8
    router_replica_sync: bool = False
    # Armature keeps no durable router state (no JetStream stream or object store), so every
    # start is already a reset; the flag is accepted so Dynamo launch scripts run unchanged.
    router_reset_states: bool = False
    router_track_active_blocks: bool = True
    router_assume_kv_reuse: bool = True
    # None: take the block size from the model card (the frontend) or require it (standalone).
    kv_cache_block_size: int | None = None
    active_sequence_ttl_secs: float = DEFAULT_ACTIVE_SEQUENCE_TTL_SECS

    def __post_init__(self) -> None:
        if self.overlap_score_weight < 0:
            raise ValueError(f"--router-kv-overlap-score-weight must be >= 0, got {self.overlap_score_weight}")
        if self.router_temperature < 0:
            raise ValueError(f"--router-temperature must be >= 0, got {self.router_temperature}")
        if self.router_ttl_secs <= 0:
            raise ValueError(f"--router-ttl-secs must be > 0, got {self.router_ttl_secs}")
        if self.router_max_tree_size <= 0:
            raise ValueError(f"--router-max-tree-size must be > 0, got {self.router_max_tree_size}")
        if not 0.0 < self.router_prune_target_ratio <= 1.0:
            raise ValueError(
                f"--router-prune-target-ratio must be in (0, 1], got {self.router_prune_target_ratio}"
            )
        if self.kv_cache_block_size is not None and self.kv_cache_block_size <= 0:
            raise ValueError(f"--kv-cache-block-size must be > 0, got {self.kv_cache_block_size}")
        if self.active_sequence_ttl_secs <= 0:
            raise ValueError(f"active sequence TTL must be > 0, got {self.active_sequence_ttl_secs}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KvRouterConfig:
        """Build from a namespace parsed by a parser that went through ``add_router_args``."""
        if getattr(args, "router_event_threads", 1) > 1:
            logger.warning(
                "--router-event-threads %d: Armature's indexer applies events on one thread; "
                "the value only matters to Dynamo's concurrent radix tree",
                args.router_event_threads,
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _env(name: str | None, kind: type, default: object) -> object:
    """``default``, or the value of the environment variable ``name`` when it is set."""
    raw = None if name is None else os.environ.get(name)
    if raw is None:
        return default
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r} is not a boolean")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


_FROM_CONFIG = object()


@dataclass(frozen=True, slots=True)
class _Flag:
    """One router flag: its names (Dynamo's first, then old aliases) and where it lands."""

    names: tuple[str, ...]
    dest: str  # the ``KvRouterConfig`` field it sets
    kind: type  # int, float or bool
    help: str
    env: str | None = None  # environment variable that replaces the default
    negatable: bool = True  # a bool flag has a --no- form (else it can only be switched on)
    default: object = _FROM_CONFIG


_FLAGS = (
    _Flag(
        ("--router-kv-overlap-score-weight", "--kv-overlap-score-weight"), "overlap_score_weight", float,
        "weight of prefill blocks against decode blocks in the cost (0: no indexer, load only)",
        env="DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
    ),
    _Flag(
        ("--router-temperature",), "router_temperature", float,
        "softmax temperature over normalised costs; 0 picks the cheapest worker",
        env="DYN_ROUTER_TEMPERATURE",
    ),
    _Flag(
        ("--router-kv-events", "--kv-events"), "use_kv_events", bool,
        "index workers' KV events; --no-router-kv-events predicts caches from routing history",
        env="DYN_ROUTER_USE_KV_EVENTS",
    ),
    _Flag(
        ("--router-ttl-secs",), "router_ttl_secs", float,
        "approximate mode: how long a routed block is assumed cached",
    ),
    _Flag(
        ("--router-max-tree-size",), "router_max_tree_size", int,
        "approximate mode: prune the index when it holds more blocks than this",
    ),
    _Flag(
        ("--router-prune-target-ratio",), "router_prune_target_ratio", float,
        "approximate mode: prune down to this fraction of --router-max-tree-size",
    ),
    _Flag(
        ("--router-replica-sync",), "router_replica_sync", bool,
        "share active-sequence changes with other router replicas over the event plane",
        negatable=False,
    ),
    _Flag(
        ("--router-reset-states",), "router_reset_states", bool,
        "start from an empty index (Armature keeps no durable router state; always true)",
        negatable=False,
    ),
    _Flag(
        ("--router-track-active-blocks", "--track-active-blocks"), "router_track_active_blocks", bool,
        "count routed requests' blocks as decode load (--no-track-active-blocks: prefill only)",
    ),
    _Flag(
        ("--router-assume-kv-reuse",), "router_assume_kv_reuse", bool,
        "blocks shared by active requests on a worker count once",
    ),
    # Not a config field: ``KvRouterConfig.from_args`` only warns about it.
    _Flag(
        ("--router-event-threads",), "router_event_threads", int,
        "accepted for compatibility; the indexer applies events on one thread",
        env="DYN_ROUTER_EVENT_THREADS", default=1,
    ),
    _Flag(
        ("--kv-cache-block-size", "--router-block-size"), "kv_cache_block_size", int,
        "tokens per KV block (default: the model card's)",
        env="DYN_KV_CACHE_BLOCK_SIZE",
    ),
)


def add_router_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the KV router flags (Dynamo's names, old aliases and env variables included)."""
    config = KvRouterConfig()
    g = parser.add_argument_group("KV router")
    for flag in _FLAGS:
        default = getattr(config, flag.dest) if flag.default is _FROM_CONFIG else flag.default
        default = _env(flag.env, flag.kind, default)
        if flag.kind is not bool:
            g.add_argument(*flag.names, dest=flag.dest, type=flag.kind, default=default, help=flag.help)
        else:
            action = argparse.BooleanOptionalAction if flag.negatable else "store_true"
            g.add_argument(*flag.names, dest=flag.dest, action=action, default=default, help=flag.help)
    return parser
