"""Worker selection: the cost of sending a request to each (worker, dp_rank), and the choice.

For each candidate::

    cached         = blocks of the request's prefix already cached there (indexer)
    in_flight      = leading request blocks that requests routed there and not yet finished
                     hold (the active-sequence trie): computed there by the time this request
                     is scheduled, even before the worker's KV events report them
    overlap        = max(cached, in_flight)
    prefill_tokens = active prefill tokens there + max(isl - overlap * block_size, 0)
    decode_blocks  = active blocks there + request blocks not already active there
    logit          = overlap_score_weight * prefill_tokens / block_size + decode_blocks

The in-flight credit is what lets the router see its own just-routed requests as cache: a
worker's KV events for a prompt arrive only once its prefill has run (a cold 4k-token prompt
keeps it unknown for a whole prefill), and without the credit every request of the same prefix
routed meanwhile looks cold everywhere, so the prefill load of the first one pushes the next
to another worker, which computes the same prefix again.

Lower is better. Temperature 0 keeps every minimum; ties go to the candidate with the fewest
cached blocks once this request's new blocks are stored there (``tree_size + request full
blocks - overlap``: the most room left), then uniformly at random. Between candidates with the
same overlap this is simply the smallest tree (Dynamo's rule). Between a worker that holds the
prefix and one that would compute it, the holder stores only the request's tail. Such exact
ties are common on prefix-sharing loads (a hit saves 64 prefill + 64 decode blocks in
benchmarks/kv_routing.py, and the holder's extra load is often exactly that): by tree size and
then at random, 5 of 28 requests sent away from their prefix's holder in one diagnostic phase
were ties, and each computed and stored the same prefix a second time. Temperature T > 0
min-max normalises the logits and samples ``p ∝ exp(-normalised / T)``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from armature.router.kv.slots import WorkerKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestShape:
    isl: int  # input tokens
    request_blocks: int  # KV blocks the request occupies (a partial tail block counts)


@dataclass(frozen=True, slots=True)
class CostInputs:
    """Everything the costs of one request over its candidates depend on."""

    candidates: Sequence[WorkerKey]
    shape: RequestShape
    overlaps: Mapping[WorkerKey, int]  # cached prefix blocks (indexer)
    tree_sizes: Mapping[WorkerKey, int]  # cached blocks in all (the tie-break, less the overlap)
    active_prefill: Mapping[WorkerKey, int]  # prefill tokens of the requests in flight
    active_blocks: Mapping[WorkerKey, int]  # blocks of the requests in flight
    already_active: Mapping[WorkerKey, int]  # request blocks already in flight there
    overlap_score_weight: float


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

    def costs(self, inputs: CostInputs) -> list[WorkerCost]:
        """Every candidate's cost terms (for inspection and the debug log)."""
        bs = self.block_size
        shape = inputs.shape
        overlaps, active_prefill = inputs.overlaps, inputs.active_prefill
        active_blocks, already_active = inputs.active_blocks, inputs.already_active
        out: list[WorkerCost] = []
        for key in inputs.candidates:
            active = already_active.get(key, 0)
            ov = max(overlaps.get(key, 0), active)
            prefill = active_prefill.get(key, 0) + max(shape.isl - ov * bs, 0)
            decode = active_blocks.get(key, 0) + shape.request_blocks - active
            logit = inputs.overlap_score_weight * prefill / bs + decode
            out.append(WorkerCost(key[0], key[1], ov, prefill, decode, inputs.tree_sizes.get(key, 0), logit))
        return out

    def select(self, inputs: CostInputs, temperature: float) -> Selection:
        """Pick the cheapest candidate (or sample one when ``temperature`` > 0)."""
        if not inputs.candidates:
            raise ValueError("no candidate workers")
        bs = self.block_size
        isl = inputs.shape.isl
        weight = inputs.overlap_score_weight
        w = weight / bs
        # logit_k = w * (active_prefill_k + isl - min(overlap_k * bs, isl))
        #           + active_blocks_k + request_blocks - already_active_k
        # with overlap_k = max(cached_k, already_active_k). Split into a per-worker load term, a
        # per-request constant, and corrections for the few workers that share a prefix with
        # the request: the loop over every worker is then one dict comprehension, and only
        # matched workers cost Python-level work.
        active_prefill, active_blocks = inputs.active_prefill, inputs.active_blocks
        base = {k: w * active_prefill.get(k, 0) + active_blocks.get(k, 0) for k in inputs.candidates}
        # overlap * block_size never exceeds isl (only full blocks match or are booked), so the
        # prefill correction is simply weight * overlap.
        get = base.get
        overlaps = dict(inputs.overlaps)
        for k, n in inputs.already_active.items():
            v = get(k)
            if v is not None:
                base[k] = v - n
                if n > overlaps.get(k, 0):
                    overlaps[k] = n
        for k, ov in overlaps.items():
            v = get(k)
            if v is not None:
                base[k] = v - weight * ov
        const = w * isl + inputs.shape.request_blocks

        keys = list(base)
        sizes = inputs.tree_sizes
        i = self.pick(
            np.fromiter(base.values(), dtype=np.float64, count=len(keys)),
            const,
            lambda ties: np.array([sizes.get(keys[j], 0) - overlaps.get(keys[j], 0) for j in ties]),
            temperature,
        )
        key = keys[i]
        logit = base[key] + const
        ov = overlaps.get(key, 0)
        if logger.isEnabledFor(logging.DEBUG):
            self.log_costs(inputs, key)
        return Selection(key[0], key[1], ov, logit, max(isl - ov * bs, 0))

    def pick(
        self,
        logits: np.ndarray,
        const: float,
        stored_after: Callable[[np.ndarray], np.ndarray],
        temperature: float,
    ) -> int:
        """The choice over a logit vector (``logits + const`` are the costs): the chosen position.

        With temperature 0 every minimum is a candidate, then the fewest cached blocks once the
        request is stored (``stored_after(positions)``, up to a constant: tree size minus
        overlap), then uniformly at random; otherwise a softmax sample.
        """
        if not len(logits):
            raise ValueError("no candidate workers")
        if temperature > 0:
            return self._sample((logits + const).tolist(), temperature)
        i = int(logits.argmin())
        best = float(logits[i])
        tol = 1e-9 * max(1.0, abs(best + const))
        near = logits <= best + tol
        if np.count_nonzero(near) == 1:
            return i
        ties = np.flatnonzero(near)
        if len(ties) > 1:
            sizes = stored_after(ties)
            ties = ties[sizes == sizes.min()]
        return int(ties[0]) if len(ties) == 1 else int(ties[self.rng.randrange(len(ties))])

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

    def log_costs(self, inputs: CostInputs, chosen: WorkerKey) -> None:
        for c in self.costs(inputs):
            logger.debug(
                "formula for worker_id=%x dp_rank=%d with %d cached blocks (overlap %d): "
                "logit = %.3g * prefill_blocks(%.3g) + decode_blocks(%d) = %.3f%s",
                c.worker_id,
                c.dp_rank,
                c.tree_size,
                c.overlap_blocks,
                inputs.overlap_score_weight,
                c.prefill_tokens / self.block_size,
                c.decode_blocks,
                c.logit,
                "  <- chosen" if (c.worker_id, c.dp_rank) == chosen else "",
            )
