"""The native step executor: turns a scheduled batch into a forward pass and sampled tokens.

``execute`` runs a batch to completion. The overlap schedule splits that in two: ``launch``
enqueues the forward and the sampling on the device and starts copying the sampled ids to pinned
host memory, and ``collect`` waits for that copy. A token the host has not read yet is a
``PLACEHOLDER`` in the request; ``launch`` fills it in on the device from the launch that
sampled it, so the next forward never waits for the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from armature.engine.forward_batch import ForwardBatch, ForwardMode
from armature.engine.host_copy import to_device
from armature.engine.sampler import Sampler, SamplingRow, token_logprobs
from armature.engine.scheduler import PLACEHOLDER, PageAllocator, ScheduledBatch, ScheduledSeq, SeqResult


@dataclass
class Launched:
    """A batch whose forward and sampling are enqueued: its sampled ids are on their way."""

    n_seqs: int
    sampled: list[int]  # indices of the sequences that sample, in row order of ``token_ids``
    token_ids: torch.Tensor | None = None  # [len(sampled)] on the device
    host_ids: torch.Tensor | None = None  # pinned copy, valid once ``ready`` has fired
    ready: torch.cuda.Event | None = None
    results: list[SeqResult] | None = None  # set when the batch ran synchronously


class ModelExecutor:
    def __init__(self, runner: Any, sampler: Sampler) -> None:
        self.runner = runner
        self.sampler = sampler
        self.device = runner.device

    @property
    def allocator(self) -> PageAllocator:
        return self.runner.kv_pool

    # --- synchronous -----------------------------------------------------------------------

    def execute(self, batch: ScheduledBatch) -> list[SeqResult]:
        logits = self.runner.forward(self._forward_batch(batch))
        return self._results(batch, logits)

    def embed(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Whole prompts (``prefix_len`` 0, pages held by each ``req``) forwarded once: the
        final-normed hidden state of each one's last token, ``[len(seqs), hidden_size]`` float32."""
        batch = ScheduledBatch(ForwardMode.EXTEND, seqs, active_pages=0)
        return self.runner.forward(self._forward_batch(batch), hidden=True)

    # --- overlap schedule ------------------------------------------------------------------

    def can_overlap(self, batch: ScheduledBatch) -> bool:
        """Batches whose sampling needs the host to know earlier tokens, or whose results
        include logprobs, run synchronously."""
        for s in batch.seqs:
            r = s.req
            p = r.sampling
            if s.prompt_logprobs or r.return_logprob:
                return False
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                return False
        return True

    def launch(self, batch: ScheduledBatch) -> Launched:
        logits = self.runner.forward(self._forward_batch(batch))
        if not self.can_overlap(batch):
            return Launched(len(batch.seqs), [], results=self._results(batch, logits))
        sampled = [i for i, s in enumerate(batch.seqs) if s.sample]
        launched = Launched(len(batch.seqs), sampled)
        if not sampled:
            return launched
        # Without prompt logprobs every sequence has exactly one logits row (its last token).
        sel = logits if len(sampled) == logits.shape[0] else logits.index_select(0, to_device(sampled, torch.int64, logits.device))
        ids = self.sampler.sample_ids(sel, [self._sampling_row(batch.seqs[i]) for i in sampled])
        launched.token_ids = ids
        if ids.device.type == "cuda":
            launched.host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            launched.host_ids.copy_(ids, non_blocking=True)
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        else:
            launched.host_ids = ids
        return launched

    def collect(self, launched: Launched) -> list[SeqResult]:
        if launched.results is not None:
            return launched.results
        results = [SeqResult() for _ in range(launched.n_seqs)]
        if launched.host_ids is None:
            return results
        if launched.ready is not None:
            launched.ready.synchronize()
        for i, tok in zip(launched.sampled, launched.host_ids.tolist()):
            results[i].token_id = tok
        return results

    # --- batch building --------------------------------------------------------------------

    def _forward_batch(self, batch: ScheduledBatch) -> ForwardBatch:
        fb = self._page_batch(batch) if self.runner.attn_backend.uses_page_table else self._slot_batch(batch)
        self._resolve_placeholders(batch, fb)
        return fb

    def _resolve_placeholders(self, batch: ScheduledBatch, fb: ForwardBatch) -> None:
        """Point every PLACEHOLDER input at the device-side id of the launch that sampled it."""
        if not (fb.input_ids == PLACEHOLDER).any():
            return
        dst: list[int] = []
        by_launch: dict[int, tuple[Launched, list[int]]] = {}
        row = 0
        for s in batch.seqs:
            end = row + s.extend_len
            if int(fb.input_ids[end - 1]) == PLACEHOLDER:
                # Only a sequence's last token can still be in flight.
                assert s.req.future is not None, "an unread token with no launch behind it"
                launched, k = s.req.future
                assert isinstance(launched, Launched)
                dst.append(end - 1)
                by_launch.setdefault(id(launched), (launched, []))[1].append(k)
            row = end
        assert len(dst) == int((fb.input_ids == PLACEHOLDER).sum()), "an unread token mid-sequence"
        parts = []
        for launched, rows in by_launch.values():
            assert launched.token_ids is not None
            if rows == list(range(launched.token_ids.shape[0])):
                parts.append(launched.token_ids)  # the usual decode: the same batch, in order
            else:
                parts.append(launched.token_ids.index_select(0, to_device(rows, torch.int64, self.device)))
        fb.input_ids[dst] = 0  # a valid id on the host; the device copy is overwritten
        fb.future_rows = to_device(dst, torch.int64, self.device)
        fb.future_ids = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(self.device)

    def _slot_batch(self, batch: ScheduledBatch) -> ForwardBatch:
        pool = self.runner.kv_pool
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        out_loc: list[torch.Tensor] = []
        kv_indices: list[torch.Tensor] = []
        for s in batch.seqs:
            ids.extend(s.input_ids())
            end = s.prefix_len + s.extend_len
            slots = pool.slots_of(s.req.pages, end).to(self.device)
            kv_indices.append(slots)
            out_loc.append(slots[s.prefix_len :])
            positions.append(torch.arange(s.prefix_len, end, dtype=torch.int64))
        return ForwardBatch(
            mode=batch.mode,
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.cat(positions),
            out_cache_loc=torch.cat(out_loc),
            extend_lens=[s.extend_len for s in batch.seqs],
            prefix_lens=[s.prefix_len for s in batch.seqs],
            kv_indices=kv_indices,
            return_all_logits=[s.prompt_logprobs for s in batch.seqs],
        )

    def _page_batch(self, batch: ScheduledBatch) -> ForwardBatch:
        # Host tensors only: the backend (or the CUDA graph's staging) moves them in one go.
        pool = self.runner.kv_pool
        ps = pool.page_size
        ids: list[int] = []
        positions: list[int] = []
        out_loc: list[int] = []
        table: list[list[int]] = []
        for s in batch.seqs:
            pages = s.req.pages
            end = s.prefix_len + s.extend_len
            if s.extend_len == 1:
                pos = s.prefix_len
                ids.append(s.req.fill_slice(pos, end)[0])
                positions.append(pos)
                out_loc.append(pages[pos // ps] * ps + pos % ps)
            else:
                ids.extend(s.input_ids())
                positions.extend(range(s.prefix_len, end))
                out_loc.extend(pool.new_token_slots(pages, s.prefix_len, end))
            table.append(pages[: -(-end // ps)])
        return ForwardBatch(
            mode=batch.mode,
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_cache_loc=torch.tensor(out_loc, dtype=torch.int64),
            extend_lens=[s.extend_len for s in batch.seqs],
            prefix_lens=[s.prefix_len for s in batch.seqs],
            kv_indices=[],
            return_all_logits=[s.prompt_logprobs for s in batch.seqs],
            page_table=table,
        )

    # --- results ---------------------------------------------------------------------------

    def _results(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[SeqResult]:
        results = [SeqResult() for _ in batch.seqs]
        last_rows: list[int] = []
        sampled: list[int] = []
        row = 0
        for i, s in enumerate(batch.seqs):
            n_rows = s.extend_len if s.prompt_logprobs else 1
            if s.prompt_logprobs:
                self._prompt_logprobs(s, logits[row : row + n_rows], results[i])
            if s.sample:
                last_rows.append(row + n_rows - 1)
                sampled.append(i)
            row += n_rows
        if sampled:
            rows = [self._sampling_row(batch.seqs[i]) for i in sampled]
            sel = logits if len(last_rows) == logits.shape[0] else logits[last_rows]
            res = self.sampler.sample(sel, rows)
            for j, i in enumerate(sampled):
                results[i].token_id = res.token_ids[j]
                results[i].logprob = res.logprobs[j]
                results[i].top_logprobs = res.top_logprobs[j]
        return results

    @staticmethod
    def _sampling_row(s: ScheduledSeq) -> SamplingRow:
        r = s.req
        penal = r.sampling.repetition_penalty != 1.0
        return SamplingRow(
            params=r.sampling,
            output_ids=r.output_ids,
            prompt_ids=r.input_ids if penal else (),
            stop_ids=tuple(r.stop_ids),
            generator=r.generator,
            return_logprob=r.return_logprob,
            top_logprobs_num=r.top_logprobs_num,
        )

    def _prompt_logprobs(self, s: ScheduledSeq, rows: torch.Tensor, out: SeqResult) -> None:
        r = s.req
        # Row j predicts the token at position prefix + j + 1; only prompt targets count.
        start = s.prefix_len + 1
        end = min(s.prefix_len + s.extend_len + 1, len(r.input_ids))
        if end <= start:
            out.prompt_logprobs = []
            return
        targets = to_device(r.input_ids[start:end], torch.int64, rows.device)
        chosen, tops = token_logprobs(rows[: end - start], targets, r.top_logprobs_num)
        out.prompt_logprobs = chosen
        out.prompt_top_logprobs = tops
