"""Run-compressed prefix trie over canonical local block hashes, keyed by slot bitmasks.

The storage and the query walk that the KV indexer (which worker caches which blocks) and the
active-sequence tracker (which worker has which blocks in flight) share. A path from the root is
a whole prefix, so a node stands for a block exactly like a chained sequence hash does, without
computing one. A node holds a *run* of consecutive block hashes whose holders are the same
slots, and carries the bitmask of those slots (``SlotTable`` numbers the (worker, dp_rank)
pairs), so intersecting worker sets is one ``int & int`` and a run is compared with one C-level
list comparison instead of a Python step per block.

Storage is flat on purpose: a node is an integer id into parallel lists, children are
``{first_local_hash: child_id}`` dicts. Containers holding only ints are invisible to Python's
cyclic garbage collector, so a million-block trie adds almost nothing to collection pauses.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import ne

from armature.router.kv.slots import SlotTable, WorkerKey

ROOT = 0


def common_prefix(segment: list[int], run: list[int]) -> int:
    """Length of the common prefix of two hash lists (C-level: no Python loop per element)."""
    neq = list(map(ne, segment, run))
    try:
        return neq.index(True)
    except ValueError:
        return len(neq)


class RunTrie:
    """Node storage, the slot table and the intersecting walk; subclasses own the mutations."""

    def __init__(self) -> None:
        # Indexed by node id; id 0 is the root (an empty run).
        self._kids: list[dict[int, int] | None] = [None]  # first hash of a child's run -> child
        self._run: list[list[int]] = [[]]  # the node's blocks' local hashes
        self._mask: list[int] = [0]  # bitmask of the slots holding every block of the run
        self._parent: list[int] = [-1]  # -1: free id
        self._free_ids: list[int] = []
        self._slots = SlotTable()

    # ------------------------------------------------------------------ queries (hot path)

    def _walk(self, local_hashes: Sequence[int], early_exit: bool = False) -> list[tuple[int, int]]:
        """``[(slot mask, depth)]``: the slots whose match of ``local_hashes`` ends at each depth.

        Masks are disjoint and depths ascending; slots that match nothing are in no mask. A
        slot's match length is the depth of the level holding its bit (``slot_of`` maps keys
        to bits). No per-slot work: a decision over many workers costs a few levels, not a loop.
        ``early_exit`` stops after the first run that leaves at most one slot; that slot's depth
        is then a lower bound.
        """
        hashes = local_hashes if type(local_hashes) is list else list(local_hashes)
        levels: list[tuple[int, int]] = []
        kids, runs, mask = self._kids, self._run, self._mask
        n = len(hashes)
        nid = ROOT
        depth = 0
        cur = -1
        while depth < n:
            children = kids[nid]
            if children is None:
                break
            child = children.get(hashes[depth])
            if child is None:
                break
            m = mask[child] & cur
            if m != cur:
                if depth:
                    levels.append((cur & ~m, depth))
                if not m:
                    return levels
                cur = m
            run = runs[child]
            size = len(run)
            if size == 1:
                depth += 1
            else:
                segment = hashes[depth : depth + size]
                if segment == run:
                    depth += size
                else:
                    depth += common_prefix(segment, run)
                    break
            if early_exit and not (m & (m - 1)):
                break
            nid = child
        if depth and cur > 0:
            levels.append((cur, depth))
        return levels

    def _keyed(self, levels: list[tuple[int, int]]) -> dict[WorkerKey, int]:
        """``_walk`` levels as ``{(worker_id, dp_rank): depth}``."""
        out: dict[WorkerKey, int] = {}
        key_of = self._slots.key_of
        for slots, depth in levels:
            while slots:
                low = slots & -slots
                out[key_of[low.bit_length() - 1]] = depth  # type: ignore[index]
                slots ^= low
        return out

    def slot_of(self, key: WorkerKey) -> int | None:
        """The bit of ``key`` in level masks (None: it holds nothing here)."""
        return self._slots.get(key)

    @property
    def slots_version(self) -> int:
        """Changes whenever a key gains or loses its slot (cached slot maps are then stale)."""
        return self._slots.version

    @property
    def slot_capacity(self) -> int:
        return self._slots.capacity

    # ------------------------------------------------------------------ structure

    def _new_node(self, parent: int, run: list[int], mask: int) -> int:
        """A node for ``run`` under ``parent`` (a free id if there is one)."""
        if self._free_ids:
            nid = self._free_ids.pop()
            self._kids[nid] = None
            self._run[nid] = run
            self._mask[nid] = mask
            self._parent[nid] = parent
        else:
            nid = len(self._mask)
            self._kids.append(None)
            self._run.append(run)
            self._mask.append(mask)
            self._parent.append(parent)
        children = self._kids[parent]
        if children is None:
            children = self._kids[parent] = {}
        children[run[0]] = nid
        return nid

    def _cut(self, nid: int, at: int) -> int:
        """Cut ``nid``'s run after ``at`` blocks (0 < at < len); returns the tail, its only child.

        The tail inherits the mask and the children. The head's run list is truncated in place:
        evicting a run leaf-first then costs O(1) per block, not O(run).
        """
        run = self._run[nid]
        kids = self._kids[nid]
        self._kids[nid] = None
        tail = self._new_node(nid, run[at:], self._mask[nid])
        del run[at:]
        self._kids[tail] = kids
        if kids:
            parent = self._parent
            for grandchild in kids.values():
                parent[grandchild] = tail
        return tail

    def _prune(self, nid: int) -> int:
        """Free ``nid`` if nobody holds it and it has no children, then its emptied ancestors.

        Returns how many blocks the freed nodes held.
        """
        kids, mask, parent_of, runs = self._kids, self._mask, self._parent, self._run
        freed = 0
        while nid != ROOT and not mask[nid] and kids[nid] is None:
            parent = parent_of[nid]
            siblings = kids[parent]
            assert siblings is not None
            del siblings[runs[nid][0]]
            if not siblings:
                kids[parent] = None
            parent_of[nid] = -1
            freed += len(runs[nid])
            runs[nid] = []
            self._free_ids.append(nid)
            nid = parent
        return freed
