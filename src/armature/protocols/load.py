"""Load metrics a worker publishes: consumed by the router's busy detection and the planner."""

from __future__ import annotations

import msgspec

# The event-plane topic workers publish their ActiveLoad on (component scope).
LOAD_TOPIC = "load_metrics"


class ActiveLoad(msgspec.Struct, kw_only=True):
    worker_id: int
    dp_rank: int = 0
    active_decode_blocks: int = 0
    active_prefill_tokens: int = 0
    kv_total_blocks: int = 0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    cache_hit_rate: float = 0.0
