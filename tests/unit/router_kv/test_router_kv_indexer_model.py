"""The radix indexer against a brute-force model, under random store/remove/clear/leave events."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from armature.protocols.kv_events import KvCacheEvent, KvCleared, KvRemoved, KvStored, RouterEvent, StoredBlock
from armature.router.kv.indexer import KvIndexer

Key = tuple[int, int]
Path = tuple[int, ...]
WORKERS = (1, 2, 3)
TOKENS = st.integers(0, 3)  # a tiny alphabet so workers share and diverge often


def engine_hash(key: Key, path: Path) -> int:
    # Engines name a block by its whole prefix (like SGLang's chained page hash).
    return hash((key, path)) & ((1 << 63) - 1)


class Model:
    """Per (worker, dp_rank): engine hash -> the path of local hashes it names."""

    def __init__(self) -> None:
        self.held: dict[Key, dict[int, Path]] = {}

    def store(self, key: Key, parent: int | None, blocks: list[tuple[int, int]]) -> None:
        held = self.held.setdefault(key, {})
        if parent is None:
            path: Path = ()
        elif parent in held:
            path = held[parent]
        else:
            return  # unknown parent: the event is dropped
        for block_hash, tokens_hash in blocks:
            path = path + (tokens_hash,)
            held[block_hash] = path

    def remove(self, key: Key, hashes: list[int]) -> None:
        for h in hashes:
            self.held.get(key, {}).pop(h, None)

    def clear(self, key: Key) -> None:
        if key in self.held:
            self.held[key] = {}

    def leave(self, worker: int) -> None:
        for key in [k for k in self.held if k[0] == worker]:
            del self.held[key]

    def scores(self, query: list[int]) -> dict[Key, int]:
        out: dict[Key, int] = {}
        for key, held in self.held.items():
            paths = set(held.values())
            depth = 0
            while depth < len(query) and tuple(query[: depth + 1]) in paths:
                depth += 1
            if depth:
                out[key] = depth
        return out

    def sizes(self) -> dict[Key, int]:
        return {k: len(set(v.values())) for k, v in self.held.items() if v}

    def reachable_sizes(self) -> dict[Key, int]:
        """Blocks whose every prefix the slot also holds (what a dump can express)."""
        out: dict[Key, int] = {}
        for k, v in self.held.items():
            paths = set(v.values())
            n = sum(1 for p in paths if all(p[:i] in paths for i in range(1, len(p))))
            if n:
                out[k] = n
        return out


op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(WORKERS), st.integers(0, 1), st.integers(0, 9),
              st.lists(TOKENS, min_size=1, max_size=4)),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), st.integers(0, 1), st.integers(0, 9),
              st.integers(1, 3)),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS), st.integers(0, 1)),
    st.tuples(st.just("leave"), st.sampled_from(WORKERS)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=60), queries=st.lists(st.lists(TOKENS, max_size=6), min_size=1, max_size=8))
def test_find_matches_agrees_with_brute_force(ops: list[tuple], queries: list[list[int]]) -> None:
    index = KvIndexer()
    model = Model()
    next_id = dict.fromkeys(WORKERS, 0)

    def send(worker: int, dp: int, data: KvStored | KvRemoved | KvCleared) -> None:
        ev = RouterEvent(worker_id=worker, event=KvCacheEvent(event_id=next_id[worker], data=data, dp_rank=dp))
        next_id[worker] += 1
        assert index.apply_event(ev) is None

    for o in ops:
        kind, worker = o[0], o[1]
        if kind == "leave":
            index.remove_worker(worker)
            model.leave(worker)
            next_id[worker] = 0  # a new incarnation starts its own numbering
            continue
        key = (worker, o[2])
        held = sorted(model.held.get(key, {}).items())
        if kind == "store":
            pick, toks = o[3], o[4]
            if held and pick < 7:
                parent_hash, parent_path = held[pick % len(held)]
            elif pick == 9:
                parent_hash, parent_path = 12345, (9,)  # not held: the store is an orphan
            else:
                parent_hash, parent_path = None, ()
            blocks = []
            path = parent_path
            for t in toks:
                path = path + (t,)
                blocks.append((engine_hash(key, path), t))
            send(worker, o[2], KvStored(parent_hash=parent_hash,
                                        blocks=[StoredBlock(block_hash=b, tokens_hash=t) for b, t in blocks]))
            model.store(key, parent_hash, blocks)
        elif kind == "remove":
            # Any held blocks, leaves or not, plus one hash the worker never stored.
            victims = [h for h, _ in held[o[3] % max(len(held), 1):][: o[4]]] + [999]
            send(worker, o[2], KvRemoved(block_hashes=victims))
            model.remove(key, victims)
        else:
            send(worker, o[2], KvCleared())
            model.clear(key)

    assert {k: v for k, v in index.tree_sizes().items() if v} == model.sizes()
    assert index.num_entries == sum(model.sizes().values())
    for q in queries:
        got = index.find_matches(q)
        want = model.scores(q)
        assert got.scores == want
        assert index.find_matches(q, frequencies=False).scores == want  # the routing fast path
        depth = max(want.values(), default=0)
        assert got.frequencies == [sum(1 for s in want.values() if s > i) for i in range(depth)]
        early = index.find_matches(q, early_exit=True)
        assert all(0 < early.scores[k] <= want[k] for k in early.scores)
        if want:
            assert set(early.scores) <= set(want)

    # A worker's dump, loaded elsewhere, reproduces every block a request can reach.
    copy = KvIndexer()
    for worker in WORKERS:
        copy.load_worker_snapshot(worker, index.dump_worker(worker), None)
    assert {k: v for k, v in copy.tree_sizes().items() if v} == model.reachable_sizes()
    for q in queries:
        assert copy.find_matches(q).scores == model.scores(q)


def test_an_engine_hash_reused_for_another_block_replaces_it() -> None:
    index = KvIndexer()
    key = (1, 0)
    index.apply_data(key, KvStored(parent_hash=None, blocks=[
        StoredBlock(block_hash=h, tokens_hash=t) for h, t in ((11, 1), (12, 2), (13, 3))]))
    index.apply_data(key, KvStored(parent_hash=None, blocks=[StoredBlock(block_hash=12, tokens_hash=9)]))
    assert index.tree_size(key) == 3  # 1, 3 (its parent is gone) and 9
    assert index.find_matches([1, 2, 3]).scores == {key: 1}
    assert index.find_matches([9]).scores == {key: 1}
    # Storing the same blocks again changes nothing.
    index.apply_data(key, KvStored(parent_hash=None, blocks=[StoredBlock(block_hash=11, tokens_hash=1)]))
    assert index.tree_size(key) == 3 and index.num_blocks == 4


def test_runs_split_and_resolve_after_other_workers_share_part_of_them() -> None:
    index = KvIndexer()
    long = [StoredBlock(block_hash=100 + i, tokens_hash=i) for i in range(50)]
    index.apply_data((1, 0), KvStored(parent_hash=None, blocks=long))
    assert index.num_nodes == 1 and index.num_blocks == 50
    index.apply_data((2, 0), KvStored(parent_hash=None, blocks=long[:20]))
    index.apply_data((2, 0), KvStored(parent_hash=119, blocks=[StoredBlock(block_hash=500, tokens_hash=77)]))
    assert index.find_matches(list(range(50))).scores == {(1, 0): 50, (2, 0): 20}
    assert index.find_matches(list(range(20)) + [77]).scores == {(1, 0): 20, (2, 0): 21}
    # Worker 1 evicts its tail leaf first; refs taken before the splits still resolve.
    index.apply_data((1, 0), KvRemoved(block_hashes=[149, 148, 147]))
    assert index.find_matches(list(range(50))).scores == {(1, 0): 47, (2, 0): 20}
    assert index.tree_sizes() == {(1, 0): 47, (2, 0): 21}
    assert index.stats.unknown_removals == 0
