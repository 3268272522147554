"""The radix cache against a brute-force model: a dict from page-prefixes to pages."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from armature.engine.radix_cache import NoPrefixCache, RadixCache
from armature.protocols.hashing import compute_sequence_block_hashes
from armature.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

PAGE = 2
TOTAL = 24
tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=9)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.free = list(range(TOTAL))
        self.events: list = []
        self.cache = RadixCache(PAGE, self.free.extend, self.events.append)
        # The model: page-prefix (tuple of page keys) -> [page, last_access]; locks per prefix.
        self.entries: dict[tuple, list[int]] = {}
        self.locks: dict[tuple, int] = {}
        self.held: list[tuple[tuple, object]] = []
        self.clock = 0
        # Block hash -> page prefix, rebuilt from the events alone.
        self.hash_view: dict[int, tuple] = {}

    @staticmethod
    def keys(tokens: list[int]) -> list[tuple]:
        return [tuple(tokens[i * PAGE : (i + 1) * PAGE]) for i in range(len(tokens) // PAGE)]

    def model_match(self, tokens: list[int]) -> list[tuple]:
        path: list[tuple] = []
        for k in self.keys(tokens):
            if tuple(path + [k]) not in self.entries:
                break
            path.append(k)
        return path

    @rule(tokens=tokens_st)
    def match(self, tokens: list[int]) -> None:
        got = self.cache.match_prefix(tokens)
        self.clock += 1
        path = self.model_match(tokens)
        want = [self.entries[tuple(path[: i + 1])][0] for i in range(len(path))]
        assert got.pages == want
        for i in range(len(path)):
            self.entries[tuple(path[: i + 1])][1] = self.clock

    @rule(tokens=tokens_st, reuse=st.booleans())
    def insert(self, tokens: list[int], reuse: bool) -> None:
        keys = self.keys(tokens)
        matched = self.cache.match_prefix(tokens).pages if reuse else []
        self.clock += 1
        if reuse:
            for i in range(len(matched)):
                self.entries[tuple(keys[: i + 1])][1] = self.clock
        need = len(keys) - len(matched)
        if need > len(self.free):
            return
        fresh = [self.free.pop() for _ in range(need)]
        pages = matched + fresh
        res = self.cache.insert(tokens, pages)
        self.clock += 1
        self.free.extend(res.duplicates)
        want: list[int] = []
        for i, k in enumerate(keys):
            p = tuple(keys[: i + 1])
            if p not in self.entries:
                self.entries[p] = [pages[i], self.clock]
            self.entries[p][1] = self.clock
            want.append(self.entries[p][0])
        assert res.pages == want
        assert sorted(res.duplicates + [p for p in fresh if p in want]) == sorted(fresh)

    @rule(tokens=tokens_st)
    def lock(self, tokens: list[int]) -> None:
        m = self.cache.match_prefix(tokens)
        self.clock += 1
        path = self.model_match(tokens)
        for i in range(len(path)):
            self.entries[tuple(path[: i + 1])][1] = self.clock
        self.cache.lock(m.node)
        for i in range(len(path)):
            p = tuple(path[: i + 1])
            self.locks[p] = self.locks.get(p, 0) + 1
        self.held.append((tuple(path), m.node))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        path, node = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.unlock(node)  # type: ignore[arg-type]
        for i in range(len(path)):
            p = tuple(path[: i + 1])
            self.locks[p] -= 1

    @rule(n=st.integers(0, 10))
    def evict(self, n: int) -> None:
        before = len(self.free)
        freed_n = self.cache.evict(n)
        freed = set(self.free[before:])
        want: set[int] = set()
        for _ in range(n):
            leaves = [
                p
                for p in self.entries
                if not self.locks.get(p, 0) and not any(q[: len(p)] == p and q != p for q in self.entries)
            ]
            if not leaves:
                break
            victim = min(leaves, key=lambda p: self.entries[p][1])
            want.add(self.entries.pop(victim)[0])
        assert freed_n == len(want)
        assert freed == want

    @precondition(lambda self: not self.held)
    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.entries.clear()

    @invariant()
    def accounting(self) -> None:
        assert len(self.free) + self.cache.total_pages == TOTAL
        assert len(set(self.free)) == len(self.free)
        assert self.cache.total_pages == len(self.entries)
        protected = sum(1 for p in self.entries if self.locks.get(p, 0) > 0)
        assert self.cache.protected_pages == protected
        assert self.cache.evictable_pages == len(self.entries) - protected

    @invariant()
    def events_describe_the_cache(self) -> None:
        for ev in self.events:
            if isinstance(ev, BlockStored):
                assert ev.block_size == PAGE
                for h in ev.block_hashes:
                    assert h not in self.hash_view
                # The parent is either the root (None) or a block that is still stored.
                assert ev.parent_block_hash is None or ev.parent_block_hash in self.hash_view
                for h in ev.block_hashes:
                    self.hash_view[h] = ()
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    del self.hash_view[h]
            elif isinstance(ev, AllBlocksCleared):
                self.hash_view.clear()
        self.events.clear()
        # Every cached prefix is known under its shared sequence hash.
        want = {
            compute_sequence_block_hashes([t for k in p for t in k], PAGE)[-1] for p in self.entries
        }
        assert set(self.hash_view) == want


TestRadixCacheModel = CacheMachine.TestCase
TestRadixCacheModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class RebuildingCacheMachine(CacheMachine):
    """The same, with the eviction queue rebuilt as soon as it outgrows twice the node count."""

    def __init__(self) -> None:
        super().__init__()
        self.cache.lru_slack = 0


TestRadixCacheModelRebuilding = RebuildingCacheMachine.TestCase
TestRadixCacheModelRebuilding.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_eviction_in_a_full_cache_follows_lru_order_after_many_touches() -> None:
    freed: list[int] = []
    cache = RadixCache(1, freed.extend)
    for page in range(300):  # 300 one-page leaves under the root
        cache.insert([page], [page])
    order = list(range(300))
    for i in range(5000):  # far more touches than the queue keeps before a rebuild
        page = (i * 7919) % 300
        cache.match_prefix([page])
        order.remove(page)
        order.append(page)
    for want in order[:250]:
        assert cache.evict(1) == 1
        assert freed[-1] == want
    assert cache.total_pages == 50


def test_stored_event_chains_from_the_cached_parent() -> None:
    free: list[int] = []
    events: list = []
    cache = RadixCache(4, free.extend, events.append)
    tokens = list(range(12))
    cache.insert(tokens[:4], [7])
    res = cache.insert(tokens + [99], [7, 8, 9])
    assert res.pages == [7, 8, 9] and res.duplicates == []
    first, second = events
    hashes = compute_sequence_block_hashes(tokens, 4)
    assert first.block_hashes == hashes[:1] and first.parent_block_hash is None
    assert second.block_hashes == hashes[1:] and second.parent_block_hash == hashes[0]
    assert second.token_ids == tokens[4:]


def test_partial_page_is_not_cached_and_match_is_page_aligned() -> None:
    free: list[int] = []
    cache = RadixCache(4, free.extend)
    cache.insert(list(range(10)), [1, 2, 3])
    assert cache.total_pages == 2
    m = cache.match_prefix(list(range(7)))
    assert m.pages == [1] and m.num_pages == 1


def test_locked_path_survives_eviction_and_reset_refuses() -> None:
    free: list[int] = []
    cache = RadixCache(2, free.extend)
    cache.insert([1, 2, 3, 4], [0, 1])
    cache.insert([5, 6], [2])
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    assert cache.evict(10) == 1 and free == [2]
    assert cache.protected_pages == 2
    try:
        cache.reset()
    except RuntimeError as exc:
        assert "in use" in str(exc)
    else:
        raise AssertionError("reset of a locked cache must fail")
    cache.unlock(m.node)
    assert cache.reset() == 2 and sorted(free) == [0, 1, 2]


def test_disabled_cache_never_matches() -> None:
    cache = NoPrefixCache(2, lambda pages: None)
    assert not cache.enabled
    assert cache.match_prefix([1, 2, 3, 4]).pages == []
