"""The simulated step executor: sleeps per the timing model, emits random-but-valid tokens.

It plugs into the engine's ``Scheduler`` exactly where the model runner does, so batching,
chunked prefill, the radix cache, retraction, KV events and load metrics are the real ones.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass

from armature.engine.scheduler import ScheduledBatch, ScheduledSeq, SeqResult
from armature.mocker.timing import PolynomialTiming


class PageCounter:
    """A KV page allocator with no memory behind it (the pages are only numbers)."""

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"the mocker needs at least one KV block, got {num_pages}")
        self._total = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def total_pages(self) -> int:
        return self._total

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        return taken

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)


@dataclass
class StepRecord:
    predicted_ms: float  # the timing model's figure (before speedup_ratio)
    measured_ms: float  # wall time from the start of the step to the end of its simulated forward
    num_prefill_tokens: int
    num_decodes: int
    active_blocks: int  # KV blocks held by running requests (the decode term's load, over the total)


_MASK64 = (1 << 64) - 1


def _seeded_token(seed: int, position: int, vocab: int) -> int:
    """A token that depends only on (seed, position): splitmix64 of the pair, no state to keep."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % vocab


class SimulatedExecutor:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        vocab_size: int,
        speedup_ratio: float = 1.0,
        seed: int = 0,
        timing: PolynomialTiming | None = None,
        history: int = 100_000,
    ) -> None:
        self._pages = PageCounter(num_pages)
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.speedup_ratio = speedup_ratio
        self.timing = timing or PolynomialTiming()
        # Unseeded requests draw from one stream: plain ``random``, a few hundred ns a token.
        self._rng = random.Random(seed)
        self.records: deque[StepRecord] = deque(maxlen=history)
        self.blocking = True
        self.timer_slack_s = 0.0  # how late a step may start and its forward still follow on
        self.deadline = 0.0  # perf_counter() at which the current step's simulated forward ends
        self.not_before = 0.0  # perf_counter() when the newest request reached the engine
        self.batch_size = 0  # requests in the current step
        self._current: tuple[float, float, int, int, int] = (0.0, 0.0, 0, 0, 0)
        self._in_flight = False
        self._uniform_logprob = -math.log(vocab_size)

    @property
    def allocator(self) -> PageCounter:
        return self._pages

    def execute(self, batch: ScheduledBatch) -> list[SeqResult]:
        """Price the step, set ``deadline`` (when its simulated forward ends) and return its tokens.

        With ``blocking`` (the step loop on a thread of its own) this sleeps until the deadline;
        otherwise the caller awaits it (the step loop as a task on the event loop) and then calls
        ``forward_done``.
        """
        prefill_tokens = 0
        decodes = 0
        for s in batch.seqs:
            if s.extend_len == 1 and s.prefix_len >= len(s.req.input_ids):
                decodes += 1
            else:
                prefill_tokens += s.extend_len
        predicted = self.timing.step_ms(prefill_tokens, decodes > 0, batch.active_pages / self._pages.total_pages)
        # The simulated forward starts when the step does (scheduling overhead is inside the
        # simulated time, not added to it) -- or where the previous one ended, when this step
        # starts no more than ``timer_slack_s`` after that (the step loop's wake-up latency):
        # back-to-back forwards then keep the model's pace instead of drifting behind it.
        # Never before a request in it arrived: following on applies to a busy engine only.
        start = batch.started
        if start - self.deadline <= self.timer_slack_s:
            start = max(self.deadline, self.not_before)
        self._current = (start, predicted, prefill_tokens, decodes, batch.active_pages)
        self.batch_size = len(batch.seqs)
        self._in_flight = True
        self.deadline = start + (predicted / 1000.0 / self.speedup_ratio if self.speedup_ratio > 0 else 0.0)
        if self.blocking:
            delay = self.deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.forward_done()
        results = []
        for s in batch.seqs:
            req = s.req
            if s.sample and not s.prompt_logprobs and not req.return_logprob:
                results.append(SeqResult(self._draw(s)))  # the common case: just a token
            else:
                results.append(self._result(s))
        return results

    def forward_done(self) -> None:
        """Record the step that just ended: the model's time and the wall time it took."""
        if not self._in_flight:
            return
        self._in_flight = False
        start, predicted, prefill_tokens, decodes, active = self._current
        measured = (time.perf_counter() - start) * 1000.0
        self.records.append(StepRecord(predicted, measured, prefill_tokens, decodes, active))

    def _draw(self, s: ScheduledSeq) -> int:
        req = s.req
        stop = req.stop_ids
        vocab = self.vocab_size
        seed = req.sampling.seed
        position = len(req.output_ids)
        while True:
            if seed is None:
                tok = int(self._rng.random() * vocab)
            else:
                tok = _seeded_token(seed, position, vocab)
                position += 1 << 32  # a redraw for the same position: another, still seeded
            # Stop ids are never drawn, so a request runs to max_new_tokens as a benchmark wants.
            if tok not in stop:
                return tok

    def _result(self, s: ScheduledSeq) -> SeqResult:
        res = SeqResult()
        lp = self._uniform_logprob
        if s.prompt_logprobs:
            n_targets = max(0, min(s.extend_len, len(s.req.input_ids) - s.prefix_len - 1))
            res.prompt_logprobs = [lp] * n_targets
            if s.req.top_logprobs_num:
                res.prompt_top_logprobs = [
                    [(t, lp) for t in range(s.req.top_logprobs_num)] for _ in range(n_targets)
                ]
        if s.sample:
            tok = self._draw(s)
            res.token_id = tok
            if s.req.return_logprob:
                res.logprob = lp
                if s.req.top_logprobs_num:
                    others = [t for t in range(s.req.top_logprobs_num + 1) if t != tok]
                    res.top_logprobs = [(tok, lp)] + [(t, lp) for t in others[: s.req.top_logprobs_num - 1]]
        return res
