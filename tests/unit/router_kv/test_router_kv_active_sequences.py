"""Active-sequence load: unique blocks, prefill release, expiry, and a brute-force model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from armature.router.kv.active_sequences import ActiveSequences

BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_prefill_release_free_and_expiry() -> None:
    clock = Clock()
    seqs = ActiveSequences(BS, ttl_secs=300, clock=clock)
    key = (1, 0)
    assert seqs.add_request("a", key, [11, 12, 13], isl=14, overlap_blocks=1) == 10
    load = seqs.load_of(key)
    assert (load.active_blocks, load.active_prefill_tokens, load.num_requests) == (4, 10, 1)
    seqs.mark_prefill_completed("a")
    assert seqs.load_of(key).active_prefill_tokens == 0
    clock.now += 200
    seqs.add_request("b", key, [11, 12], isl=8, overlap_blocks=0)
    assert seqs.load_of(key).active_blocks == 4  # b's two blocks are a's first two
    clock.now += 150  # a is 350 s old, b 150 s
    assert seqs.expire() == 1
    assert "a" not in seqs and "b" in seqs
    assert (seqs.load_of(key).active_blocks, seqs.load_of(key).active_prefill_tokens) == (2, 8)
    assert seqs.free("b") and not seqs.free("b")
    assert seqs.load_of(key).active_blocks == 0


def test_without_kv_reuse_every_request_counts_all_its_blocks() -> None:
    seqs = ActiveSequences(BS, assume_kv_reuse=False)
    seqs.add_request("a", (1, 0), [5, 6], isl=8, overlap_blocks=0)
    seqs.add_request("b", (1, 0), [5, 6], isl=8, overlap_blocks=0)
    assert seqs.load_of((1, 0)).active_blocks == 4
    assert seqs.already_active([5, 6]) == {}


def test_untracked_blocks_count_prefill_only() -> None:
    seqs = ActiveSequences(BS, track_active_blocks=False)
    seqs.add_request("a", (1, 0), [5, 6], isl=8, overlap_blocks=1)
    assert (seqs.load_of((1, 0)).active_blocks, seqs.load_of((1, 0)).active_prefill_tokens) == (0, 4)


def test_remove_worker_drops_its_requests_only() -> None:
    seqs = ActiveSequences(BS)
    seqs.add_request("a", (1, 0), [1, 2], isl=8, overlap_blocks=0)
    seqs.add_request("b", (2, 0), [1, 2], isl=8, overlap_blocks=0)
    assert seqs.remove_worker(1) == 1
    assert "a" not in seqs and "b" in seqs
    assert seqs.already_active([1, 2, 3]) == {(2, 0): 2}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.lists(st.integers(0, 2), max_size=5), st.integers(0, 3)),
        st.tuples(st.just("prefill"), st.integers(0, 40)),
        st.tuples(st.just("free"), st.integers(0, 40)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, query=st.lists(st.integers(0, 2), max_size=5))
def test_loads_agree_with_brute_force(ops: list[tuple], query: list[int]) -> None:
    seqs = ActiveSequences(BS)
    live: dict[str, tuple[tuple[int, int], tuple[int, ...], int, int, bool]] = {}
    n = 0
    for op in ops:
        if op[0] == "add":
            _, worker, hashes, tail = op
            rid = f"r{n}"
            n += 1
            isl = len(hashes) * BS + tail
            prefill = seqs.add_request(rid, (worker, 0), hashes, isl, overlap_blocks=min(1, len(hashes)))
            live[rid] = ((worker, 0), tuple(hashes), 1 if tail else 0, prefill, False)
        elif live:
            rid = sorted(live)[op[1] % len(live)]
            if op[0] == "prefill":
                assert seqs.mark_prefill_completed(rid)
                k, h, t, p, _ = live[rid]
                live[rid] = (k, h, t, p, True)
            else:
                assert seqs.free(rid)
                del live[rid]
    for key in {(w, 0) for w in range(4)}:
        mine = [v for v in live.values() if v[0] == key]
        # A block is a whole prefix; requests sharing one share its KV page.
        unique = {h[: i + 1] for _, h, _, _, _ in mine for i in range(len(h))}
        want_blocks = len(unique) + sum(t for _, _, t, _, _ in mine)
        want_prefill = sum(p for _, _, _, p, done in mine if not done)
        load = seqs.load_of(key)
        assert (load.active_blocks, load.active_prefill_tokens, load.num_requests) == (
            want_blocks, want_prefill, len(mine))
        depth = 0
        prefixes = {h[: i + 1] for _, h, _, _, _ in mine for i in range(len(h))}
        while depth < len(query) and tuple(query[: depth + 1]) in prefixes:
            depth += 1
        assert seqs.already_active(query).get(key, 0) == depth
