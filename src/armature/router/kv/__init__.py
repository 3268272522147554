"""KV-aware routing: radix index of workers' KV blocks, active-sequence load, cost-based choice."""

from __future__ import annotations

from armature.router.kv.active_sequences import ActiveSequences
from armature.router.kv.approx import ApproxKvIndexer
from armature.router.kv.config import KvRouterConfig, add_router_args
from armature.router.kv.gap_recovery import GapHandler, InProcessGapHandler, RequestPlaneGapHandler
from armature.router.kv.indexer import EventGap, KvIndexer, OverlapScores
from armature.router.kv.local_indexer import LocalKvIndexer
from armature.router.kv.messages import ReplicaSyncMessage, SeqAdded, SeqFreed, SeqPrefillDone, WorkerSnapshot
from armature.router.kv.metrics import RouterMetrics
from armature.router.kv.scheduler import KvScheduler, WorkerCost
from armature.router.kv.service import KvRouter, NoWorkersError, RoutingDecision, UnknownWorkerError

__all__ = [
    "ActiveSequences",
    "ApproxKvIndexer",
    "EventGap",
    "GapHandler",
    "InProcessGapHandler",
    "KvIndexer",
    "KvRouter",
    "KvRouterConfig",
    "KvScheduler",
    "LocalKvIndexer",
    "NoWorkersError",
    "OverlapScores",
    "ReplicaSyncMessage",
    "RequestPlaneGapHandler",
    "RouterMetrics",
    "RoutingDecision",
    "SeqAdded",
    "SeqFreed",
    "SeqPrefillDone",
    "UnknownWorkerError",
    "WorkerCost",
    "WorkerSnapshot",
    "add_router_args",
]
