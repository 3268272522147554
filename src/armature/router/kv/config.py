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


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean")


def _env(name: str, cast: type, default: object) -> object:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return cast(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None


def add_router_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the KV router flags (Dynamo's names, old aliases and env variables included)."""
    d = KvRouterConfig()
    g = parser.add_argument_group("KV router")
    g.add_argument(
        "--router-kv-overlap-score-weight",
        "--kv-overlap-score-weight",
        dest="overlap_score_weight",
        type=float,
        default=_env("DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT", float, d.overlap_score_weight),
        help="weight of prefill blocks against decode blocks in the cost (0: no indexer, load only)",
    )
    g.add_argument(
        "--router-temperature",
        dest="router_temperature",
        type=float,
        default=_env("DYN_ROUTER_TEMPERATURE", float, d.router_temperature),
        help="softmax temperature over normalised costs; 0 picks the cheapest worker",
    )
    g.add_argument(
        "--router-kv-events",
        "--kv-events",
        dest="use_kv_events",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("DYN_ROUTER_USE_KV_EVENTS", d.use_kv_events),
        help="index workers' KV events; --no-router-kv-events predicts caches from routing history",
    )
    g.add_argument(
        "--router-ttl-secs",
        dest="router_ttl_secs",
        type=float,
        default=d.router_ttl_secs,
        help="approximate mode: how long a routed block is assumed cached",
    )
    g.add_argument(
        "--router-max-tree-size",
        dest="router_max_tree_size",
        type=int,
        default=d.router_max_tree_size,
        help="approximate mode: prune the index when it holds more blocks than this",
    )
    g.add_argument(
        "--router-prune-target-ratio",
        dest="router_prune_target_ratio",
        type=float,
        default=d.router_prune_target_ratio,
        help="approximate mode: prune down to this fraction of --router-max-tree-size",
    )
    g.add_argument(
        "--router-replica-sync",
        dest="router_replica_sync",
        action="store_true",
        default=d.router_replica_sync,
        help="share active-sequence changes with other router replicas over the event plane",
    )
    g.add_argument(
        "--router-reset-states",
        dest="router_reset_states",
        action="store_true",
        default=d.router_reset_states,
        help="start from an empty index (Armature keeps no durable router state; always true)",
    )
    g.add_argument(
        "--router-track-active-blocks",
        "--track-active-blocks",
        dest="router_track_active_blocks",
        action=argparse.BooleanOptionalAction,
        default=d.router_track_active_blocks,
        help="count routed requests' blocks as decode load (--no-track-active-blocks: prefill only)",
    )
    g.add_argument(
        "--router-assume-kv-reuse",
        dest="router_assume_kv_reuse",
        action=argparse.BooleanOptionalAction,
        default=d.router_assume_kv_reuse,
        help="blocks shared by active requests on a worker count once",
    )
    g.add_argument(
        "--router-event-threads",
        dest="router_event_threads",
        type=int,
        default=_env("DYN_ROUTER_EVENT_THREADS", int, 1),
        help="accepted for compatibility; the indexer applies events on one thread",
    )
    g.add_argument(
        "--kv-cache-block-size",
        "--router-block-size",
        dest="kv_cache_block_size",
        type=int,
        default=_env("DYN_KV_CACHE_BLOCK_SIZE", int, d.kv_cache_block_size),
        help="tokens per KV block (default: the model card's)",
    )
    return parser
