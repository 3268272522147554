"""The simulated step executor: sleeps per the timing model, emits random-but-valid tokens.

It plugs into the engine's ``Scheduler`` exactly where the model runner does, so batching,
chunked prefill, the radix cache, retraction, KV events and load metrics are the real ones.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import torch

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
    active_kv_tokens: int


def _is_decode(s: ScheduledSeq) -> bool:
    return s.extend_len == 1 and bool(s.req.output_ids) and s.prefix_len >= len(s.req.input_ids)


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
        self._gen = torch.Generator().manual_seed(seed)
        self.records: deque[StepRecord] = deque(maxlen=history)
        self._uniform_logprob = -math.log(vocab_size)

    @property
    def allocator(self) -> PageCounter:
        return self._pages

    def execute(self, batch: ScheduledBatch) -> list[SeqResult]:
        prefill = [s.extend_len for s in batch.seqs if not _is_decode(s)]
        decodes = len(batch.seqs) - len(prefill)
        active_tokens = batch.active_pages * self.page_size
        predicted = self.timing.step_ms(prefill, decodes > 0, active_tokens)
        if self.speedup_ratio > 0:
            # Sleep until the step's deadline, so scheduling overhead is part of the simulated
            # time rather than added on top of it.
            deadline = batch.started + predicted / 1000.0 / self.speedup_ratio
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        measured = (time.perf_counter() - batch.started) * 1000.0
        self.records.append(StepRecord(predicted, measured, sum(prefill), decodes, active_tokens))
        return [self._result(s) for s in batch.seqs]

    def _draw(self, s: ScheduledSeq) -> int:
        gen = s.req.generator or self._gen
        stop = s.req.stop_ids
        while True:
            tok = int(torch.randint(self.vocab_size, (1,), generator=gen))
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
