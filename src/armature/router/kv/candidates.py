"""The routing candidates as arrays, so one decision costs a few vector operations, not a loop per worker.

A decision needs every candidate's logit::

    logit_k = base_k - weight * overlap_k - already_active_k + (weight * isl / block_size + request_blocks)

``base_k = weight / block_size * active_prefill_k + active_blocks_k`` changes only when that
worker's load changes, so it is kept here, one float per candidate, updated in place. The
indexer and the active-sequence trie report overlaps as a few ``(slot mask, depth)`` levels in
their own slot numbering; ``spread`` turns those into one value per candidate with a cached
slot -> candidate map (rebuilt only when a slot table changes). With 64 workers this replaces
some 150 Python-level dict operations per decision with about ten array operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from armature.router.kv.slots import WorkerKey


class SlotSource(Protocol):
    """What ``spread`` needs of the indexer or the active-sequence trie."""

    @property
    def slots_version(self) -> int: ...

    @property
    def slot_capacity(self) -> int: ...

    def slot_of(self, key: WorkerKey) -> int | None: ...


class _SlotMap:
    """Candidate position -> slot of one source; candidates without a slot read a zero cell."""

    __slots__ = ("version", "nbytes", "index")

    def __init__(self) -> None:
        self.version = -1
        self.nbytes = 0
        self.index = np.zeros(0, dtype=np.intp)

    def refresh(self, source: SlotSource, keys: Sequence[WorkerKey]) -> None:
        self.nbytes = (source.slot_capacity + 7) // 8
        zero_cell = self.nbytes * 8
        self.index = np.fromiter(
            ((zero_cell if (s := source.slot_of(k)) is None else s) for k in keys), dtype=np.intp, count=len(keys)
        )
        self.version = source.slots_version


class CandidateTable:
    """Candidate keys in a fixed order, their base loads, and per-decision vectors over them."""

    def __init__(self) -> None:
        self.keys: list[WorkerKey] = []
        self.position: dict[WorkerKey, int] = {}
        self.base = np.zeros(0)
        self._maps: dict[int, _SlotMap] = {}

    def reset(self, keys: Sequence[WorkerKey], base_of: Callable[[WorkerKey], float]) -> None:
        self.keys = list(keys)
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.base = np.fromiter((base_of(k) for k in self.keys), dtype=np.float64, count=len(self.keys))
        self._maps.clear()

    def set_base(self, key: WorkerKey, value: float) -> None:
        i = self.position.get(key)
        if i is not None:
            self.base[i] = value

    def _map(self, source: SlotSource) -> _SlotMap:
        m = self._maps.get(id(source))
        if m is None:
            m = self._maps[id(source)] = _SlotMap()
        if m.version != source.slots_version:
            m.refresh(source, self.keys)
        return m

    def gather(self, by_slot: np.ndarray, source: SlotSource, positions: np.ndarray) -> np.ndarray:
        """``by_slot`` (indexed by ``source``'s slots, 0 past them) at candidate ``positions``."""
        return by_slot[self._map(source).index[positions]]

    def spread(self, levels: list[tuple[int, int]], source: SlotSource) -> np.ndarray:
        """Per candidate, the depth of the level whose mask holds its slot (0 if none)."""
        m = self._map(source)
        nbytes = m.nbytes
        per_slot = np.zeros(nbytes * 8 + 1)
        cells = per_slot[:-1]
        for mask, depth in levels:
            bits = np.unpackbits(np.frombuffer(mask.to_bytes(nbytes, "little"), dtype=np.uint8), bitorder="little")
            cells[bits.view(np.bool_)] = depth
        return per_slot[m.index]
