"""One request's way through the frontend after preprocessing: route, stream, postprocess.

Each choice (``n`` > 1, or a batch of completion prompts) is its own worker request with its own
child context. The pipeline merges their deltas, records the request's metrics, and on any exit
— finished, failed, or the client gone — kills whatever is still running so the workers abort.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from armature.frontend.metrics import FrontendMetrics
from armature.frontend.migration import MigratingStream
from armature.frontend.models import ServedModel
from armature.frontend.parsers import reasoning_parser, tool_call_parser
from armature.frontend.postprocess import ChoiceDelta, ChoicePostprocessor, EngineStreamError
from armature.frontend.preprocess import PreparedChoice, PreparedRequest
from armature.protocols.llm import LLMEngineOutput
from armature.runtime.context import Context


@dataclass
class ChoiceRun:
    index: int
    prepared: PreparedChoice
    post: ChoicePostprocessor
    context: Context
    stream: MigratingStream


class RequestPipeline:
    def __init__(
        self,
        model: ServedModel,
        prepared: PreparedRequest,
        metrics: FrontendMetrics,
        context: Context,
        started_at: float,
        keep_text: bool,
    ) -> None:
        self.model = model
        self.prepared = prepared
        self.metrics = metrics
        self.context = context
        self.started_at = started_at
        tok = model.preprocessor.tokenizer.tokenizer
        self.runs: list[ChoiceRun] = []
        for choice in prepared.choices:
            ctx = context.child()
            post = ChoicePostprocessor(
                tok,
                choice.prompt.token_ids,
                prepared.stop,
                prepared.min_tokens,
                prepared.hidden_stop_ids,
                prepared.skip_special_tokens,
                prepared.logprobs is not None,
                keep_text=keep_text,
                reasoning=reasoning_parser(prepared.reasoning_parser) if prepared.reasoning_parser else None,
                tools=tool_call_parser(prepared.tool_call_parser) if prepared.tool_call_parser else None,
            )
            stream = MigratingStream(model.router, choice.request, ctx, model.migration_limit, metrics)
            self.runs.append(ChoiceRun(choice.index, choice, post, ctx, stream))
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        # Labelled children looked up once: ``labels()`` per token costs a lock and a dict lookup.
        self._ttft = metrics.ttft.labels(model.name)
        self._itl = metrics.itl.labels(model.name)

    async def open(self) -> None:
        """Route every choice; raises before any output (e.g. no instances) so HTTP can say 503."""
        for run in self.runs:
            await run.stream.open()

    def cancel(self) -> None:
        self.context.kill()

    # ------------------------------------------------------------------ usage

    @property
    def prompt_tokens(self) -> int:
        return self.prepared.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(r.post.completion_tokens for r in self.runs)

    @property
    def cached_tokens(self) -> int:
        seen: dict[int, int] = {}
        for r in self.runs:
            key = id(r.prepared.prompt)
            seen[key] = max(seen.get(key, 0), r.post.cached_tokens)
        return sum(seen.values())

    # ------------------------------------------------------------------ streaming

    def _observe(self, delta_tokens: int) -> None:
        if delta_tokens <= 0:
            return
        now = time.monotonic()
        if self._first_token_at is None:
            self._first_token_at = now
            self._ttft.observe(now - self.started_at)
        elif self._last_token_at is not None:
            # Tokens that arrive together share the gap since the previous ones.
            self._itl.observe((now - self._last_token_at) / delta_tokens)
        self._last_token_at = now

    def push_delta(self, run: ChoiceRun) -> Callable[[LLMEngineOutput], str | None]:
        """For outputs taken where they arrive: the text one adds, or None for one that must go
        through iteration (it finishes, fails, carries logprobs, or meets stop strings)."""
        post = run.post

        def take(out: LLMEngineOutput) -> str | None:
            if out.finish_reason is not None or out.error is not None or not post.pushable:
                return None
            before = post.completion_tokens
            delta = post.process(out)
            self._observe(post.completion_tokens - before)
            return delta.text if delta is not None else ""

        return take

    async def _run_one(self, run: ChoiceRun) -> AsyncIterator[tuple[ChoiceRun, list[ChoiceDelta]]]:
        saw_finish = False
        post = run.post
        try:
            async for batch in run.stream.batches():
                before = post.completion_tokens
                deltas: list[ChoiceDelta] = []
                for out in batch:
                    delta = post.process(out)
                    if delta is not None:
                        deltas.append(delta)
                        if delta.finish_reason is not None:
                            saw_finish = True
                            break
                self._observe(post.completion_tokens - before)
                if deltas:
                    yield run, deltas
                if saw_finish:
                    if deltas[-1].stopped_early:
                        run.context.kill()
                    return
            if not saw_finish:
                raise EngineStreamError("the worker's stream ended before the sequence finished")
        finally:
            if not saw_finish:
                run.context.kill()

    def batches(self) -> AsyncIterator[tuple[ChoiceRun, list[ChoiceDelta]]]:
        """Each choice's deltas in bursts (what had arrived when asked), choices interleaved."""
        if len(self.runs) == 1:
            return self._run_one(self.runs[0])  # one generator less per token
        return self._merged()

    async def _merged(self) -> AsyncIterator[tuple[ChoiceRun, list[ChoiceDelta]]]:
        queue: asyncio.Queue[tuple[ChoiceRun, list[ChoiceDelta]] | BaseException | None] = asyncio.Queue()

        async def pump(run: ChoiceRun) -> None:
            try:
                async for item in self._run_one(run):
                    queue.put_nowait(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                queue.put_nowait(exc)
                return
            queue.put_nowait(None)

        tasks = [asyncio.ensure_future(pump(run)) for run in self.runs]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            self.cancel()

    async def deltas(self) -> AsyncIterator[tuple[ChoiceRun, ChoiceDelta]]:
        """Every delta on its own, in order."""
        async for run, deltas in self.batches():
            for delta in deltas:
                yield run, delta

    def record_end(self, ok: bool, endpoint: str, streaming: bool) -> None:
        name = self.model.name
        m = self.metrics
        m.requests.labels(name, endpoint, "stream" if streaming else "unary", "success" if ok else "error").inc()
        m.isl.labels(name).observe(self.prompt_tokens)
        m.osl.labels(name).observe(self.completion_tokens)
        m.duration.labels(name).observe(time.monotonic() - self.started_at)
        first, last = self._first_token_at, self._last_token_at
        worker = self.runs[0].stream.instance_id if self.runs else None
        if ok and worker is not None and first is not None:
            labels = (name, f"{worker:x}")
            m.worker_last_ttft.labels(*labels).set(first - self.started_at)
            m.worker_last_isl.labels(*labels).set(len(self.runs[0].prepared.prompt.token_ids))
            tokens = self.runs[0].post.completion_tokens
            if last is not None and tokens > 1:
                m.worker_last_itl.labels(*labels).set((last - first) / (tokens - 1))
