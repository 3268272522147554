"""Worker selection: the cost of sending a request to each (worker, dp_rank), and the choice.

For each candidate::

    overlap        = blocks of the request's prefix already cached there (indexer)
    prefill_tokens = active prefill tokens there + max(isl - overlap * block_size, 0)
    decode_blocks  = active blocks there + request blocks not already active there
    logit          = overlap_score_weight * prefill_tokens / block_size + decode_blocks

Lower is better. Temperature 0 keeps every minimum; ties go to the candidate with the fewest
cached blocks (its tree is smallest, so it has the most room), then uniformly at random.
Temperature T > 0 min-max normalises the logits and samples ``p ∝ exp(-normalised / T)``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from armature.router.kv.slots import WorkerKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestShape:
    isl: int  # input tokens
    request_blocks: int  # KV blocks the request occupies (a partial tail block counts)


@dataclass(frozen=True, slots=True)
class WorkerCost:
    worker_id: int
    dp_rank: int
    overlap_blocks: int
    prefill_tokens: int
    decode_blocks: int
    tree_size: int
    logit: float


@dataclass(frozen=True, slots=True)
class Selection:
    worker_id: int
    dp_rank: int
    overlap_blocks: int
    logit: float
    prefill_tokens: int  # the request's own new prefill tokens on the chosen worker


class KvScheduler:
    def __init__(self, block_size: int, rng: random.Random | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.rng = rng if rng is not None else random.Random()

    def costs(
        self,
        candidates: Sequence[WorkerKey],
        shape: RequestShape,
        overlaps: Mapping[WorkerKey, int],
        tree_sizes: Mapping[WorkerKey, int],
        active_prefill: Mapping[WorkerKey, int],
        active_blocks: Mapping[WorkerKey, int],
        already_active: Mapping[WorkerKey, int],
        overlap_score_weight: float,
    ) -> list[WorkerCost]:
        """Every candidate's cost terms (for inspection and the debug log)."""
        bs = self.block_size
        out: list[WorkerCost] = []
        for key in candidates:
            ov = overlaps.get(key, 0)
            prefill = active_prefill.get(key, 0) + max(shape.isl - ov * bs, 0)
            decode = active_blocks.get(key, 0) + shape.request_blocks - already_active.get(key, 0)
            logit = overlap_score_weight * prefill / bs + decode
            out.append(WorkerCost(key[0], key[1], ov, prefill, decode, tree_sizes.get(key, 0), logit))
        return out

    def select(
        self,
        candidates: Sequence[WorkerKey],
        shape: RequestShape,
        overlaps: Mapping[WorkerKey, int],
        tree_sizes: Mapping[WorkerKey, int],
        active_prefill: Mapping[WorkerKey, int],
        active_blocks: Mapping[WorkerKey, int],
        already_active: Mapping[WorkerKey, int],
        overlap_score_weight: float,
        temperature: float,
    ) -> Selection:
        if not candidates:
            raise ValueError("no candidate workers")
        bs = self.block_size
        isl = shape.isl
        nblocks = shape.request_blocks
        w = overlap_score_weight / bs
        # Hot loop: one pass, locals only. Most candidates have no overlap and nothing active in
        # common with the request, so those lookups are cheap misses.
        ov_get = overlaps.get
        aa_get = already_active.get
        ap_get = active_prefill.get
        ab_get = active_blocks.get
        logits: list[float] = []
        append = logits.append
        for key in candidates:
            new = isl - ov_get(key, 0) * bs
            if new < 0:
                new = 0
            append(w * (ap_get(key, 0) + new) + ab_get(key, 0) + nblocks - aa_get(key, 0))

        if temperature <= 0:
            best = min(logits)
            ties = [i for i, v in enumerate(logits) if v == best]
            if len(ties) > 1:
                smallest = min(tree_sizes.get(candidates[i], 0) for i in ties)
                ties = [i for i in ties if tree_sizes.get(candidates[i], 0) == smallest]
            pick = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        else:
            pick = self._sample(logits, temperature)

        key = candidates[pick]
        ov = ov_get(key, 0)
        if logger.isEnabledFor(logging.DEBUG):
            self._log(candidates, shape, overlaps, tree_sizes, active_prefill, active_blocks,
                      already_active, overlap_score_weight, key)
        return Selection(key[0], key[1], ov, logits[pick], max(isl - ov * bs, 0))

    def _sample(self, logits: list[float], temperature: float) -> int:
        lo = min(logits)
        span = max(logits) - lo
        if span == 0:
            return self.rng.randrange(len(logits))
        weights = [math.exp(-((v - lo) / span) / temperature) for v in logits]
        r = self.rng.random() * sum(weights)
        acc = 0.0
        for i, wt in enumerate(weights):
            acc += wt
            if r < acc:
                return i
        return len(logits) - 1

    def _log(
        self,
        candidates: Sequence[WorkerKey],
        shape: RequestShape,
        overlaps: Mapping[WorkerKey, int],
        tree_sizes: Mapping[WorkerKey, int],
        active_prefill: Mapping[WorkerKey, int],
        active_blocks: Mapping[WorkerKey, int],
        already_active: Mapping[WorkerKey, int],
        weight: float,
        chosen: WorkerKey,
    ) -> None:
        for c in self.costs(candidates, shape, overlaps, tree_sizes, active_prefill, active_blocks,
                            already_active, weight):
            logger.debug(
                "formula for worker_id=%x dp_rank=%d with %d cached blocks (overlap %d): "
                "logit = %.3g * prefill_blocks(%.3g) + decode_blocks(%d) = %.3f%s",
                c.worker_id,
                c.dp_rank,
                c.tree_size,
                c.overlap_blocks,
                weight,
                c.prefill_tokens / self.block_size,
                c.decode_blocks,
                c.logit,
                "  <- chosen" if (c.worker_id, c.dp_rank) == chosen else "",
            )
