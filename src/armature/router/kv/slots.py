"""Slot table: gives each (worker_id, dp_rank) a small integer so worker sets are bitmasks.

Intersecting two worker sets is then one ``int & int`` on the query path instead of a set
operation that allocates. Released slots are reused so masks stay narrow as workers churn.
"""

from __future__ import annotations

WorkerKey = tuple[int, int]  # (worker_id, dp_rank)


class SlotTable:
    __slots__ = ("_slot_of", "key_of", "_free", "version")

    def __init__(self) -> None:
        # Bumped on every acquire of a new key and every release, so callers can cache slot maps.
        self.version = 0
        self._slot_of: dict[WorkerKey, int] = {}
        # Indexed by slot; None for a free slot. Read directly on hot paths.
        self.key_of: list[WorkerKey | None] = []
        self._free: list[int] = []

    def get(self, key: WorkerKey) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: WorkerKey) -> int:
        slot = self._slot_of.get(key)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
            self.key_of[slot] = key
        else:
            slot = len(self.key_of)
            self.key_of.append(key)
        self._slot_of[key] = slot
        self.version += 1
        return slot

    def release(self, key: WorkerKey) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        self.key_of[slot] = None
        self.version += 1
        # Lowest slots first keeps bitmasks small integers (cheaper & and |).
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def capacity(self) -> int:
        """One more than the highest slot ever handed out (masks never have a higher bit)."""
        return len(self.key_of)

    def keys(self) -> list[WorkerKey]:
        return list(self._slot_of)

    def keys_of_worker(self, worker_id: int) -> list[WorkerKey]:
        return [k for k in self._slot_of if k[0] == worker_id]

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)


def iter_bits(mask: int) -> list[int]:
    """Slot numbers of the set bits of ``mask``."""
    out: list[int] = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out
