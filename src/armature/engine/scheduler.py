"""Continuous batching over a paged KV pool with a radix prefix cache.

One ``step()`` schedules a batch, hands it to a ``StepExecutor`` (the model runner + sampler of
the native engine, or the mocker's simulated runner), and turns the results into streamed
``GenerateOutput`` deltas. The scheduler is plain single-threaded state: the engine drives it
from its own thread and serialises every submission and abort into that thread.

Page ownership (the invariant the tests check): a page is free in the allocator, owned by a node
of the prefix cache, or owned privately by exactly one running request. A request's page table is
``pages[:cached_pages]`` (cache pages, kept alive by a lock on ``last_node``) followed by private
pages. Finishing, aborting or retracting a request gives its full pages to the cache and its
private rest back to the allocator, so with no running requests ``free + cached == total``.

Every request is "forward ``fill_ids[kv_len:]``, then sample": a new prompt, a chunk of one, a
decode step (one pending token) and the recompute of a retracted request are the same thing.

Overlap schedule (``overlap_schedule``, GPU): the step launches the next batch before it reads
the previous batch's sampled tokens, so the host's bookkeeping runs while the GPU computes. A
launched request's unknown token sits in ``output_ids`` as ``PLACEHOLDER`` (the executor feeds the
device-side value to the next forward) until the previous batch completes; ``kv_len`` counts the
tokens whose K/V is computed or being computed. A request that turns out to have stopped in the
previous batch has at most one more token computed and dropped. Everything runs on one device
stream, so work launched later always sees the K/V written by work launched earlier.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from armature.engine.api import (
    EngineError,
    EngineFinishReason,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    LoadMetrics,
    SamplingParams,
)
from armature.engine.forward_batch import ForwardMode
from armature.engine.radix_cache import NoPrefixCache, RadixCache, RadixNode
from armature.engine.sampler import make_generator
from armature.protocols.kv_events import EngineKvEvent

# SGLang's defaults for estimating how many of a running request's remaining tokens will really
# be generated (most stop well before max_new_tokens): start pessimistic, decay, reset on retract.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
# Reserve at most this many future tokens per running request when admitting new ones.
_RESERVE_CAP_TOKENS = 4096
# A sampled token the host has not read yet (overlap schedule); never a valid token id.
PLACEHOLDER = -1


class PageAllocator(Protocol):
    """Hands out KV pages; ``KVPool`` is one, the mocker's page counter another."""

    @property
    def total_pages(self) -> int: ...

    @property
    def free_pages(self) -> int: ...

    def alloc(self, n: int) -> list[int]: ...

    def free(self, pages: list[int]) -> None: ...


class ReqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int | None = None
    lora_name: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    kv_len: int = 0  # tokens of fill_ids whose K/V is in the pool
    pages: list[int] = field(default_factory=list)
    cached_pages: int = 0  # leading pages owned by the prefix cache
    last_node: RadixNode | None = None  # locked while running
    admit_seq: int = -1
    cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    num_retractions: int = 0
    sent: int = 0  # output tokens already streamed (never re-sent after a retraction)
    first_sent: bool = False
    # Prompt logprobs: entry i is log p(input[i] | input[:i]); filled chunk by chunk.
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: EngineFinishReason | None = None
    matched_stop: int | None = None
    error: str | None = None
    # Overlap schedule: (launch handle, row) of the in-flight sample behind a PLACEHOLDER.
    future: tuple[object, int] | None = None

    @property
    def fill_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        return self.fill_len - self.kv_len

    def fill_slice(self, start: int, end: int) -> list[int]:
        n_in = len(self.input_ids)
        if end <= n_in:
            return self.input_ids[start:end]
        if start >= n_in:
            return self.output_ids[start - n_in : end - n_in]
        return self.input_ids[start:] + self.output_ids[: end - n_in]

    @property
    def wants_prompt_logprobs(self) -> bool:
        # Once streamed, prompt logprobs are never recomputed (e.g. after a retraction).
        return self.logprob_start_len is not None and self.input_logprobs is not None and not self.first_sent


@dataclass
class ScheduledSeq:
    req: Req
    prefix_len: int  # tokens already in the KV pool
    extend_len: int  # tokens forwarded now
    sample: bool  # this forward reaches the end of fill_ids: sample the next token
    prompt_logprobs: bool  # return logits for every new token (prompt logprobs)

    def input_ids(self) -> list[int]:
        return self.req.fill_slice(self.prefix_len, self.prefix_len + self.extend_len)


@dataclass
class ScheduledBatch:
    mode: ForwardMode
    seqs: list[ScheduledSeq]
    active_pages: int  # pages held by running requests at this step (the mocker's timing input)
    started: float = 0.0  # perf_counter() when the scheduler began this step

    @property
    def num_new_tokens(self) -> int:
        return sum(s.extend_len for s in self.seqs)


@dataclass
class SeqResult:
    token_id: int | None = None  # sampled token when ScheduledSeq.sample
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # Prompt logprobs for targets fill_ids[prefix+1 : prefix+extend+1] (as many as exist).
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


class StepExecutor(Protocol):
    """Runs one scheduled batch: forward + sample (native), or a timed simulation (mocker)."""

    @property
    def allocator(self) -> PageAllocator: ...

    def execute(self, batch: ScheduledBatch) -> list[SeqResult]: ...


class OverlapExecutor(StepExecutor, Protocol):
    """An executor that can start a batch and hand back its results later (overlap schedule)."""

    def can_overlap(self, batch: ScheduledBatch) -> bool: ...

    def launch(self, batch: ScheduledBatch) -> object: ...

    def collect(self, launched: object) -> list[SeqResult]: ...


@dataclass
class _Booked:
    """One sequence of a launched batch: where its sampled token goes once it is read."""

    seq: ScheduledSeq
    out_idx: int | None  # index in output_ids of the PLACEHOLDER; None when nothing is sampled
    retractions: int  # the request's retraction count at launch: a retracted one drops its result


@dataclass
class SchedulerConfig:
    page_size: int
    context_length: int
    vocab_size: int
    eos_token_ids: Sequence[int] = ()
    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = 8192  # None: whole prompts only
    enable_mixed_chunk: bool = False
    disable_radix_cache: bool = False
    stream_interval: int = 1
    watermark_pages: int = 0  # admission keeps this many pages free (the mocker's watermark)
    random_seed: int = 0
    overlap_schedule: bool = False  # needs an OverlapExecutor


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    retractions: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0
    peak_batch: int = 0  # most requests in one forward


class Scheduler:
    def __init__(self, config: SchedulerConfig, executor: StepExecutor) -> None:
        self.config = config
        self.executor = executor
        self.allocator = executor.allocator
        self.page_size = config.page_size
        self.events: list[EngineKvEvent] = []
        cache_cls = NoPrefixCache if config.disable_radix_cache else RadixCache
        self.cache: RadixCache = cache_cls(config.page_size, self.allocator.free, self.events.append)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reqs: dict[str, Req] = {}
        self.stats = SchedulerStats()
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self._admit_counter = 0
        self._eos = frozenset(config.eos_token_ids)
        self._inflight: tuple[ScheduledBatch, object, list[_Booked]] | None = None

    # --- requests in ---------------------------------------------------------------------

    def validate(self, req: GenerateRequest) -> None:
        """Raise ``InvalidRequestError`` for a request this scheduler can never serve."""
        req.sampling.validate()
        n = len(req.input_ids)
        ctx = self.config.context_length
        if n == 0:
            raise InvalidRequestError("the prompt is empty (no input token ids)")
        if n >= ctx:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context length is {ctx}, so the prompt must be "
                f"shorter than {ctx} tokens"
            )
        vocab = self.config.vocab_size
        bad = next((t for t in req.input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"input token id {bad} is outside the vocabulary [0, {vocab})")
        if req.top_logprobs_num < 0:
            raise InvalidRequestError("top_logprobs_num must be >= 0")
        if req.logprob_start_len is not None and not 0 <= req.logprob_start_len <= n:
            raise InvalidRequestError(f"logprob_start_len must be in [0, {n}], got {req.logprob_start_len}")
        total = min(n + req.sampling.max_new_tokens, ctx)
        need = -(-total // self.page_size)
        if need > self.allocator.total_pages:
            raise InvalidRequestError(
                f"prompt + max_new_tokens needs {total} tokens of KV cache, more than the whole pool "
                f"({self.allocator.total_pages * self.page_size} tokens); lower max_new_tokens"
            )
        if req.rid in self.reqs:
            raise InvalidRequestError(f"request id {req.rid!r} is already in use")

    def add_request(self, req: GenerateRequest) -> Req:
        self.validate(req)
        p = req.sampling
        stop = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop |= self._eos
        r = Req(
            rid=req.rid,
            input_ids=list(req.input_ids),
            sampling=p,
            stop_ids=frozenset(stop),
            return_logprob=req.return_logprob,
            top_logprobs_num=req.top_logprobs_num,
            logprob_start_len=req.logprob_start_len,
            lora_name=req.lora_name,
            generator=make_generator(p.seed) if p.seed is not None else None,
        )
        if req.logprob_start_len is not None:
            r.input_logprobs = [None] * len(r.input_ids)
            if req.top_logprobs_num > 0:
                r.input_top_logprobs = [[] for _ in r.input_ids]
        self.reqs[r.rid] = r
        self.waiting.append(r)
        return r

    def abort(self, rid: str, reason: str = "aborted by the caller") -> GenerateOutput | None:
        """Abort in any phase; frees the request's pages now. None if the rid is unknown."""
        r = self.reqs.get(rid)
        if r is None:
            return None
        if r.status is ReqStatus.WAITING:
            self.waiting.remove(r)
        elif r.status is ReqStatus.RUNNING:
            self.running.remove(r)
            self._release(r)
        r.finish_reason = EngineFinishReason.ABORT
        r.error = reason
        self.stats.aborted += 1
        return self._finish(r)

    def abort_all(self, reason: str) -> list[GenerateOutput]:
        self._inflight = None
        return [o for rid in list(self.reqs) if (o := self.abort(rid, reason)) is not None]

    # --- state ---------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running) or self._inflight is not None

    def private_pages(self) -> int:
        return sum(len(r.pages) - r.cached_pages for r in self.running)

    def check_accounting(self) -> None:
        """free + cached + private == total (raises AssertionError with the numbers if not)."""
        free = self.allocator.free_pages
        cached = self.cache.total_pages
        private = self.private_pages()
        total = self.allocator.total_pages
        if free + cached + private != total:
            raise AssertionError(f"page leak: free {free} + cached {cached} + private {private} != {total}")

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_active_blocks=self.private_pages() + self.cache.protected_pages,
            kv_cached_blocks=self.cache.evictable_pages,
            kv_total_blocks=self.allocator.total_pages,
            cache_hit_rate=(
                self.stats.cached_prompt_tokens / self.stats.prompt_tokens if self.stats.prompt_tokens else 0.0
            ),
            num_retractions=self.stats.retractions,
        )

    def take_events(self) -> list[EngineKvEvent]:
        out = self.events[:]
        self.events.clear()
        return out

    def flush_cache(self) -> bool:
        """Drop every cached page; refused (False) while requests are in flight, as SGLang does."""
        if self.has_work:
            return False
        self.cache.reset()
        return True

    # --- pages ---------------------------------------------------------------------------

    def _available(self) -> int:
        return self.allocator.free_pages + self.cache.evictable_pages

    @property
    def room_pages(self) -> int:
        """Pages that work outside the schedule could borrow now (free or evictable)."""
        return self._available()

    def borrow_pages(self, n: int) -> list[int]:
        """``n`` pages for a forward outside the schedule (embeddings), evicting cached prefixes if
        need be. Running requests keep theirs. Give them back with ``return_pages``."""
        if n > self._available():
            raise EngineError(f"the KV pool has room for {self._available()} pages now; {n} are needed")
        return self._alloc(n)

    def return_pages(self, pages: list[int]) -> None:
        self.allocator.free(pages)

    def _alloc(self, n: int) -> list[int]:
        short = n - self.allocator.free_pages
        if short > 0:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def _pages_for(self, r: Req, upto_tokens: int) -> int:
        return max(0, -(-upto_tokens // self.page_size) - len(r.pages))

    def _lock(self, r: Req, node: RadixNode | None) -> None:
        if node is not None and node is not self.cache.root:
            self.cache.lock(node)
        if r.last_node is not None and r.last_node is not self.cache.root:
            self.cache.unlock(r.last_node)
        r.last_node = node

    def _cache_computed(self, r: Req) -> None:
        """Give the full pages of ``fill_ids[:kv_len]`` to the prefix cache (dedup with it)."""
        if not self.cache.enabled:
            return
        # Never key the cache by a token the host has not read yet (overlap schedule).
        full = min(r.kv_len, r.fill_len - _unread(r)) // self.page_size
        if full <= r.cached_pages:
            return
        res = self.cache.insert(r.fill_slice(0, full * self.page_size), r.pages[:full])
        if res.duplicates:
            self.allocator.free(res.duplicates)
        r.pages[:full] = res.pages
        r.cached_pages = full
        self._lock(r, res.node)

    def _release(self, r: Req) -> None:
        """Cache what was computed, free the private rest, unlock. The request holds nothing after."""
        self._cache_computed(r)
        private = r.pages[r.cached_pages :]
        if private:
            self.allocator.free(private)
        self._lock(r, None)
        r.pages = []
        r.cached_pages = 0
        r.kv_len = 0

    def _retract(self, r: Req) -> None:
        # A token still in flight is dropped: it was never streamed and is recomputed later.
        del r.output_ids[len(r.output_ids) - _unread(r) :]
        r.future = None
        self.running.remove(r)
        self._release(r)
        r.status = ReqStatus.WAITING
        r.num_retractions += 1
        self.stats.retractions += 1
        self.waiting.appendleft(r)
        # We were too optimistic about how much room decodes need: admit more carefully again.
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def _ensure_pages(self, n: int, keep: set[int], admitted_after: int) -> bool:
        """Make ``n`` pages allocatable for a prefill chunk by retracting running requests admitted
        after ``admitted_after``, youngest first; False, retracting nobody, if that cannot do it.

        Never an older request: two re-admitted requests could otherwise retract each other's
        prefill in turn while the older ones never got a decode step. And never in vain: a
        request retracted for a chunk that still does not fit comes straight back and is
        prefilled again, step after step, while the decodes that would free pages never run.
        The chunk waits instead; the decode step retracts if it must.
        """
        if self._available() >= n:
            return True
        victims = sorted(
            (r for r in self.running if id(r) not in keep and r.admit_seq > admitted_after),
            key=lambda r: r.admit_seq,
            reverse=True,
        )
        # What retracting them frees for certain: their private pages (cached ones may stay locked).
        if self._available() + sum(len(r.pages) - r.cached_pages for r in victims) < n:
            return False
        for r in victims:
            if self._available() >= n:
                break
            self._retract(r)
        return self._available() >= n

    def _reserve_pages(self, reqs: Sequence[Req]) -> int:
        tokens = 0.0
        for r in reqs:
            left = min(r.sampling.max_new_tokens - len(r.output_ids), _RESERVE_CAP_TOKENS)
            tokens += max(0, left) * self.new_token_ratio
        return int(tokens) // self.page_size + len(reqs)

    # --- scheduling ----------------------------------------------------------------------

    def _prefill_budget(self) -> int:
        chunk = self.config.chunked_prefill_size
        return min(self.config.max_prefill_tokens, chunk) if chunk else self.config.max_prefill_tokens

    def _schedule(self) -> ScheduledBatch | None:
        prefill = self._schedule_prefill()
        if prefill and not self.config.enable_mixed_chunk:
            return ScheduledBatch(ForwardMode.EXTEND, prefill, self._active_pages())
        decode = self._schedule_decode(exclude={id(s.req) for s in prefill})
        # Retraction for decode pages may have pulled back a request scheduled for prefill.
        prefill = [s for s in prefill if s.req.status is ReqStatus.RUNNING]
        seqs = prefill + decode
        if not seqs:
            return None
        mode = ForwardMode.EXTEND if prefill else ForwardMode.DECODE
        return ScheduledBatch(mode, seqs, self._active_pages())

    def _active_pages(self) -> int:
        return self.private_pages() + self.cache.protected_pages

    def _chunk(self, r: Req, budget: int, first: bool) -> int:
        want = r.pending
        if self.config.chunked_prefill_size:
            return min(want, budget)
        return want if (want <= budget or first) else 0

    def _schedule_prefill(self) -> list[ScheduledSeq]:
        budget = self._prefill_budget()
        seqs: list[ScheduledSeq] = []
        keep: set[int] = set()
        # Requests in the middle of a chunked prefill go first (their pages are already held).
        for r in list(self.running):
            if budget <= 0:
                break
            if r.status is not ReqStatus.RUNNING or len(r.input_ids) + len(r.output_ids) - r.kv_len <= 1:
                continue
            n = self._chunk(r, budget, not seqs)
            if n <= 0:
                continue
            need = self._pages_for(r, r.kv_len + n)
            keep.add(id(r))
            if not self._ensure_pages(need, keep, r.admit_seq):
                keep.discard(id(r))
                continue
            r.pages.extend(self._alloc(need))
            seqs.append(self._seq(r, n))
            budget -= n
        held: list[Req] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            r = self.waiting[0]
            if self._prefix_in_flight(r):
                held.append(self.waiting.popleft())
                continue
            if not self._admit(r, budget, first=not seqs):
                break
            self.waiting.popleft()
            n = self._chunk(r, budget, not seqs)
            seqs.append(self._seq(r, n))
            budget -= n
        self.waiting.extendleft(reversed(held))  # first in line again, in their order
        return seqs

    def _prefix_in_flight(self, r: Req) -> bool:
        """A running request is computing pages of ``r``'s prompt that are not cached yet.

        Admitting ``r`` now would compute them a second time (SGLang's in-batch prefix caching
        check): it waits until they are in the cache, at most as long as that prefill takes.
        """
        if not self.cache.enabled or r.kv_len or r.num_retractions:
            return False
        ps = self.page_size
        prompt = r.input_ids
        first = prompt[:ps]
        if len(first) < ps:
            return False
        for p in self.running:
            other = p.input_ids
            # Pages p has not given to the cache yet, and whether r shares any of them.
            start = p.cached_pages * ps
            if start >= len(other) - ps + 1 or other[:ps] != first:
                continue
            shared = 0
            limit = min(len(prompt), len(other)) // ps
            while shared < limit and prompt[shared * ps : (shared + 1) * ps] == other[shared * ps : (shared + 1) * ps]:
                shared += 1
            if shared > p.cached_pages:
                return True
        return False

    def _admit(self, r: Req, budget: int, first: bool) -> bool:
        # Keep at least one token to compute (its logits give the next token), and when prompt
        # logprobs are asked for, compute every position from logprob_start_len on.
        limit = r.fill_len - 1
        if r.wants_prompt_logprobs and r.logprob_start_len is not None:
            limit = min(limit, max(0, r.logprob_start_len - 1))
        match = self.cache.match_prefix(r.fill_slice(0, limit))
        prefix = match.num_pages * self.page_size
        if not self.config.chunked_prefill_size and not first and r.fill_len - prefix > budget:
            return False
        n = min(r.fill_len - prefix, budget) if self.config.chunked_prefill_size else r.fill_len - prefix
        self._lock(r, match.node)  # protect the match from the eviction our allocation may do
        need = -(-(prefix + n) // self.page_size) - match.num_pages
        avail = self._available()
        if self.running:
            avail -= self._reserve_pages(self.running) + self.config.watermark_pages
        if need > avail:
            self._lock(r, None)
            return False
        r.pages = list(match.pages) + self._alloc(need)
        r.cached_pages = match.num_pages
        r.kv_len = prefix
        r.status = ReqStatus.RUNNING
        r.admit_seq = self._admit_counter
        self._admit_counter += 1
        if r.cached_tokens < 0:
            r.cached_tokens = prefix
            self.stats.prompt_tokens += len(r.input_ids)
            self.stats.cached_prompt_tokens += prefix
        self.running.append(r)
        return True

    def _seq(self, r: Req, n: int) -> ScheduledSeq:
        end = r.kv_len + n
        want_lp = r.wants_prompt_logprobs and r.kv_len < len(r.input_ids)
        return ScheduledSeq(r, r.kv_len, n, sample=end == r.fill_len, prompt_logprobs=want_lp)

    def _schedule_decode(self, exclude: set[int]) -> list[ScheduledSeq]:
        # One pass over the running requests (this runs every step for every decoding request):
        # those with exactly one pending token, and whether that token starts a new page.
        page = self.page_size
        reqs: list[Req] = []
        grows: list[bool] = []
        ctx = self.config.context_length
        for r in self.running:
            n_out = len(r.output_ids)
            fill = len(r.input_ids) + n_out
            if fill - r.kv_len != 1 or (exclude and id(r) in exclude):
                continue
            if n_out and (n_out >= r.sampling.max_new_tokens or fill >= ctx):
                continue  # finished by length in the batch in flight (overlap schedule)
            reqs.append(r)
            grows.append(-(-fill // page) > len(r.pages))
        need = sum(grows)
        while reqs and self._available() < need:
            # Out of pages: retract the youngest running request (never one of this step's
            # prefills) and try again; it is recomputed later from its tokens, never lost.
            victims = [r for r in self.running if id(r) not in exclude]
            victim = max(victims, key=lambda r: r.admit_seq)
            self._retract(victim)
            kept = [(r, g) for r, g in zip(reqs, grows) if r is not victim]
            reqs, grows = [r for r, _ in kept], [g for _, g in kept]
            need = sum(grows)
        seqs = []
        for r, grow in zip(reqs, grows):
            if grow:
                r.pages.extend(self._alloc(1))
            seqs.append(ScheduledSeq(r, r.kv_len, 1, True, False))
        if seqs:
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return seqs

    # --- one step ------------------------------------------------------------------------

    def step(self) -> list[GenerateOutput]:
        if self.config.overlap_schedule:
            return self._step_overlap()
        return self._step_sync()

    def _step_sync(self) -> list[GenerateOutput]:
        started = time.perf_counter()
        batch = self._schedule()
        if batch is None:
            return []
        batch.started = started
        results = self.executor.execute(batch)
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, len(batch.seqs))
        # Booked after the forward, so the executor saw no placeholder; completed at once.
        return self._complete(batch, results, self._book(batch, None))

    def _step_overlap(self) -> list[GenerateOutput]:
        started = time.perf_counter()
        executor: OverlapExecutor = self.executor  # type: ignore[assignment]
        prev, self._inflight = self._inflight, None
        outputs: list[GenerateOutput] = []
        batch = self._schedule()
        if batch is not None and prev is not None and not executor.can_overlap(batch):
            # This batch needs the host to know the previous tokens (penalties, logprobs).
            outputs.extend(self._collect(prev))
            prev = None
            batch.seqs = [s for s in batch.seqs if s.req.status is ReqStatus.RUNNING]
        if batch is not None and batch.seqs:
            batch.started = started
            launched = executor.launch(batch)
            self._inflight = (batch, launched, self._book(batch, launched))
            self.stats.steps += 1
            self.stats.peak_batch = max(self.stats.peak_batch, len(batch.seqs))
        if prev is not None:
            outputs.extend(self._collect(prev))
        return outputs

    def _book(self, batch: ScheduledBatch, launched: object) -> list[_Booked]:
        """Advance ``kv_len`` past the batch's tokens and hold a PLACEHOLDER for each sample."""
        booked: list[_Booked] = []
        row = 0
        for s in batch.seqs:
            r = s.req
            r.kv_len += s.extend_len
            idx = None
            if s.sample:
                if r.sampling.max_new_tokens > 0:
                    idx = len(r.output_ids)
                    r.output_ids.append(PLACEHOLDER)
                    r.future = (launched, row)
                row += 1
            booked.append(_Booked(s, idx, r.num_retractions))
        return booked

    def _collect(self, inflight: tuple[ScheduledBatch, object, list[_Booked]]) -> list[GenerateOutput]:
        batch, launched, booked = inflight
        return self._complete(batch, self.executor.collect(launched), booked)  # type: ignore[attr-defined]

    def _complete(self, batch: ScheduledBatch, results: list[SeqResult], booked: list[_Booked]) -> list[GenerateOutput]:
        """Put each sampled token where its placeholder is, then finish or stream the request."""
        outputs: list[GenerateOutput] = []
        for b, res in zip(booked, results):
            seq, r = b.seq, b.seq.req
            if r.status is not ReqStatus.RUNNING or r.num_retractions != b.retractions:
                continue
            if b.out_idx is not None:
                assert res.token_id is not None
                r.output_ids[b.out_idx] = res.token_id
                if not _unread(r):  # else it points at the launch after this one
                    r.future = None
            if seq.prompt_logprobs and res.prompt_logprobs is not None:
                self._store_prompt_logprobs(r, seq, res)
            if batch.mode is ForwardMode.EXTEND and seq.extend_len > 1:
                self._cache_computed(r)
            if not seq.sample:
                continue
            if b.out_idx is None:
                r.finish_reason = EngineFinishReason.LENGTH
            else:
                self._check_token(r, res, b.out_idx + 1)
            if r.finish_reason is not None:
                # It may also sit in the batch launched after this one: drop that token.
                if b.out_idx is not None:
                    del r.output_ids[b.out_idx + 1 :]
                    r.kv_len = min(r.kv_len, r.fill_len - 1)
                r.future = None
                self.running.remove(r)
                self._release(r)
                self.stats.finished += 1
                outputs.append(self._finish(r))
            elif len(r.output_ids) - _unread(r) - r.sent >= self.config.stream_interval or not r.first_sent:
                outputs.append(self._delta(r))
        return outputs

    def _check_token(self, r: Req, res: SeqResult, n_out: int) -> None:
        """Record the logprobs of output token ``n_out - 1`` and decide whether it finishes ``r``."""
        tok = r.output_ids[n_out - 1]
        if r.return_logprob:
            r.output_logprobs.append(res.logprob if res.logprob is not None else float("nan"))
            if r.top_logprobs_num > 0:
                r.output_top_logprobs.append(res.top_logprobs or [])
        p = r.sampling
        if tok in r.stop_ids and n_out >= p.min_new_tokens:
            r.finish_reason = EngineFinishReason.STOP
            r.matched_stop = tok
        elif n_out >= p.max_new_tokens or len(r.input_ids) + n_out >= self.config.context_length:
            r.finish_reason = EngineFinishReason.LENGTH

    def _append_token(self, r: Req, res: SeqResult) -> None:
        assert res.token_id is not None
        r.output_ids.append(res.token_id)
        self._check_token(r, res, len(r.output_ids))

    def _store_prompt_logprobs(self, r: Req, seq: ScheduledSeq, res: SeqResult) -> None:
        assert r.input_logprobs is not None and res.prompt_logprobs is not None
        start = r.logprob_start_len or 0
        for j, lp in enumerate(res.prompt_logprobs):
            pos = seq.prefix_len + j + 1  # the target token's position
            if pos >= len(r.input_ids):
                break
            if pos >= max(1, start):
                r.input_logprobs[pos] = lp
                if r.input_top_logprobs is not None and res.prompt_top_logprobs is not None:
                    r.input_top_logprobs[pos] = res.prompt_top_logprobs[j]

    def _delta(self, r: Req) -> GenerateOutput:
        lo, hi = r.sent, len(r.output_ids) - _unread(r)
        out = GenerateOutput(
            rid=r.rid,
            token_ids=r.output_ids[lo:hi],
            prompt_tokens=len(r.input_ids),
            completion_tokens=hi,
            cached_tokens=max(0, r.cached_tokens),
        )
        if r.return_logprob:
            out.logprobs = r.output_logprobs[lo:hi]
            if r.top_logprobs_num > 0:
                out.top_logprobs = r.output_top_logprobs[lo:hi]
        if not r.first_sent:
            r.first_sent = True
            if r.input_logprobs is not None:
                out.input_logprobs = r.input_logprobs
                out.input_top_logprobs = r.input_top_logprobs
        r.sent = hi
        return out

    def _finish(self, r: Req) -> GenerateOutput:
        r.status = ReqStatus.FINISHED
        self.reqs.pop(r.rid, None)
        out = self._delta(r)
        out.finish_reason = r.finish_reason
        out.matched_stop = r.matched_stop
        out.error = r.error
        return out


def _unread(r: Req) -> int:
    """Trailing output tokens still in flight (overlap schedule): 0, 1 or 2."""
    n = 0
    out = r.output_ids
    while n < len(out) and out[-1 - n] == PLACEHOLDER:
        n += 1
    return n
