"""Approximate mode (--no-router-kv-events): the router predicts caches from what it routed."""

from __future__ import annotations

import random

from router_kv_tools import BS, tokens

from armature.protocols.hashing import compute_local_block_hashes
from armature.router.kv import ApproxKvIndexer, KvRouter, KvRouterConfig


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_routed_prefix_attracts_followers_until_ttl() -> None:
    clock = Clock()
    router = KvRouter(KvRouterConfig(use_kv_events=False, router_ttl_secs=120), block_size=BS,
                      rng=random.Random(0), clock=clock)
    for wid in (1, 2, 3):
        router.register_worker(wid)
    first = router.best_worker(tokens(*"SYSTEMab"), request_id="a")
    router.free("a")
    follow = router.best_worker(tokens(*"SYSTEMcd"))
    assert follow.worker_id == first.worker_id and follow.overlap_blocks == 6
    clock.now += 121
    later = router.best_worker(tokens(*"SYSTEMcd"))
    assert later.overlap_blocks == 0
    assert router.find_matches(tokens(*"SYSTEM")).tree_sizes.get((first.worker_id, 0), 0) == 0


def test_pruning_keeps_the_most_recent_blocks_without_holes() -> None:
    clock = Clock()
    approx = ApproxKvIndexer(ttl_secs=1000, max_tree_size=40, prune_target_ratio=0.5, clock=clock)
    requests = [tokens(*f"{c}{c}{c}{c}{c}{c}{c}{c}"[:8]) for c in "abcdefg"]  # 8 blocks each
    for i, toks in enumerate(requests):
        clock.now += 1
        approx.record((i % 2, 0), compute_local_block_hashes(toks, BS))
    # 56 blocks recorded, more than 40: pruned to 20, the least recently routed first.
    assert len(approx) <= 40
    assert approx.pruned_blocks > 0
    assert approx.index.num_entries == len(approx)
    newest = compute_local_block_hashes(requests[-1], BS)
    assert approx.find_matches(newest).scores == {(0, 0): 8}
    oldest = compute_local_block_hashes(requests[0], BS)
    assert approx.find_matches(oldest).scores == {}
    # Whatever survives is a prefix from the root: every held block is reachable.
    for toks in requests:
        lh = compute_local_block_hashes(toks, BS)
        matched = approx.find_matches(lh).scores
        sizes = approx.index.tree_sizes()
        for key, depth in matched.items():
            assert depth <= sizes[key]


def test_refreshing_a_shared_prefix_keeps_it_over_unrelated_tails() -> None:
    clock = Clock()
    approx = ApproxKvIndexer(ttl_secs=10, clock=clock)
    shared = compute_local_block_hashes(tokens(*"PPPPxy"), BS)
    approx.record((1, 0), shared)
    clock.now += 8
    approx.record((1, 0), compute_local_block_hashes(tokens(*"PPPPzw"), BS))
    clock.now += 5  # the first request's own tail expired; the refreshed prefix did not
    assert approx.find_matches(shared).scores == {(1, 0): 4}
