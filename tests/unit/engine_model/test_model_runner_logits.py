"""ModelRunner logits against transformers on the same weights (fp32, CPU).

The runner is driven directly with a simple page allocation (the scheduler is not involved):
full prefills, prefills split into chunks over a cached prefix, batched decodes of sequences of
different lengths, and extend batches that mix a prefill chunk with one-token decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers

from armature.engine.forward_batch import ForwardBatch, ForwardMode
from armature.engine.model_runner import ModelRunner

TINY = ["tiny_llama_path", "tiny_qwen2_path", "tiny_qwen3_path"]
TINY_ATOL = 1e-4


@dataclass
class Seq:
    tokens: list[int] = field(default_factory=list)  # every token whose K/V is in the pool
    pages: list[int] = field(default_factory=list)


class PagedDriver:
    """Builds ForwardBatches for a few sequences, allocating pages as they grow."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.pool = runner.kv_pool

    def batch(self, items: list[tuple[Seq, list[int]]], all_logits: bool = False) -> ForwardBatch:
        ids, pos, out_loc, kv = [], [], [], []
        for seq, new in items:
            prefix = len(seq.tokens)
            total = prefix + len(new)
            need = -(-total // self.pool.page_size) - len(seq.pages)
            seq.pages += self.pool.alloc(max(0, need))
            slots = self.pool.slots_of(seq.pages, total)
            ids += new
            pos += range(prefix, total)
            out_loc.append(slots[prefix:])
            kv.append(slots)
        decode = all(len(new) == 1 for _, new in items)
        batch = ForwardBatch(
            mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            out_cache_loc=torch.cat(out_loc),
            extend_lens=[len(new) for _, new in items],
            prefix_lens=[len(seq.tokens) for seq, _ in items],
            kv_indices=kv,
            return_all_logits=[all_logits] * len(items),
        )
        for seq, new in items:
            seq.tokens += new
        return batch

    def run(self, items: list[tuple[Seq, list[int]]], all_logits: bool = False) -> torch.Tensor:
        return self.runner.forward(self.batch(items, all_logits))

    def release(self, *seqs: Seq) -> None:
        for s in seqs:
            self.pool.free(s.pages)
            s.pages = []


def hf_logits(model: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def prompts(seed: int, lengths: list[int], vocab: int = 49152) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module", params=TINY)
def tiny(request: pytest.FixtureRequest) -> tuple[ModelRunner, transformers.PreTrainedModel]:
    path: Path = request.getfixturevalue(request.param)
    runner = ModelRunner(str(path), dtype="float32", max_total_tokens=8192)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return runner, hf


def test_full_prefill_returns_logits_of_every_prompt_token(tiny) -> None:
    runner, hf = tiny
    driver = PagedDriver(runner)
    (tokens,) = prompts(1, [77])
    seq = Seq()
    got = driver.run([(seq, tokens)], all_logits=True)
    assert got.dtype == torch.float32
    assert got.shape == (77, runner.model_config.vocab_size)
    torch.testing.assert_close(got, hf_logits(hf, tokens), atol=TINY_ATOL, rtol=0)
    driver.release(seq)


def test_batched_prefill_in_last_token_mode_returns_one_row_per_sequence(tiny) -> None:
    runner, hf = tiny
    driver = PagedDriver(runner)
    toks = prompts(2, [5, 40, 1, 130])
    seqs = [Seq() for _ in toks]
    got = driver.run(list(zip(seqs, toks)))
    assert got.shape == (4, runner.model_config.vocab_size)
    for row, t in zip(got, toks):
        torch.testing.assert_close(row, hf_logits(hf, t)[-1], atol=TINY_ATOL, rtol=0)
    driver.release(*seqs)


def test_prefill_split_into_chunks_over_a_cached_prefix_matches_one_pass(tiny) -> None:
    runner, hf = tiny
    driver = PagedDriver(runner)
    (tokens,) = prompts(3, [150])
    ref = hf_logits(hf, tokens)
    seq = Seq()
    start = 0
    for size in (37, 16, 1, 60, 36):  # chunk edges fall inside and on page boundaries
        got = driver.run([(seq, tokens[start : start + size])], all_logits=True)
        torch.testing.assert_close(got, ref[start : start + size], atol=TINY_ATOL, rtol=0)
        start += size
    assert start == len(tokens)
    driver.release(seq)


def test_batched_greedy_decode_of_different_lengths_matches_per_sequence_reference(tiny) -> None:
    runner, hf = tiny
    driver = PagedDriver(runner)
    toks = prompts(4, [3, 16, 17, 64, 100])
    seqs = [Seq() for _ in toks]
    last = driver.run(list(zip(seqs, toks)))
    for _step in range(6):
        next_ids = last.argmax(-1).tolist()
        last = driver.run([(s, [t]) for s, t in zip(seqs, next_ids)])
        for row, s in zip(last, seqs):
            torch.testing.assert_close(row, hf_logits(hf, s.tokens)[-1], atol=TINY_ATOL, rtol=0)
    driver.release(*seqs)


def test_extend_batch_mixing_a_prefill_chunk_with_decodes(tiny) -> None:
    runner, hf = tiny
    driver = PagedDriver(runner)
    a_tokens, b_tokens, c_tokens = prompts(5, [90, 20, 33])
    a, b, c = Seq(), Seq(), Seq()
    driver.run([(a, a_tokens[:50]), (b, b_tokens), (c, c_tokens)])
    # Continue a's prefill while b and c decode one token each, and ask for all of a's logits.
    batch = driver.batch([(b, [7]), (a, a_tokens[50:]), (c, [9])], all_logits=True)
    got = runner.forward(batch)
    assert got.shape == (1 + 40 + 1, runner.model_config.vocab_size)
    torch.testing.assert_close(got[0], hf_logits(hf, b.tokens)[-1], atol=TINY_ATOL, rtol=0)
    torch.testing.assert_close(got[1:41], hf_logits(hf, a.tokens)[50:], atol=TINY_ATOL, rtol=0)
    torch.testing.assert_close(got[41], hf_logits(hf, c.tokens)[-1], atol=TINY_ATOL, rtol=0)
    driver.release(a, b, c)


def test_smollm2_greedy_generation_equals_transformers_generate(smollm2_path: Path) -> None:
    runner = ModelRunner(str(smollm2_path), dtype="float32", max_total_tokens=4096)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "2+2="]
    toks = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                return_dict=False)
        for q in questions
    ]
    max_new = 10
    driver = PagedDriver(runner)
    seqs = [Seq() for _ in toks]
    outs: list[list[int]] = [[] for _ in toks]
    logits = driver.run(list(zip(seqs, toks)))
    for row, t in zip(logits, toks):
        torch.testing.assert_close(row, hf_logits(hf, t)[-1], atol=1e-3, rtol=0)
    for _ in range(max_new):
        nxt = logits.argmax(-1).tolist()
        for o, n in zip(outs, nxt):
            o.append(n)
        logits = driver.run([(s, [n]) for s, n in zip(seqs, nxt)])
    for t, o in zip(toks, outs):
        with torch.no_grad():
            # An explicit mask: with none, transformers would mask every pad-id (<|im_end|>) token.
            ids = torch.tensor([t])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                              do_sample=False, eos_token_id=None, pad_token_id=2)
        assert o == ref[0, len(t):].tolist()
    assert "Paris" in tok.decode(outs[0])
    driver.release(*seqs)


def test_bfloat16_runner_stays_close_to_float32(tiny_llama_path: Path) -> None:
    (tokens,) = prompts(6, [48])
    full = ModelRunner(str(tiny_llama_path), dtype="float32", max_total_tokens=256)
    half = ModelRunner(str(tiny_llama_path), dtype="bfloat16", max_total_tokens=256)
    assert half.dtype == torch.bfloat16 and half.kv_pool.k_buffer[0].dtype == torch.bfloat16
    ref = PagedDriver(full).run([(Seq(), tokens)], all_logits=True)
    got = PagedDriver(half).run([(Seq(), tokens)], all_logits=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)
