"""Bar 4: page accounting of the scheduler under any mix of finishing, aborting and retraction.

The scheduler runs over the mocker's simulated executor (no delays): the scheduling, the radix
cache and the page ownership are the real ones; only the forward pass is simulated. With the
overlap schedule, tokens are handed over one step late, as on a GPU.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from armature.engine.api import EngineFinishReason, GenerateRequest, SamplingParams
from armature.engine.scheduler import ReqStatus, ScheduledBatch, Scheduler, SchedulerConfig, SeqResult
from armature.mocker.runner import SimulatedExecutor

PAGE = 4
PAGES = 24


class DeferredSimulatedExecutor(SimulatedExecutor):
    """The simulated forward with the overlap schedule's hand-over: a batch is launched, and its
    tokens are collected only after the next batch has been scheduled and launched."""

    def can_overlap(self, batch: ScheduledBatch) -> bool:
        return True

    def launch(self, batch: ScheduledBatch) -> list[SeqResult]:
        return self.execute(batch)

    def collect(self, launched: list[SeqResult]) -> list[SeqResult]:
        return launched


def make_scheduler(disable_cache: bool = False, mixed: bool = False, overlap: bool = False) -> Scheduler:
    cls = DeferredSimulatedExecutor if overlap else SimulatedExecutor
    ex = cls(num_pages=PAGES, page_size=PAGE, vocab_size=50, speedup_ratio=0.0, seed=1)
    cfg = SchedulerConfig(
        page_size=PAGE,
        context_length=64,
        vocab_size=50,
        eos_token_ids=[0],
        max_running_requests=6,
        max_prefill_tokens=16,
        chunked_prefill_size=8,
        enable_mixed_chunk=mixed,
        disable_radix_cache=disable_cache,
        stream_interval=2,
        overlap_schedule=overlap,
    )
    return Scheduler(cfg, ex)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.configured = False
        self.counter = 0
        self.streamed: dict[str, list[int]] = {}
        self.finished: dict[str, object] = {}
        self.asked: dict[str, int] = {}

    @precondition(lambda self: not self.configured)
    @rule(disable=st.booleans(), mixed=st.booleans(), overlap=st.booleans())
    def configure(self, disable: bool, mixed: bool, overlap: bool) -> None:
        self.s = make_scheduler(disable, mixed, overlap)
        self.configured = True

    def _take(self, outs: list) -> None:
        for o in outs:
            assert o.rid not in self.finished, "output after the final one"
            self.streamed.setdefault(o.rid, []).extend(o.token_ids)
            if o.finished:
                self.finished[o.rid] = o

    @precondition(lambda self: self.configured)
    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
          tail=st.lists(st.integers(1, 49), min_size=1, max_size=20), new=st.integers(0, 24))
    def add(self, prefix: list[int], tail: list[int], new: int) -> None:
        rid = f"r{self.counter}"
        self.counter += 1
        self.s.add_request(GenerateRequest(rid, prefix + tail, SamplingParams(max_new_tokens=new, seed=self.counter)))
        self.asked[rid] = new

    @precondition(lambda self: self.configured)
    @rule(n=st.integers(1, 6))
    def step(self, n: int) -> None:
        for _ in range(n):
            self._take(self.s.step())

    @precondition(lambda self: self.configured and self.s.reqs)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.s.reqs)))
        out = self.s.abort(rid)
        assert out is not None and out.finish_reason is EngineFinishReason.ABORT
        self._take([out])
        assert rid not in self.s.reqs

    @invariant()
    def pages_add_up(self) -> None:
        if not self.configured:
            return
        self.s.check_accounting()
        for r in self.s.running:
            assert r.status is ReqStatus.RUNNING
            assert r.cached_pages <= len(r.pages) and r.kv_len <= len(r.pages) * PAGE
        for r in self.s.waiting:
            assert r.pages == [] and r.last_node is None

    def teardown(self) -> None:
        if not self.configured:
            return
        for _ in range(2000):
            if not self.s.has_work:
                break
            self._take(self.s.step())
        assert not self.s.has_work, "requests never finished"
        alloc = self.s.allocator
        assert alloc.free_pages + self.s.cache.total_pages == alloc.total_pages
        assert self.s.cache.protected_pages == 0
        for rid, new in self.asked.items():
            out = self.finished[rid]
            toks = self.streamed[rid]
            assert out.completion_tokens == len(toks)  # type: ignore[attr-defined]
            if out.finish_reason is not EngineFinishReason.ABORT:  # type: ignore[attr-defined]
                # The mocker never draws a stop id, so every request runs to max_new_tokens.
                assert len(toks) == new and out.finish_reason is EngineFinishReason.LENGTH  # type: ignore[attr-defined]


TestSchedulerAccounting = SchedulerMachine.TestCase
TestSchedulerAccounting.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_retraction_happens_and_loses_nothing(overlap: bool) -> None:
    s = make_scheduler(overlap=overlap)
    for i in range(6):
        s.add_request(GenerateRequest(f"r{i}", [10 + i] * 12, SamplingParams(max_new_tokens=30)))
    got: dict[str, list[int]] = {}
    for _ in range(500):
        for o in s.step():
            got.setdefault(o.rid, []).extend(o.token_ids)
        if not s.has_work:
            break
    assert s.stats.retractions > 0
    assert {k: len(v) for k, v in got.items()} == {f"r{i}": 30 for i in range(6)}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_chunked_prefill_never_retracts_an_older_request(overlap: bool) -> None:
    # 24 pages: the decoding request holds 11 and grows to 15, the long prompt needs 16, so one
    # must give way. The younger one does; the older one runs to the end without being recomputed.
    s = make_scheduler(disable_cache=True, overlap=overlap)
    old = s.add_request(GenerateRequest("old", [7] * 40, SamplingParams(max_new_tokens=20)))
    got: dict[str, list[int]] = {}

    def step() -> None:
        for o in s.step():
            got.setdefault(o.rid, []).extend(o.token_ids)

    for _ in range(8):
        step()
    s.add_request(GenerateRequest("young", [1 + i % 40 for i in range(60)], SamplingParams(max_new_tokens=2)))
    for _ in range(500):
        step()
        if not s.has_work:
            break
    assert old.num_retractions == 0
    assert {k: len(v) for k, v in got.items()} == {"old": 20, "young": 2}
    s.check_accounting()
