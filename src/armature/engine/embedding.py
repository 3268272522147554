"""Embeddings on the native engine: each prompt forwarded once, its last token pooled.

This is what SGLang does for Llama-family embedding models (e5-mistral, gte-Qwen2,
Qwen3-Embedding): the final-normed hidden state of the last token, L2-normalised. Requests that
arrive while the step loop is busy are answered together, packed into as few forwards as the
prefill token budget allows. Their K/V goes into pages borrowed from the pool and given back as
soon as the forward is done: an embedding never enters the prefix cache, never holds memory
after its answer, and a caller who gives up before its turn costs nothing.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch.nn.functional as F

from armature.engine.api import EncodeOutput, EncodeRequest, EngineError, InvalidRequestError, SamplingParams
from armature.engine.model_executor import ModelExecutor
from armature.engine.scheduler import Req, ScheduledSeq, Scheduler

_Pending = tuple[EncodeRequest, "concurrent.futures.Future[EncodeOutput]"]
RunInLoop = Callable[[Callable[[], None]], "concurrent.futures.Future[None]"]


class EmbeddingBatcher:
    def __init__(
        self,
        executor: ModelExecutor,
        scheduler: Scheduler,
        run_in_loop: RunInLoop,
        token_budget: int,
        context_length: int,
        vocab_size: int,
        paused: Callable[[], bool],
    ) -> None:
        self._executor = executor
        self._scheduler = scheduler
        self._run_in_loop = run_in_loop
        self._token_budget = token_budget
        self._context_length = context_length
        self._vocab_size = vocab_size
        self._paused = paused
        self._page_size = scheduler.page_size
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()

    def validate(self, req: EncodeRequest) -> None:
        n = len(req.input_ids)
        if n == 0:
            raise InvalidRequestError("the input is empty: an embedding needs at least one token")
        if n > self._context_length:
            raise InvalidRequestError(
                f"the input has {n} tokens; this model's context length is {self._context_length}"
            )
        if -(-n // self._page_size) > self._scheduler.allocator.total_pages:
            raise InvalidRequestError(f"the input has {n} tokens, more than the whole KV pool holds")
        bad = next((t for t in req.input_ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary (size {self._vocab_size})")

    def submit(self, req: EncodeRequest) -> concurrent.futures.Future[EncodeOutput]:
        """Queue ``req``; the future is answered from the step loop. Cancel it to give up."""
        self.validate(req)
        fut: concurrent.futures.Future[EncodeOutput] = concurrent.futures.Future()
        with self._lock:
            self._pending.append((req, fut))
            first = len(self._pending) == 1
        if first:
            # One call drains everything queued by the time it runs.
            try:
                call = self._run_in_loop(self._drain)
            except EngineError as exc:
                self.fail_pending(exc)
            else:
                call.add_done_callback(self._on_drain_done)
        return fut

    def _on_drain_done(self, call: concurrent.futures.Future[None]) -> None:
        # Cancelled: the engine shut down with the call still queued, so nobody else will answer.
        if call.cancelled():
            self.fail_pending(EngineError("the engine has been shut down"))

    def fail_pending(self, exc: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for _, fut in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)

    # --- on the step loop ----------------------------------------------------------------

    def resume(self) -> None:
        """On the step loop, once memory is back: answer what waited while it was released."""
        self._drain()

    def _drain(self) -> None:
        with self._lock:
            if self._paused():
                # KV memory is released: keep them queued (later submits join them) until resume.
                return
            pending, self._pending = self._pending, []
        live = [(req, fut) for req, fut in pending if fut.set_running_or_notify_cancel()]
        for group in self._groups(live):
            self._run(group)

    def _groups(self, items: list[_Pending]) -> Iterator[list[_Pending]]:
        room = self._scheduler.room_pages
        group: list[_Pending] = []
        tokens = pages = 0
        for item in items:
            n = len(item[0].input_ids)
            p = -(-n // self._page_size)
            if group and (tokens + n > self._token_budget or pages + p > room):
                yield group
                group, tokens, pages = [], 0, 0
            group.append(item)
            tokens += n
            pages += p
        if group:
            yield group

    def _run(self, group: list[_Pending]) -> None:
        counts = [-(-len(req.input_ids) // self._page_size) for req, _ in group]
        try:
            pages = self._scheduler.borrow_pages(sum(counts))
        except EngineError as exc:  # running requests hold the pool: this group waits no longer
            for _, fut in group:
                fut.set_exception(exc)
            return
        try:
            seqs: list[ScheduledSeq] = []
            start = 0
            for (req, _), count in zip(group, counts, strict=True):
                owned = pages[start : start + count]
                start += count
                r = Req(rid=req.rid, input_ids=req.input_ids, sampling=SamplingParams(), stop_ids=frozenset())
                r.pages = owned
                seqs.append(
                    ScheduledSeq(
                        r, prefix_len=0, extend_len=len(req.input_ids), sample=True, prompt_logprobs=False
                    )
                )
            vectors = F.normalize(self._executor.embed(seqs), dim=-1).cpu()
        except Exception as exc:  # noqa: BLE001 - a failed forward fails its requests, not the engine
            for _, fut in group:
                fut.set_exception(
                    exc if isinstance(exc, EngineError) else EngineError(f"embedding forward failed: {exc!r}")
                )
            return
        finally:
            self._scheduler.return_pages(pages)
        rows: list[Any] = vectors.tolist()
        for (req, fut), row in zip(group, rows, strict=True):
            fut.set_result(EncodeOutput(rid=req.rid, embedding=row, prompt_tokens=len(req.input_ids)))
