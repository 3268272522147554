"""Approximate KV indexing (``--no-router-kv-events``): predict caches from routing history.

When workers publish no KV events, the router assumes a worker caches what it was sent: every
routed request's blocks are recorded for the chosen (worker, dp_rank) and forgotten after
``--router-ttl-secs``. When the index holds more than ``--router-max-tree-size`` blocks, the
least recently routed are dropped until ``--router-prune-target-ratio`` of the limit remains.

Recency is one ordered map over (slot, block). Recording a request touches its blocks leaf
first and its root last, so an ancestor is always at least as recent as its descendants and
both expiry and pruning remove leaves before the blocks they hang from — the tree never gets a
hole in the middle of a worker's path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from armature.protocols.hashing import chain_sequence_hashes
from armature.protocols.kv_events import KvRemoved, KvStored, StoredBlock
from armature.router.kv.indexer import KvIndexer, OverlapScores
from armature.router.kv.slots import WorkerKey


class ApproxKvIndexer:
    def __init__(
        self,
        *,
        ttl_secs: float = 120.0,
        max_tree_size: int = 2**20,
        prune_target_ratio: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_secs <= 0 or max_tree_size <= 0 or not 0 < prune_target_ratio <= 1:
            raise ValueError("ttl_secs and max_tree_size must be > 0, prune_target_ratio in (0, 1]")
        self.ttl_secs = ttl_secs
        self.max_tree_size = max_tree_size
        self.prune_target = int(max_tree_size * prune_target_ratio)
        self._clock = clock
        self.index = KvIndexer()
        # (worker_id, dp_rank, sequence hash) -> expiry time; front = least recently routed.
        self._expiry: OrderedDict[tuple[int, int, int], float] = OrderedDict()
        self.expired_blocks = 0
        self.pruned_blocks = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def find_matches(
        self, local_hashes: Sequence[int], early_exit: bool = False, frequencies: bool = True
    ) -> OverlapScores:
        self.expire()
        return self.index.find_matches(local_hashes, early_exit, frequencies)

    def record(self, key: WorkerKey, local_hashes: Sequence[int], now: float | None = None) -> None:
        """Remember that the request with these block hashes was routed to ``key``."""
        if not local_hashes:
            return
        if now is None:
            now = self._clock()
        # Sequence hashes stand in for the engine's block hashes: they name a whole prefix, so
        # the same prefix routed twice lands on the same node.
        seq = chain_sequence_hashes(local_hashes)
        self.index.apply_data(
            key,
            KvStored(
                parent_hash=None,
                blocks=[StoredBlock(block_hash=s, tokens_hash=h) for s, h in zip(seq, local_hashes)],
            ),
        )
        expires = now + self.ttl_secs
        entries = self._expiry
        wid, dp = key
        for s in reversed(seq):
            k = (wid, dp, s)
            entries[k] = expires
            entries.move_to_end(k)
        self.expire(now)
        if len(entries) > self.max_tree_size:
            self.pruned_blocks += self._drop_front(len(entries) - self.prune_target)

    def expire(self, now: float | None = None) -> int:
        entries = self._expiry
        if not entries:
            return 0
        if now is None:
            now = self._clock()
        n = 0
        while entries:
            k, expires = next(iter(entries.items()))
            if expires > now:
                break
            self._forget(k)
            n += 1
        self.expired_blocks += n
        return n

    def remove_worker(self, worker_id: int) -> None:
        for k in [k for k in self._expiry if k[0] == worker_id]:
            del self._expiry[k]
        self.index.remove_worker(worker_id)

    def _drop_front(self, count: int) -> int:
        n = 0
        while self._expiry and n < count:
            self._forget(next(iter(self._expiry)))
            n += 1
        return n

    def _forget(self, k: tuple[int, int, int]) -> None:
        del self._expiry[k]
        self.index.apply_data((k[0], k[1]), KvRemoved(block_hashes=[k[2]]))
