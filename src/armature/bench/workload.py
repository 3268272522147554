"""What ``armature bench`` sends: synthetic prefix sharing, multi-turn chat, Mooncake trace replay.

A workload is a list of ``Session``s; a session is one or more turns sent in order (each turn
after the previous one's answer). Single-shot workloads have one turn per session. Each session
may carry an arrival time (trace replay); otherwise the runner schedules it by concurrency or
Poisson rate.

Prompts are made of short, common English words, each a single token in the usual BPE
vocabularies (Llama, SmolLM, Qwen, GPT), so a prompt of N words is close to N tokens without
the load generator knowing the server's tokenizer. With ``tokens=True`` prompts are token-id
lists instead (sent to ``/v1/completions``), which are exact.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Short words that tokenize to one token with a leading space in common BPE vocabularies.
WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for on that with as by at from his an were are which this be or
    has had one first not but after new their who its also two they been her time other into
    year more all most only over city some would when people can she him may world there three
    part then well where these any about between under state long used being made city end day
    way life each high back both while same work war early game last name even left area much
    great small old large top home down best off band found see local team set since film four
    five six ten line main book show play light open head must land case side real red blue
    green black white good low north south east west road water river lake sea hill park town
    house room door car ship tree bird fish dog cat horse king queen man woman child boy girl
    food bread milk tea wine gold iron stone fire wind rain snow sun moon star rock sand ice
    cold hot dark fast slow hard soft full free true word news song art law army age power
    force form field fact level list note page plan price rate rule sign size test type unit
    view voice wall week page cup key box bag bed hand face eye ear arm leg foot heart mind""".split()
)
TRACE_BLOCK_TOKENS = 512  # Mooncake traces: one hash id = one block of 512 tokens


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's input: text (chat or completions) or token ids (completions only)."""

    text: str | None = None
    token_ids: list[int] | None = None
    target_tokens: int = 0


@dataclass(slots=True)
class Turn:
    prompt: Prompt
    max_tokens: int


@dataclass(slots=True)
class Session:
    turns: list[Turn]
    arrival_s: float | None = None  # trace replay: seconds after the start
    group: int | None = None  # prefix group (synthetic prefix sharing)
    system: str | None = None  # multi-turn chat: the session's system prompt


@dataclass(slots=True)
class Workload:
    name: str
    sessions: list[Session]
    # Share of all prompt tokens that an ideal cache could serve: tokens whose prefix (at whole
    # blocks of ``block_size``) was sent before. The yardstick for the measured cached share.
    shareable_share: float = 0.0
    block_size: int = 16
    params: dict[str, object] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def random_words(rng: random.Random, n: int) -> list[str]:
    return rng.choices(WORDS, k=n)


def random_token_ids(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


def _prompt(rng: random.Random, n: int, tokens: bool, id_range: tuple[int, int]) -> Prompt:
    if tokens:
        return Prompt(token_ids=random_token_ids(rng, n, *id_range), target_tokens=n)
    return Prompt(text=" ".join(random_words(rng, n)), target_tokens=n)


def _join(a: Prompt, b: Prompt) -> Prompt:
    if a.token_ids is not None and b.token_ids is not None:
        return Prompt(token_ids=a.token_ids + b.token_ids, target_tokens=a.target_tokens + b.target_tokens)
    return Prompt(text=f"{a.text} {b.text}", target_tokens=a.target_tokens + b.target_tokens)


def block_shareable_share(token_seqs: Sequence[Sequence[int]], block_size: int) -> float:
    """Share of all tokens an ideal prefix cache could serve, over the exact token ids sent.

    A request's whole block is shareable when an earlier request had the same tokens up to and
    including that block (prefix caches match whole blocks from the start). Computed on the ids
    the engine sees (chat template included), it is the yardstick for the engine-reported cached
    share, which counts the same ids; the workloads' own estimate counts prompt words only.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    seen: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent node, block) -> node
    shareable = 0
    total = 0
    for seq in token_seqs:
        total += len(seq)
        node = 0
        for start in range(0, len(seq) - block_size + 1, block_size):
            key = (node, tuple(seq[start : start + block_size]))
            child = seen.get(key)
            if child is None:
                child = seen[key] = len(seen) + 1
            else:
                shareable += block_size
            node = child
    return shareable / total if total else 0.0


def prefix_sharing(
    num_requests: int,
    num_prefix_groups: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    *,
    seed: int = 0,
    tokens: bool = False,
    token_id_range: tuple[int, int] = (1000, 20000),
    block_size: int = 16,
) -> Workload:
    """``num_requests`` requests, each a random group's shared prefix plus a private suffix.

    Groups are visited in a shuffled round so every group appears early and evenly.
    """
    if num_prefix_groups <= 0 or num_requests <= 0:
        raise ValueError("--num-prefix-groups and --num-requests must be positive")
    if prefix_len < 0 or suffix_len < 0 or output_len <= 0:
        raise ValueError("--prefix-len/--suffix-len must be >= 0 and --output-len > 0")
    rng = random.Random(seed)
    prefixes = [_prompt(rng, prefix_len, tokens, token_id_range) for _ in range(num_prefix_groups)]
    order: list[int] = []
    while len(order) < num_requests:
        round_ = list(range(num_prefix_groups))
        rng.shuffle(round_)
        order += round_
    sessions = []
    for g in order[:num_requests]:
        prompt = _join(prefixes[g], _prompt(rng, suffix_len, tokens, token_id_range)) if suffix_len else prefixes[g]
        sessions.append(Session([Turn(prompt, output_len)], group=g))
    groups_used = len(set(order[:num_requests]))
    shared_blocks = (prefix_len // block_size) * block_size
    total = num_requests * (prefix_len + suffix_len)
    shareable = (num_requests - groups_used) * shared_blocks / total if total else 0.0
    return Workload(
        "prefix-sharing",
        sessions,
        shareable_share=shareable,
        block_size=block_size,
        params={
            "num_requests": num_requests, "num_prefix_groups": num_prefix_groups, "prefix_len": prefix_len,
            "suffix_len": suffix_len, "output_len": output_len, "tokens": tokens, "seed": seed,
        },
    )  # fmt: skip


def multi_turn(
    num_sessions: int,
    turns: int,
    system_len: int,
    user_len: int,
    output_len: int,
    *,
    seed: int = 0,
) -> Workload:
    """Chat sessions of ``turns`` user turns each; every turn resends the whole history."""
    if num_sessions <= 0 or turns <= 0:
        raise ValueError("--num-sessions and --turns must be positive")
    rng = random.Random(seed)
    sessions = []
    for _ in range(num_sessions):
        system = " ".join(random_words(rng, system_len)) if system_len else None
        ts = [Turn(Prompt(text=" ".join(random_words(rng, user_len)), target_tokens=user_len), output_len)
              for _ in range(turns)]  # fmt: skip
        sessions.append(Session(ts, system=system))
    # Turn k of a session re-sends turns < k and their answers: about (k-1)/k of its tokens.
    per_session = [(system_len + (k + 1) * user_len + k * output_len) for k in range(turns)]
    reusable = [(system_len + k * (user_len + output_len)) for k in range(turns)]
    shareable = sum(reusable) / sum(per_session) if per_session else 0.0
    return Workload(
        "multi-turn",
        sessions,
        shareable_share=shareable,
        params={"num_sessions": num_sessions, "turns": turns, "system_len": system_len,
                "user_len": user_len, "output_len": output_len, "seed": seed},
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def read_mooncake_trace(path: Path, limit: int | None = None) -> list[TraceRecord]:
    """Parse a Mooncake JSONL trace; a malformed line is an error naming its line number."""
    records: list[TraceRecord] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rec = TraceRecord(
                    float(obj["timestamp"]), int(obj["input_length"]), int(obj["output_length"]),
                    [int(h) for h in obj.get("hash_ids", [])],
                )  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a Mooncake trace record ({exc})") from None
            if rec.input_length <= 0 or rec.output_length <= 0:
                raise ValueError(f"{path}:{n}: input_length and output_length must be positive")
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    return records


def mooncake_trace(
    records: list[TraceRecord],
    *,
    time_scale: float = 1.0,
    tokens: bool = False,
    token_id_range: tuple[int, int] = (1000, 20000),
    seed: int = 0,
    block_tokens: int = TRACE_BLOCK_TOKENS,
) -> Workload:
    """One request per record at its timestamp × ``time_scale``; same hash id ⇒ same block."""
    if not records:
        raise ValueError("the trace has no records")
    blocks: dict[int, Prompt] = {}

    def block(h: int) -> Prompt:
        b = blocks.get(h)
        if b is None:
            b = _prompt(random.Random(seed * 1_000_003 + h), block_tokens, tokens, token_id_range)
            blocks[h] = b
        return b

    t0 = records[0].timestamp_ms
    sessions: list[Session] = []
    seen: set[tuple[int, ...]] = set()
    shareable = 0
    total = 0
    rng = random.Random(seed)
    for rec in records:
        parts: list[Prompt] = []
        left = rec.input_length
        for h in rec.hash_ids:
            if left <= 0:
                break
            b = block(h)
            take = min(left, block_tokens)
            if take < block_tokens:
                b = Prompt(
                    text=" ".join((b.text or "").split()[:take]) if b.text is not None else None,
                    token_ids=b.token_ids[:take] if b.token_ids is not None else None,
                    target_tokens=take,
                )
            parts.append(b)
            left -= take
        if left > 0:  # records longer than their hash ids: a private tail
            parts.append(_prompt(rng, left, tokens, token_id_range))
        prompt = parts[0]
        for p in parts[1:]:
            prompt = _join(prompt, p)
        # Whole blocks whose full prefix of hash ids appeared before are shareable.
        for i in range(min(len(rec.hash_ids), rec.input_length // block_tokens)):
            key = tuple(rec.hash_ids[: i + 1])
            if key in seen:
                shareable += block_tokens
            seen.add(key)
        total += rec.input_length
        sessions.append(
            Session([Turn(prompt, rec.output_length)], arrival_s=(rec.timestamp_ms - t0) / 1000.0 * time_scale)
        )
    return Workload(
        "mooncake-trace",
        sessions,
        shareable_share=shareable / total if total else 0.0,
        block_size=block_tokens,
        params={"records": len(records), "time_scale": time_scale, "tokens": tokens},
    )
