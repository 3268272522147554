"""The batched sampler against transformers' logits processors and plain definitions."""

from __future__ import annotations

import pytest
import torch

from armature.engine.api import SamplingParams
from armature.engine.sampler import Sampler, SamplingRow, make_generator

V = 64


def logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(**kw: object) -> SamplingRow:
    extra = {k: kw.pop(k) for k in list(kw) if k in {"output_ids", "prompt_ids", "stop_ids", "generator",
                                                      "return_logprob", "top_logprobs_num"}}
    extra.setdefault("output_ids", [])
    return SamplingRow(params=SamplingParams(**kw), **extra)  # type: ignore[arg-type]


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax() -> None:
    x = logits()
    res = Sampler().sample(x, [row(temperature=0.0, return_logprob=True, top_logprobs_num=3) for _ in range(4)])
    assert res.token_ids == x.argmax(-1).tolist()
    ref = torch.log_softmax(x, -1)
    for i, t in enumerate(res.token_ids):
        assert res.logprobs[i] == pytest.approx(ref[i, t].item(), abs=1e-6)
        assert [tid for tid, _ in res.top_logprobs[i]] == ref[i].topk(3).indices.tolist()


def test_seeded_rows_reproduce_regardless_of_batch() -> None:
    x = logits(3)
    s = Sampler(seed=1)
    alone = [s.sample(x[1:2], [row(temperature=1.0, generator=make_generator(42))]).token_ids[0] for _ in range(1)]
    gen = make_generator(42)
    seq_alone = [s.sample(x[1:2], [row(temperature=1.0, generator=gen)]).token_ids[0] for _ in range(20)]
    gen2 = make_generator(42)
    seq_batched = []
    for _ in range(20):
        out = s.sample(x, [row(temperature=0.7), row(temperature=1.0, generator=gen2), row(temperature=0.0)])
        seq_batched.append(out.token_ids[1])
    assert seq_alone == seq_batched and seq_alone[0] == alone[0]
    gen3 = make_generator(43)
    other = [s.sample(x[1:2], [row(temperature=1.0, generator=gen3)]).token_ids[0] for _ in range(20)]
    assert other != seq_alone


def test_top_k_top_p_min_p_keep_only_allowed_tokens() -> None:
    x = logits(1)
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True).tolist()
    s = Sampler(seed=3)
    draws_k = {s.sample(x, [row(temperature=1.0, top_k=3)]).token_ids[0] for _ in range(200)}
    assert draws_k <= set(order[:3]) and len(draws_k) > 1
    # Smallest prefix of the sorted distribution with mass >= top_p.
    cum = probs[order].cumsum(0)
    n_p = int((cum < 0.6).sum().item()) + 1
    draws_p = {s.sample(x, [row(temperature=1.0, top_p=0.6)]).token_ids[0] for _ in range(300)}
    assert draws_p <= set(order[:n_p])
    allowed_min_p = {i for i in range(V) if probs[i] >= 0.3 * probs.max()}
    draws_m = {s.sample(x, [row(temperature=1.0, min_p=0.3)]).token_ids[0] for _ in range(300)}
    assert draws_m <= allowed_min_p


def test_penalties_match_transformers_processors() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(1)
    seen = x[0].topk(4).indices.tolist()
    ids = torch.tensor([seen])
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, x.clone())
    s = Sampler()
    got = s.sample(x, [row(temperature=0.0, repetition_penalty=1.7, prompt_ids=seen[:2], output_ids=seen[2:])])
    assert got.token_ids == want.argmax(-1).tolist()
    # Frequency penalty: a token that already appeared twice loses 2 * penalty.
    top = x[0].argmax().item()
    gap = (x[0].topk(2).values[0] - x[0].topk(2).values[1]).item()
    fp = gap / 2 + 0.01
    got = s.sample(x, [row(temperature=0.0, frequency_penalty=min(fp, 2.0), output_ids=[top, top])])
    if fp <= 2.0:
        assert got.token_ids[0] != top
    got = s.sample(x, [row(temperature=0.0, presence_penalty=0.0, output_ids=[top, top])])
    assert got.token_ids[0] == top


def test_min_new_tokens_suppresses_stop_ids_until_reached() -> None:
    x = logits(1)
    top = int(x[0].argmax())
    s = Sampler()
    early = s.sample(x, [row(temperature=0.0, min_new_tokens=2, stop_ids=[top], output_ids=[5])])
    assert early.token_ids[0] != top
    later = s.sample(x, [row(temperature=0.0, min_new_tokens=2, stop_ids=[top], output_ids=[5, 6])])
    assert later.token_ids[0] == top
