"""The KV indexer: a radix tree over canonical local block hashes, fed by workers' KV events.

A block is a position reached by a path of local hashes from the root (so its identity is the
whole prefix, exactly like a chained sequence hash, without computing one on the query path).
Each node carries a bitmask of the (worker_id, dp_rank) slots that hold its blocks. Per slot, a
lookup from the engine's opaque block hash to the block lets ``KvRemoved`` events and
``KvStored.parent_hash`` address blocks directly.

``find_matches`` walks the request's local hashes from the root, intersecting the masks as it
goes; a slot's score is the depth at which it drops out. Nothing is allocated per block.

The tree is run-compressed: a node holds a *run* of consecutive blocks that the same slots
hold, so a worker's private 200-block tail is one node and matching it is one C-level list
comparison instead of 200 Python steps. A run is split where a new branch starts or where the
set of holders changes (a store by another worker, a removal), so a node's mask is true for
every block of its run. A lookup ref names (node, offset); a split node records where it was
cut and which node took the tail, so refs taken before the split still resolve.

Storage is flat on purpose (``RunTrie``): a node is an integer id into parallel lists, and
lookups are ``{engine_hash: ref}`` dicts. Containers holding only ints are invisible to Python's
cyclic garbage collector, so a million-block index adds almost nothing to collection pauses
(with one object per node, a full collection walked every node and stalled routing for hundreds
of milliseconds).

Events carry a per-worker ``event_id``. A jump forward is a gap: the indexer reports it, buffers
that worker's later events, and applies them once the missing range (``fill_gap``) or a full
snapshot (``load_worker_snapshot``) arrives, so events are always applied in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from bisect import bisect_right
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from armature.protocols.kv_events import (
    KvCacheEvent,
    KvCleared,
    KvRemoved,
    KvStored,
    RouterEvent,
    StoredBlock,
)
from armature.router.kv.run_trie import ROOT as _ROOT
from armature.router.kv.run_trie import RunTrie, common_prefix
from armature.router.kv.slots import WorkerKey, iter_bits

logger = logging.getLogger(__name__)


_M32 = (1 << 32) - 1
_offset = itemgetter(0)


@dataclass(slots=True)
class OverlapScores:
    """Result of ``find_matches``.

    ``scores``: matched prefix length in blocks per (worker_id, dp_rank) that matched at least one
    block. ``frequencies[i]``: how many slots hold the request's block ``i`` along the matched
    path. ``tree_sizes``: blocks currently indexed per slot (every known slot, matched or not).
    """

    scores: dict[WorkerKey, int]
    frequencies: list[int]
    tree_sizes: dict[WorkerKey, int]


@dataclass(frozen=True, slots=True)
class EventGap:
    """Events ``first..last`` (inclusive) of ``worker_id`` never arrived."""

    worker_id: int
    first: int
    last: int


@dataclass(slots=True)
class IndexerStats:
    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    duplicate_events: int = 0
    gaps: int = 0
    # A store whose parent block this slot does not hold: the engine and the index disagree.
    orphaned_blocks: int = 0
    # A removal of a block hash the slot never stored (or already removed).
    unknown_removals: int = 0
    snapshots_loaded: int = 0


@dataclass(slots=True)
class _WorkerLog:
    last_event_id: int | None = None
    # Events received while a gap is open, applied in order once it closes.
    pending: list[RouterEvent] | None = None
    open_gap: EventGap | None = None


class KvIndexer(RunTrie):
    """Radix tree of which (worker, dp_rank) holds which KV blocks."""

    def __init__(self) -> None:
        super().__init__()
        # Per node id; bumped when a freed id is reused, so a stale lookup ref can never
        # address the node's next user (while the id is free, its parent -1 says so).
        self._gen: list[int] = [0]
        # Every split of a node, ascending by offset: (offset, tail id, tail generation). A ref
        # past the node's end follows the split at the largest offset <= its own.
        self._fwd: list[list[tuple[int, int, int]] | None] = [None]
        # Per slot: engine block hash -> ref (node | generation << 32 | offset << 64).
        self._lookup: list[dict[int, int]] = []
        self._tree_sizes: dict[WorkerKey, int] = {}
        # The same sizes by slot, for vector tie-breaks; longer than any mask's byte width and
        # zero past the live slots, so a "no slot" index (capacity rounded up to bytes) reads 0.
        self.slot_sizes = np.zeros(17, dtype=np.int64)
        self._logs: dict[int, _WorkerLog] = {}
        self._blocks = 0  # distinct blocks in live nodes
        self.stats = IndexerStats()

    # ------------------------------------------------------------------ queries (hot path)

    def find_matches(
        self, local_hashes: Sequence[int], early_exit: bool = False, frequencies: bool = True
    ) -> OverlapScores:
        """Matched prefix length per slot for a request's canonical local block hashes.

        ``early_exit`` stops as soon as at most one slot is left; that slot's score is then the
        depth reached so far (a lower bound), which is all a caller needs to pick a worker.
        """
        levels = self._walk(local_hashes, early_exit)
        freqs: list[int] = []
        if frequencies:
            # Block i is held by every slot whose match goes deeper than i.
            held = sum(slots.bit_count() for slots, _ in levels)
            done = 0
            for slots, depth in levels:
                freqs.extend([held] * (depth - done))
                held -= slots.bit_count()
                done = depth
        return OverlapScores(self._keyed(levels), freqs, dict(self._tree_sizes))

    # The routing hot path: ``[(slot mask, depth)]``, the slots whose match ends at each depth.
    match_levels = RunTrie._walk

    def tree_sizes(self) -> dict[WorkerKey, int]:
        return dict(self._tree_sizes)

    def tree_size(self, key: WorkerKey) -> int:
        return self._tree_sizes.get(key, 0)

    @property
    def num_blocks(self) -> int:
        """Distinct blocks currently indexed."""
        return self._blocks

    @property
    def num_nodes(self) -> int:
        """Tree nodes (runs of blocks) currently live, the root excluded."""
        return len(self._mask) - 1 - len(self._free_ids)

    @property
    def num_entries(self) -> int:
        """(slot, block) pairs currently indexed."""
        return sum(self._tree_sizes.values())

    def workers(self) -> list[WorkerKey]:
        return self._slots.keys()

    def last_event_id(self, worker_id: int) -> int | None:
        log = self._logs.get(worker_id)
        return None if log is None else log.last_event_id

    def open_gap(self, worker_id: int) -> EventGap | None:
        log = self._logs.get(worker_id)
        return None if log is None else log.open_gap

    # ------------------------------------------------------------------ events

    def apply_event(self, event: RouterEvent) -> EventGap | None:
        """Apply one worker event in ``event_id`` order; returns the gap if one just opened.

        The first event seen from a worker sets its baseline (the router loads a snapshot of a
        newly discovered worker separately). Events at or below the last applied id are
        duplicates and ignored.
        """
        wid = event.worker_id
        log = self._logs.get(wid)
        if log is None:
            log = self._logs[wid] = _WorkerLog()
        if log.pending is not None:
            log.pending.append(event)
            return None
        eid = event.event.event_id
        last = log.last_event_id
        if last is not None:
            if eid <= last:
                self.stats.duplicate_events += 1
                return None
            if eid > last + 1:
                gap = EventGap(wid, last + 1, eid - 1)
                log.pending = [event]
                log.open_gap = gap
                self.stats.gaps += 1
                logger.warning(
                    "kv event gap from worker %x: expected event %d, got %d", wid, last + 1, eid
                )
                return gap
        self._apply(wid, event.event)
        log.last_event_id = eid
        return None

    def fill_gap(self, worker_id: int, events: Iterable[RouterEvent]) -> EventGap | None:
        """Apply the missing events of an open gap, then the buffered ones.

        Returns the gap that is still (or newly) open, if any: when ``events`` does not cover the
        whole missing range, the caller should fall back to a snapshot.
        """
        log = self._logs.get(worker_id)
        if log is None or log.pending is None or log.open_gap is None:
            return None  # no gap open (or the worker is waiting for a snapshot instead)
        pending = log.pending
        last = log.last_event_id
        for ev in sorted(events, key=lambda e: e.event.event_id):
            if ev.worker_id != worker_id:
                raise ValueError(f"event of worker {ev.worker_id:x} given to fill a gap of {worker_id:x}")
            eid = ev.event.event_id
            if last is not None and eid <= last:
                continue
            if last is not None and eid != last + 1:
                break
            self._apply(worker_id, ev.event)
            last = eid
        log.last_event_id = last
        gap = log.open_gap
        if last is None or last < gap.last:
            remaining = EventGap(worker_id, (last + 1) if last is not None else gap.first, gap.last)
            log.open_gap = remaining
            return remaining
        return self._drain(log, pending)

    def hold_events(self, worker_id: int) -> None:
        """Buffer the worker's events until ``load_worker_snapshot`` (its snapshot is in flight)."""
        log = self._logs.get(worker_id)
        if log is None:
            log = self._logs[worker_id] = _WorkerLog()
        if log.pending is None:
            log.pending = []

    def load_worker_snapshot(
        self, worker_id: int, events: Iterable[RouterEvent], last_event_id: int | None
    ) -> EventGap | None:
        """Replace everything known about ``worker_id`` with a full dump of its state.

        ``last_event_id`` is the id of the last event the dump includes (None: the worker had
        published nothing); buffered events after it are applied on top. Returns a gap if the
        buffered events themselves have one.
        """
        events = list(events)
        for ev in events:
            if ev.worker_id != worker_id:
                raise ValueError(f"snapshot of worker {worker_id:x} holds an event of {ev.worker_id:x}")
        self._clear_worker(worker_id)
        log = self._logs.get(worker_id)
        if log is None:
            log = self._logs[worker_id] = _WorkerLog()
        for ev in events:
            self._apply(worker_id, ev.event)
        self.stats.snapshots_loaded += 1
        pending = log.pending or []
        # A worker that had published nothing numbers its first event 0 (the publisher's
        # contract), so anything after -1 that is missing is a gap, not a new baseline.
        log.last_event_id = last_event_id if last_event_id is not None else -1
        return self._drain(log, pending)

    def _drain(self, log: _WorkerLog, pending: list[RouterEvent]) -> EventGap | None:
        log.pending = None
        log.open_gap = None
        gap: EventGap | None = None
        for ev in pending:
            g = self.apply_event(ev)
            if g is not None:
                gap = g
        return gap

    def apply_data(self, key: WorkerKey, data: KvStored | KvRemoved | KvCleared) -> None:
        """Apply an event body for one slot without event-id bookkeeping (approximate mode)."""
        self._apply(key[0], KvCacheEvent(event_id=0, data=data, dp_rank=key[1]))

    def remove_worker(self, worker_id: int) -> None:
        """Forget a worker entirely: all its blocks on every dp_rank and its event log."""
        self._clear_worker(worker_id)
        for key in self._slots.keys_of_worker(worker_id):
            slot = self._slots.get(key)
            assert slot is not None
            self._lookup[slot] = {}
            self._slots.release(key)
            self._tree_sizes.pop(key, None)
            self.slot_sizes[slot] = 0
        self._logs.pop(worker_id, None)

    # ------------------------------------------------------------------ dumps

    def dump_worker(self, worker_id: int, event_id: int = 0) -> list[RouterEvent]:
        """The worker's state as ``KvStored`` events (parents before children), one per chain.

        Blocks reachable from the root only through a block this slot no longer holds cannot be
        expressed as stores and are left out; they can never match a request anyway.
        """
        out: list[RouterEvent] = []
        for key in sorted(self._slots.keys_of_worker(worker_id)):
            slot = self._slots.get(key)
            assert slot is not None
            for stored in self._dump_slot(slot):
                out.append(
                    RouterEvent(
                        worker_id=worker_id,
                        event=KvCacheEvent(event_id=event_id, data=stored, dp_rank=key[1]),
                    )
                )
        return out

    def dump_events(self) -> list[RouterEvent]:
        out: list[RouterEvent] = []
        for wid in sorted({k[0] for k in self._slots.keys()}):
            out.extend(self.dump_worker(wid, self.last_event_id(wid) or 0))
        return out

    def _dump_slot(self, slot: int) -> list[KvStored]:
        bit = 1 << slot
        kids, mask, runs = self._kids, self._mask, self._run
        engine_hash: dict[tuple[int, int], int] = {}
        for h, ref in self._lookup[slot].items():
            pos = self._resolve(ref)
            if pos is not None and mask[pos[0]] & bit:
                engine_hash[pos] = h
        out: list[KvStored] = []
        # Each stack entry: a held node that starts a chain, and its parent's engine hash.
        stack: list[tuple[int, int | None]] = [(c, None) for c in (kids[_ROOT] or {}).values() if mask[c] & bit]
        while stack:
            nid, parent_hash = stack.pop()
            blocks: list[StoredBlock] = []
            while True:
                run = runs[nid]
                blocks.extend(
                    StoredBlock(block_hash=engine_hash[(nid, off)], tokens_hash=h) for off, h in enumerate(run)
                )
                held = [c for c in (kids[nid] or {}).values() if mask[c] & bit]
                if len(held) == 1:
                    nid = held[0]
                    continue
                last = engine_hash[(nid, len(run) - 1)]
                for c in held:
                    stack.append((c, last))
                break
            out.append(KvStored(parent_hash=parent_hash, blocks=blocks))
        return out

    # ------------------------------------------------------------------ mutation internals

    def _slot(self, key: WorkerKey) -> int:
        slot = self._slots.acquire(key)
        while len(self._lookup) <= slot:
            self._lookup.append({})
        if len(self.slot_sizes) <= (slot | 7) + 1:
            grown = np.zeros(2 * ((slot | 7) + 1) + 1, dtype=np.int64)
            grown[: len(self.slot_sizes)] = self.slot_sizes
            self.slot_sizes = grown
        if key not in self._tree_sizes:
            self._tree_sizes[key] = 0
            self.slot_sizes[slot] = 0
        return slot

    def _add_size(self, key: WorkerKey, delta: int) -> None:
        n = self._tree_sizes[key] = self._tree_sizes[key] + delta
        self.slot_sizes[self._slots.get(key)] = n  # type: ignore[index]

    def _apply(self, worker_id: int, event: KvCacheEvent) -> None:
        key = (worker_id, event.dp_rank)
        data = event.data
        self.stats.events_applied += 1
        if isinstance(data, KvStored):
            self._store(key, data)
        elif isinstance(data, KvRemoved):
            self._remove(key, data.block_hashes)
        elif isinstance(data, KvCleared):
            slot = self._slots.get(key)
            if slot is not None:
                self._clear_slot(key, slot)
        else:  # pragma: no cover - the union is closed
            raise TypeError(f"unknown KV event body {type(data).__name__}")

    def _ref(self, nid: int, off: int) -> int:
        return nid | (self._gen[nid] << 32) | (off << 64)

    def _resolve(self, ref: int) -> tuple[int, int] | None:
        """The (node, offset) a lookup ref names now, or None if that block's node is gone."""
        nid = ref & _M32
        off = ref >> 64
        gen, parent, runs = self._gen, self._parent, self._run
        if gen[nid] != (ref >> 32) & _M32 or parent[nid] == -1:
            return None
        while off >= len(runs[nid]):
            splits = self._fwd[nid]
            if splits is None:
                return None
            i = bisect_right(splits, off, key=_offset)
            if not i:
                return None  # the block was evicted from this node's tail
            at, tail, tail_gen = splits[i - 1]
            if gen[tail] != tail_gen or parent[tail] == -1:
                return None
            off -= at
            nid = tail
        return nid, off

    def _new_node(self, parent: int, run: list[int], mask: int) -> int:
        nid = RunTrie._new_node(self, parent, run, mask)
        if nid < len(self._gen):
            # A reused id: a new generation, so a lookup ref to its last user never resolves here.
            self._gen[nid] = (self._gen[nid] + 1) & _M32
            self._fwd[nid] = None
        else:
            self._gen.append(0)
            self._fwd.append(None)
        self._blocks += len(run)
        return nid

    def _split(self, nid: int, at: int) -> int:
        """Cut ``nid``'s run after ``at`` blocks (0 < at < len); returns the new tail node."""
        tail = self._cut(nid, at)
        self._blocks -= len(self._run[tail])  # the same blocks, now in two nodes
        # Later splits are at smaller offsets (the run only shrinks): keep the list ascending.
        split = (at, tail, self._gen[tail])
        splits = self._fwd[nid]
        if splits is None:
            self._fwd[nid] = [split]
        else:
            splits.insert(0, split)
        return tail

    def _store(self, key: WorkerKey, data: KvStored) -> None:
        slot = self._slot(key)
        bit = 1 << slot
        lookup = self._lookup[slot]
        kids, runs, mask = self._kids, self._run, self._mask
        if data.parent_hash is None:
            node, off = _ROOT, -1
        else:
            ref = lookup.get(data.parent_hash)
            pos = None if ref is None else self._resolve(ref)
            if pos is None or not mask[pos[0]] & bit:
                self.stats.orphaned_blocks += len(data.blocks)
                logger.warning(
                    "worker %x dp_rank %d stored %d blocks under unknown parent %x; dropped",
                    key[0],
                    key[1],
                    len(data.blocks),
                    data.parent_hash,
                )
                return
            node, off = pos
        hashes = [b.tokens_hash for b in data.blocks]
        engine = [b.block_hash for b in data.blocks]
        n = len(hashes)
        added = 0
        stale: list[tuple[int, int]] = []
        i = 0
        while i < n:
            run = runs[node]
            if off == len(run) - 1:  # at the end of a run: continue into a child
                children = kids[node]
                child = None if children is None else children.get(hashes[i])
                if child is None:
                    target = self._new_node(node, hashes[i:], bit)
                    start, k = 0, n - i
                    added += k
                else:
                    node, off = child, -1
                    continue
            else:
                rest = run[off + 1 :]
                k = common_prefix(hashes[i : i + len(rest)], rest)
                if k == 0:  # the new blocks branch off right after ``off``
                    self._split(node, off + 1)
                    continue
                target, start = node, off + 1
                if not mask[target] & bit:
                    # Give this slot's blocks a node of their own so masks stay uniform.
                    if start:
                        target, start = self._split(target, start), 0
                    if k < len(runs[target]):
                        self._split(target, k)
                    mask[target] |= bit
                    added += k
            gen = self._gen[target]
            for j in range(k):
                eh = engine[i + j]
                old = lookup.get(eh)
                lookup[eh] = target | (gen << 32) | ((start + j) << 64)
                if old is not None:
                    stale.append((eh, old))
            i += k
            node, off = target, start + k - 1
        self._add_size(key, added)
        self.stats.blocks_stored += added
        for eh, old in stale:
            # Re-storing a block is a no-op; an engine hash that now names a *different* block
            # means the block it named before is gone.
            pos = self._resolve(old)
            if pos is None or not mask[pos[0]] & bit or pos == self._resolve(lookup[eh]):
                continue
            self._remove_block(bit, *pos)
            self._add_size(key, -1)

    def _remove(self, key: WorkerKey, block_hashes: Iterable[int]) -> None:
        slot = self._slots.get(key)
        if slot is None:
            self.stats.unknown_removals += sum(1 for _ in block_hashes)
            return
        bit = 1 << slot
        lookup = self._lookup[slot]
        mask, runs, kids = self._mask, self._run, self._kids
        removed = 0
        for h in block_hashes:
            ref = lookup.pop(h, None)
            pos = None if ref is None else self._resolve(ref)
            if pos is None or not mask[pos[0]] & bit:
                self.stats.unknown_removals += 1
                continue
            removed += 1
            nid, off = pos
            run = runs[nid]
            if mask[nid] == bit and kids[nid] is None and off == len(run) - 1 and off:
                # The common eviction: this slot alone drops the leaf block of its own tail.
                run.pop()
                self._blocks -= 1
                continue
            self._remove_block(bit, nid, off)
        self._add_size(key, -removed)
        self.stats.blocks_removed += removed

    def _remove_block(self, bit: int, nid: int, off: int) -> None:
        """Take one block away from the slot ``bit``: isolate it in its own node, clear the bit."""
        if off:
            nid = self._split(nid, off)
        if len(self._run[nid]) > 1:
            self._split(nid, 1)
        self._mask[nid] &= ~bit
        if not self._mask[nid] and self._kids[nid] is None:
            self._blocks -= self._prune(nid)

    def _clear_slot(self, key: WorkerKey, slot: int) -> None:
        bit = 1 << slot
        lookup = self._lookup[slot]
        kids, mask = self._kids, self._mask
        nodes: set[int] = set()
        for ref in lookup.values():
            pos = self._resolve(ref)
            if pos is not None and mask[pos[0]] & bit:
                nodes.add(pos[0])
        lookup.clear()
        # Masks are uniform over runs, so a held node is held whole.
        removed = sum(len(self._run[nid]) for nid in nodes)
        for nid in nodes:
            mask[nid] &= ~bit
        for nid in nodes:
            if self._parent[nid] != -1 and not mask[nid] and kids[nid] is None:
                self._blocks -= self._prune(nid)
        self._add_size(key, -removed)
        self.stats.blocks_removed += removed

    def _clear_worker(self, worker_id: int) -> None:
        for key in self._slots.keys_of_worker(worker_id):
            slot = self._slots.get(key)
            assert slot is not None
            self._clear_slot(key, slot)


__all__ = ["EventGap", "IndexerStats", "KvIndexer", "OverlapScores", "WorkerKey", "iter_bits"]
