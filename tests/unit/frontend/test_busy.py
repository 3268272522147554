"""Busy detection's rules (Dynamo's): a rank is busy past any threshold, a worker when all its
ranks are; reports older than three heartbeats do not count."""

from __future__ import annotations

from armature.frontend.busy import STALE_S, BusyThresholds, LoadBoard
from armature.protocols.load import ActiveLoad


def load(worker: int, rank: int = 0, decode: int = 0, prefill: int = 0, total: int = 100) -> ActiveLoad:
    return ActiveLoad(worker_id=worker, dp_rank=rank, active_decode_blocks=decode, active_prefill_tokens=prefill,
                      kv_total_blocks=total)  # fmt: skip


def no_limit(worker: int) -> int | None:
    return None


def test_each_threshold_alone_makes_a_rank_busy() -> None:
    assert not BusyThresholds().enabled
    decode = BusyThresholds(active_decode_blocks=0.5)
    assert decode.rank_busy(load(1, decode=51), None) and not decode.rank_busy(load(1, decode=50), None)
    assert not decode.rank_busy(load(1, decode=51, total=0), None)  # no KV size known: never busy
    absolute = BusyThresholds(active_prefill_tokens=1000)
    assert absolute.rank_busy(load(1, prefill=1001), None) and not absolute.rank_busy(
        load(1, prefill=1000), None
    )
    frac = BusyThresholds(active_prefill_tokens_frac=1.5)
    assert frac.rank_busy(load(1, prefill=3001), 2000) and not frac.rank_busy(load(1, prefill=3000), 2000)
    assert not frac.rank_busy(load(1, prefill=10**6), None)  # no batch size known: this rule is off


def test_a_worker_is_busy_only_when_all_its_ranks_are() -> None:
    board = LoadBoard()
    t = BusyThresholds(active_decode_blocks=0.5)
    board.update(load(1, rank=0, decode=90), now=0.0)
    board.update(load(1, rank=1, decode=10), now=0.0)
    board.update(load(2, decode=90), now=0.0)
    assert board.busy_workers(t, no_limit, now=1.0) == {2}
    board.update(load(1, rank=1, decode=95), now=1.0)
    assert board.busy_workers(t, no_limit, now=1.0) == {1, 2}
    # Lowering the load (a newer report) frees it; so does a thresholds change.
    board.update(load(2, decode=5), now=2.0)
    assert board.busy_workers(t, no_limit, now=2.0) == {1}
    assert board.busy_workers(BusyThresholds(active_decode_blocks=1.0), no_limit, now=2.0) == set()


def test_silent_workers_stop_counting_as_busy() -> None:
    board = LoadBoard()
    t = BusyThresholds(active_prefill_tokens=10)
    board.update(load(7, prefill=500), now=100.0)
    assert board.busy_workers(t, no_limit, now=100.0 + STALE_S) == {7}
    assert board.busy_workers(t, no_limit, now=100.0 + STALE_S + 0.1) == set()
