"""armature bench: workloads reproduce the sharing they promise; the report counts what happened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from armature.bench.client import RequestResult, Target
from armature.bench.report import Slo, percentile, summarize
from armature.bench.workload import block_shareable_share, mooncake_trace, prefix_sharing, read_mooncake_trace


def test_prefix_groups_share_exactly_their_prefix() -> None:
    w = prefix_sharing(40, 4, prefix_len=64, suffix_len=16, output_len=8, tokens=True, block_size=16)
    assert w.num_requests == 40
    by_group: dict[int, list[list[int]]] = {}
    for s in w.sessions:
        ids = s.turns[0].prompt.token_ids
        assert ids is not None and len(ids) == 80
        by_group.setdefault(s.group, []).append(ids)  # type: ignore[arg-type]
    assert len(by_group) == 4
    prefixes = {g: {tuple(p[:64]) for p in ps} for g, ps in by_group.items()}
    assert all(len(v) == 1 for v in prefixes.values())
    assert len({next(iter(v)) for v in prefixes.values()}) == 4
    # 36 of the 40 requests can reuse a 64-token prefix of their 80 tokens.
    assert w.shareable_share == pytest.approx(36 * 64 / (40 * 80))


def test_word_prompts_have_the_target_word_count() -> None:
    w = prefix_sharing(3, 1, prefix_len=100, suffix_len=20, output_len=8)
    assert all(len((s.turns[0].prompt.text or "").split()) == 120 for s in w.sessions)


def test_mooncake_trace_same_hash_id_same_block(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 1000, "input_length": 1024, "output_length": 4, "hash_ids": [7, 8]},
        {"timestamp": 1500, "input_length": 700, "output_length": 4, "hash_ids": [7, 9]},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = mooncake_trace(read_mooncake_trace(trace), tokens=True, time_scale=2.0)
    a, b = (s.turns[0].prompt.token_ids for s in w.sessions)
    assert a is not None and b is not None and len(a) == 1024 and len(b) == 700
    assert a[:512] == b[:512] and a[512:] != b[512:700]
    assert [s.arrival_s for s in w.sessions] == [0.0, 1.0]
    assert w.shareable_share == pytest.approx(512 / 1724)


def test_malformed_trace_line_names_its_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_mooncake_trace(trace)


def test_report_counts_errors_rejections_goodput_and_cache_share() -> None:
    def ok(ttft: float, itl: float) -> RequestResult:
        return RequestResult(ok=True, start_s=0, status=200, ttft_s=ttft, e2e_s=ttft + 3 * itl, itls_s=[itl] * 3,
                             output_tokens=4, prompt_tokens=100, cached_tokens=50)  # fmt: skip

    results = [ok(0.05, 0.01), ok(0.30, 0.01), ok(0.05, 0.2),
               RequestResult(ok=False, start_s=0, status=429, error="HTTP 429"),
               RequestResult(ok=False, start_s=0, status=500, error="HTTP 500")]  # fmt: skip
    rep = summarize(results, wall_s=2.0, workload="w", shareable_share=0.6, slo=Slo(ttft_ms=100, itl_ms=50))
    assert (rep.ok, rep.errors, rep.rejections) == (3, 1, 1)
    assert rep.goodput == pytest.approx(0.5)  # one request of three met both SLOs, over 2 s
    assert rep.request_throughput == pytest.approx(1.5)
    assert rep.cached_token_share == pytest.approx(0.5)
    assert rep.ttft_ms.p50 == pytest.approx(50.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)


def test_target_url_gets_v1() -> None:
    assert Target.parse("http://127.0.0.1:8000").base_path == "/v1"
    assert Target.parse("http://h:1/v1/").base_path == "/v1"
    with pytest.raises(ValueError):
        Target.parse("ftp://x")


def test_block_shareable_share_counts_whole_blocks_seen_before_from_the_start() -> None:
    head = [1, 2, 3, 4]  # a chat template's fixed opening, shared by every request
    a = head + [10, 11, 12, 13, 90]
    b = head + [10, 11, 12, 13, 91, 92]
    c = head + [20, 11, 12, 13]  # same second block as a, but after a different one: not shared
    # block 4: b reuses a's two whole blocks, c only the head; trailing partial blocks never count
    assert block_shareable_share([a, b, c], 4) == pytest.approx((8 + 4) / (9 + 10 + 8))
    assert block_shareable_share([c, a, b], 4) == pytest.approx((4 + 8) / (8 + 9 + 10))
    assert block_shareable_share([], 4) == 0.0
    with pytest.raises(ValueError, match="block_size"):
        block_shareable_share([a], 0)


def test_shareable_share_over_engine_tokens_counts_the_template_and_its_block_shift() -> None:
    w = prefix_sharing(32, 4, prefix_len=64, suffix_len=16, output_len=8, tokens=True, block_size=16)
    head = [7] * 30  # like SmolLM2's default system turn ahead of the user's text
    seqs = [head + (s.turns[0].prompt.token_ids or []) + [8, 9] for s in w.sessions]
    # 30 + 64 = 94 shared tokens = 5 whole blocks (80 tokens) per later request of a group; the
    # first request of groups 2-4 still reuses the head's one whole block
    assert block_shareable_share(seqs, 16) == pytest.approx((28 * 80 + 3 * 16) / (32 * 112))
    assert w.shareable_share == pytest.approx(28 * 64 / (32 * 80))  # the prompt-only estimate
