"""Batched token sampling: penalties, min-tokens, temperature, top-k/top-p/min-p, seeds, logprobs.

Logprobs are the log-softmax of the model's raw logits (before penalties and temperature), which
is what SGLang and transformers report. Each request with a ``seed`` owns a ``torch.Generator``,
so its draws depend only on its own history, never on what else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from armature.engine.host_copy import to_device

from armature.engine.api import SamplingParams

GREEDY_EPS = 1e-6


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request for one step."""

    params: SamplingParams
    output_ids: Sequence[int]
    prompt_ids: Sequence[int] = ()
    # Ids that end the request (stop ids, and EOS unless ignore_eos): banned until min_new_tokens.
    stop_ids: Sequence[int] = ()
    generator: torch.Generator | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0

    @property
    def greedy(self) -> bool:
        return self.params.temperature < GREEDY_EPS

    @property
    def penalized(self) -> bool:
        p = self.params
        return p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or p.repetition_penalty != 1.0

    @property
    def suppress_stops(self) -> bool:
        return bool(self.stop_ids) and len(self.output_ids) < self.params.min_new_tokens


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int = 0
) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
    """Log-probabilities of ``targets`` under the raw ``logits`` rows, and the top-k per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, targets.view(-1, 1)).squeeze(1).tolist()
    if top_k <= 0:
        return chosen, None
    vals, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return chosen, tops


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        # Draws of unseeded requests: one shared stream, seeded by the engine's random_seed.
        self._shared = make_generator(seed, self.device)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} requests")
        raw = logits.float()
        return self._with_logprobs(raw, self.sample_ids(raw, rows), rows)

    def sample_ids(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The sampled ids as a tensor on the logits' device; no host synchronisation."""
        raw = logits.float()
        if all(r.greedy and not r.penalized and not r.suppress_stops for r in rows):
            return raw.argmax(dim=-1)
        return self._sample_general(raw, rows)

    def _with_logprobs(self, raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
        ids = token_ids.tolist()
        result = SampleResult(token_ids=ids, logprobs=[None] * len(ids), top_logprobs=[None] * len(ids))
        want = [i for i, r in enumerate(rows) if r.return_logprob]
        if not want:
            return result
        idx = to_device(want, torch.long, raw.device)
        top_k = max(rows[i].top_logprobs_num for i in want)
        chosen, tops = token_logprobs(raw.index_select(0, idx), token_ids.index_select(0, idx), top_k)
        for j, i in enumerate(want):
            result.logprobs[i] = chosen[j]
            if tops is not None and rows[i].top_logprobs_num > 0:
                result.top_logprobs[i] = tops[j][: rows[i].top_logprobs_num]
        return result

    def _sample_general(self, raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        logits = raw.clone()
        vocab = logits.shape[-1]
        for i, r in enumerate(rows):
            if r.penalized:
                self._apply_penalties(logits[i], r, vocab)
            if r.suppress_stops:
                stop = to_device([t for t in r.stop_ids if 0 <= t < vocab], torch.long, logits.device)
                logits[i].index_fill_(0, stop, float("-inf"))

        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.greedy]
        if greedy:
            g = to_device(greedy, torch.long, logits.device)
            out.index_copy_(0, g, logits.index_select(0, g).argmax(dim=-1))
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if not sampled:
            return out
        s_idx = to_device(sampled, torch.long, logits.device)
        temps = to_device([rows[i].params.temperature for i in sampled], torch.float32, logits.device).unsqueeze(1)
        probs = torch.softmax(logits.index_select(0, s_idx) / temps, dim=-1)
        probs = self._filter(probs, [rows[i].params for i in sampled])
        # Unseeded rows share one batched draw; seeded rows each draw from their own generator.
        shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
        if shared:
            sh = to_device(shared, torch.long, logits.device)
            drawn = torch.multinomial(probs.index_select(0, sh), 1, generator=self._shared).squeeze(1)
            for k, j in enumerate(shared):
                out[sampled[j]] = drawn[k]
        for j, i in enumerate(sampled):
            gen = rows[i].generator
            if gen is not None:
                out[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return out

    @staticmethod
    def _apply_penalties(row: torch.Tensor, r: SamplingRow, vocab: int) -> None:
        p = r.params
        if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
            out_ids = to_device(list(r.output_ids), torch.long, row.device)
            counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(row.dtype)
            if p.frequency_penalty:
                row.sub_(p.frequency_penalty * counts)
            if p.presence_penalty:
                row.sub_(p.presence_penalty * (counts > 0).to(row.dtype))
        if p.repetition_penalty != 1.0:
            # transformers / vLLM semantics: every token seen so far (prompt and output).
            seen = to_device(sorted(set(r.prompt_ids) | set(r.output_ids)), torch.long, row.device)
            if seen.numel():
                vals = row.index_select(0, seen)
                vals = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
                row.index_copy_(0, seen, vals)

    @staticmethod
    def _filter(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        need_sort = any(p.top_p < 1.0 or p.top_k > 0 or p.min_p > 0.0 for p in params)
        if not need_sort:
            return probs
        device = probs.device
        sorted_p, order = probs.sort(dim=-1, descending=True)
        vocab = probs.shape[-1]
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, device).unsqueeze(1)
        top_p = to_device([p.top_p for p in params], torch.float32, device).unsqueeze(1)
        min_p = to_device([p.min_p for p in params], torch.float32, device).unsqueeze(1)
        drop = ranks >= top_k
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop |= (sorted_p.cumsum(dim=-1) - sorted_p) > top_p
        drop |= sorted_p < min_p * sorted_p[:, :1]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        filtered = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        return filtered / filtered.sum(dim=-1, keepdim=True)
