"""Requests the router has sent to each (worker, dp_rank) and the load they put there.

A request is added when routed (its blocks and the prefill tokens it still needs), its prefill
tokens are released at its first token, and it is freed at completion or cancellation; requests
nobody reported on are expired after a TTL (300 s) so a lost notification cannot leak load.

Decode load counts *unique* blocks: requests sharing a prefix on one worker share its KV pages.
Active blocks live in a compressed prefix trie keyed by canonical local block hashes (a path
from the root is a whole prefix, like a chained sequence hash) with per-slot reference counts,
so "how many of this request's blocks are already active on each worker" is one intersecting
walk, with no per-worker loop. An edge holds a *run* of block hashes that every request through
it shares, so booking a request whose tail nobody else has costs one node, not one per block,
and runs are compared with C-level list comparisons. A run is split when a new request diverges
inside it, so requests always start and end on node boundaries and a node's reference counts
hold for its whole run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from armature.router.kv.run_trie import ROOT as _ROOT
from armature.router.kv.run_trie import RunTrie, common_prefix
from armature.router.kv.slots import WorkerKey

logger = logging.getLogger(__name__)


_SLOT_BITS = 16  # refs are keyed by node id << 16 | slot


@dataclass(slots=True)
class _Request:
    key: WorkerKey
    slot: int
    hashes: list[int]  # the booked full blocks' hashes; release re-walks them
    own_blocks: int  # blocks counted for this request alone (partial tail, or all without reuse)
    prefill_tokens: int
    started_at: float
    prefill_done: bool = False


@dataclass(frozen=True, slots=True)
class SequenceLoad:
    worker_id: int
    dp_rank: int
    active_blocks: int
    active_prefill_tokens: int
    num_requests: int


class ActiveSequences(RunTrie):
    """Active requests per (worker_id, dp_rank) with unique-block decode load."""

    def __init__(
        self,
        block_size: int,
        *,
        ttl_secs: float = 300.0,
        assume_kv_reuse: bool = True,
        track_active_blocks: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.ttl_secs = ttl_secs
        self.assume_kv_reuse = assume_kv_reuse
        self.track_active_blocks = track_active_blocks
        self._clock = clock
        super().__init__()
        # (node id << 16 | slot) -> active requests on that slot using the block.
        self._refs: dict[int, int] = {}
        # Read directly by the scheduler; every known key is present.
        self.active_blocks: dict[WorkerKey, int] = {}
        self.prefill_tokens: dict[WorkerKey, int] = {}
        self._num_requests: dict[WorkerKey, int] = {}
        # Insertion order is start order, so expiry only looks at the front.
        self._requests: dict[str, _Request] = {}
        self.expired_total = 0
        # Called with a key whenever its load changes (the router keeps caches and gauges).
        self.on_change: Callable[[WorkerKey], None] | None = None

    # ------------------------------------------------------------------ queries

    def already_active(self, local_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        """For each slot, how many leading blocks of the request are already active there."""
        return self._keyed(self._walk(local_hashes))

    # ``already_active`` as ``[(slot mask, depth)]``: no per-slot work (see ``slot_of``). Without
    # kv reuse (or block tracking) nothing is ever booked in the trie, so this is empty then.
    active_levels = RunTrie._walk

    def new_prefill_tokens(self, isl: int, overlap_blocks: int) -> int:
        return max(isl - overlap_blocks * self.block_size, 0)

    def request_blocks(self, isl: int) -> int:
        """KV blocks a request of ``isl`` tokens occupies (a partial tail block counts)."""
        return -(-isl // self.block_size)

    def loads(self) -> list[SequenceLoad]:
        return [
            SequenceLoad(k[0], k[1], self.active_blocks[k], self.prefill_tokens[k], self._num_requests[k])
            for k in sorted(self.active_blocks)
        ]

    def load_of(self, key: WorkerKey) -> SequenceLoad:
        return SequenceLoad(
            key[0],
            key[1],
            self.active_blocks.get(key, 0),
            self.prefill_tokens.get(key, 0),
            self._num_requests.get(key, 0),
        )

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def worker_of(self, request_id: str) -> WorkerKey | None:
        req = self._requests.get(request_id)
        return None if req is None else req.key

    # ------------------------------------------------------------------ changes

    def ensure_worker(self, key: WorkerKey) -> None:
        if key not in self.active_blocks:
            if self._slots.acquire(key) >= 1 << _SLOT_BITS:
                self._slots.release(key)
                raise ValueError(f"more than {1 << _SLOT_BITS} (worker, dp_rank) pairs are active")
            self.active_blocks[key] = 0
            self.prefill_tokens[key] = 0
            self._num_requests[key] = 0

    def add_request(
        self,
        request_id: str,
        key: WorkerKey,
        local_hashes: Sequence[int],
        isl: int,
        overlap_blocks: int,
    ) -> int:
        """Book a routed request; returns the prefill tokens it adds to ``key``."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        if isl < 0 or overlap_blocks < 0:
            raise ValueError("isl and overlap_blocks must be >= 0")
        now = self._clock()
        self.expire(now)
        self.ensure_worker(key)
        slot = self._slots.get(key)
        assert slot is not None
        prefill = self.new_prefill_tokens(isl, overlap_blocks)
        hashes: list[int] = []
        own = 0
        if self.track_active_blocks:
            full = isl // self.block_size
            if len(local_hashes) < full:
                raise ValueError(f"request {request_id!r}: {len(local_hashes)} block hashes for {isl} tokens")
            if self.assume_kv_reuse:
                hashes = list(local_hashes[:full])
                self._book(slot, key, hashes)
                own = self.request_blocks(isl) - full
            else:
                own = self.request_blocks(isl)
            self.active_blocks[key] += own
        self.prefill_tokens[key] += prefill
        self._num_requests[key] += 1
        self._requests[request_id] = _Request(key, slot, hashes, own, prefill, now)
        if self.on_change is not None:
            self.on_change(key)
        return prefill

    def mark_prefill_completed(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None:
            return False
        if not req.prefill_done:
            req.prefill_done = True
            self.prefill_tokens[req.key] -= req.prefill_tokens
            if self.on_change is not None:
                self.on_change(req.key)
        return True

    def free(self, request_id: str) -> bool:
        """Release everything the request holds; False if it is not (or no longer) active."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._release(req)
        return True

    def expire(self, now: float | None = None) -> int:
        """Free requests older than the TTL; returns how many."""
        if now is None:
            now = self._clock()
        deadline = now - self.ttl_secs
        n = 0
        while self._requests:
            rid, req = next(iter(self._requests.items()))
            if req.started_at > deadline:
                break
            del self._requests[rid]
            self._release(req)
            n += 1
        if n:
            self.expired_total += n
            logger.warning("expired %d active requests older than %.0f s", n, self.ttl_secs)
        return n

    def remove_worker(self, worker_id: int) -> int:
        """Drop every request on ``worker_id`` (all dp ranks); returns how many."""
        gone = [rid for rid, req in self._requests.items() if req.key[0] == worker_id]
        for rid in gone:
            self._release(self._requests.pop(rid))
        for key in self._slots.keys_of_worker(worker_id):
            self._slots.release(key)
            self.active_blocks.pop(key, None)
            self.prefill_tokens.pop(key, None)
            self._num_requests.pop(key, None)
        return len(gone)

    # ------------------------------------------------------------------ internals

    def _path(self, hashes: list[int], create: bool) -> list[int]:
        """Nodes whose runs exactly tile ``hashes``; splits and creates nodes when ``create``."""
        kids, runs = self._kids, self._run
        nodes: list[int] = []
        nid = _ROOT
        i = 0
        n = len(hashes)
        while i < n:
            children = kids[nid]
            child = None if children is None else children.get(hashes[i])
            if child is None:
                if not create:
                    raise KeyError("request path not in the active trie")
                nodes.append(self._new_node(nid, hashes[i:], 0))
                break
            run = runs[child]
            size = len(run)
            if size > 1:
                segment = hashes[i : i + size]
                if segment != run:
                    if not create:
                        raise KeyError("request path not in the active trie")
                    size = common_prefix(segment, run)
                    self._split(child, size)
            nodes.append(child)
            i += size
            nid = child
        return nodes

    def _split(self, nid: int, at: int) -> None:
        """Cut node ``nid``'s run after ``at`` blocks; the tail shares its reference counts."""
        tail = self._cut(nid, at)
        m = self._mask[nid]
        refs = self._refs
        while m:
            low = m & -m
            slot = low.bit_length() - 1
            refs[tail << _SLOT_BITS | slot] = refs[nid << _SLOT_BITS | slot]
            m ^= low

    def _book(self, slot: int, key: WorkerKey, hashes: list[int]) -> None:
        bit = 1 << slot
        mask, refs, runs = self._mask, self._refs, self._run
        new_blocks = 0
        for nid in self._path(hashes, create=True):
            rk = nid << _SLOT_BITS | slot
            count = refs.get(rk, 0)
            if not count:
                mask[nid] |= bit
                new_blocks += len(runs[nid])
            refs[rk] = count + 1
        self.active_blocks[key] += new_blocks

    def _release(self, req: _Request) -> None:
        key, slot = req.key, req.slot
        if not req.prefill_done:
            self.prefill_tokens[key] -= req.prefill_tokens
        self.active_blocks[key] -= req.own_blocks
        self._num_requests[key] -= 1
        bit = 1 << slot
        mask, refs, runs = self._mask, self._refs, self._run
        freed = 0
        for nid in reversed(self._path(req.hashes, create=False) if req.hashes else []):
            rk = nid << _SLOT_BITS | slot
            count = refs[rk] - 1
            if count:
                refs[rk] = count
                continue
            del refs[rk]
            mask[nid] &= ~bit
            freed += len(runs[nid])
            # Leaf to root, so this request's deeper nodes are released already.
            if not mask[nid] and self._kids[nid] is None:
                self._prune(nid)
        self.active_blocks[key] -= freed
        if self.on_change is not None:
            self.on_change(key)
