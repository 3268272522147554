"""Test helpers: real token blocks and a worker-side KV cache that emits real router events."""

from __future__ import annotations

from armature.protocols.hashing import compute_local_block_hashes, compute_sequence_block_hashes
from armature.protocols.kv_events import KvCleared, KvRemoved, KvStored, RouterEvent, StoredBlock
from armature.router.kv.local_indexer import LocalKvIndexer

BS = 16


def block(label: str) -> list[int]:
    """16 token ids that belong to block ``label`` (distinct labels give distinct tokens)."""
    base = 1000 + 97 * sum(ord(c) * 31**i for i, c in enumerate(label))
    return [(base + 7 * i) % 50_000 for i in range(BS)]


def tokens(*labels: str, tail: int = 0) -> list[int]:
    out: list[int] = []
    for label in labels:
        out.extend(block(label))
    out.extend(range(1, tail + 1))  # a partial trailing block
    return out


class SimWorker:
    """What an engine's prefix cache reports: stores new blocks under their parent, evicts leaves.

    Engine block hashes are the canonical sequence hashes, as SGLang's chained page hashes would
    be: opaque to the router, unique per prefix.
    """

    def __init__(self, worker_id: int, dp_rank: int = 0) -> None:
        self.worker_id = worker_id
        self.dp_rank = dp_rank
        self.local = LocalKvIndexer(worker_id)
        self.held: set[int] = set()

    def store(self, toks: list[int]) -> list[RouterEvent]:
        local = compute_local_block_hashes(toks, BS)
        seq = compute_sequence_block_hashes(toks, BS)
        i = 0
        while i < len(seq) and seq[i] in self.held:
            i += 1
        if i == len(seq):
            return []
        blocks = [StoredBlock(block_hash=seq[j], tokens_hash=local[j]) for j in range(i, len(seq))]
        self.held.update(seq[i:])
        parent = seq[i - 1] if i else None
        return [self.local.record(KvStored(parent_hash=parent, blocks=blocks), self.dp_rank)]

    def evict_tail(self, toks: list[int], n: int) -> list[RouterEvent]:
        seq = compute_sequence_block_hashes(toks, BS)
        gone = [h for h in reversed(seq[-n:]) if h in self.held]
        if not gone:
            return []
        self.held.difference_update(gone)
        return [self.local.record(KvRemoved(block_hashes=gone), self.dp_rank)]

    def clear(self) -> list[RouterEvent]:
        self.held.clear()
        return [self.local.record(KvCleared(), self.dp_rank)]


def held_paths(events: list[RouterEvent]) -> set[tuple[int, int, tuple[int, ...]]]:
    """(worker, dp_rank, path of local hashes) of every block in a dump: comparable across
    routers and workers whatever the event ids or the grouping of blocks into events."""
    out: set[tuple[int, int, tuple[int, ...]]] = set()
    path_of: dict[tuple[int, int, int], tuple[int, ...]] = {}
    for ev in events:
        data = ev.event.data
        assert isinstance(data, KvStored), "a dump holds stores only"
        key = (ev.worker_id, ev.event.dp_rank)
        path = () if data.parent_hash is None else path_of[(*key, data.parent_hash)]
        for b in data.blocks:
            path = path + (b.tokens_hash,)
            path_of[(*key, b.block_hash)] = path
            out.add((*key, path))
    return out
