"""Build OpenAI responses and SSE chunks from a running ``RequestPipeline``.

Streaming keeps one chunk skeleton per choice and only swaps the delta text (and logprobs) before
encoding it with msgspec: nothing per token builds a dict or a pydantic model.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from armature.frontend.detokenize import TokenTextCache
from armature.frontend.http_server import SseSink
from armature.frontend.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobEntry,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    FunctionCall,
    PromptTokensDetails,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
    TopLogprobEntry,
    Usage,
    json_encoder,
)
from armature.frontend.pipeline import ChoiceRun, RequestPipeline
from armature.frontend.postprocess import ChoiceDelta, TokenLogprob
from armature.frontend.sse import DONE, frame
from armature.protocols.llm import LLMEngineOutput, TopLogprob
from armature.runtime.context import new_request_id


def new_id(prefix: str) -> str:
    return f"{prefix}-{new_request_id()}"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def usage_of(p: RequestPipeline) -> Usage:
    prompt, completion = p.prompt_tokens, p.completion_tokens
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(p.cached_tokens))


def _chat_logprobs(texts: TokenTextCache, lps: list[TokenLogprob]) -> ChatLogprobs:
    entries = []
    for lp in lps:
        top = [TopLogprobEntry(texts.text(t.token_id), t.logprob, texts.bytes(t.token_id)) for t in (lp.top or ())]
        entries.append(ChatLogprobEntry(texts.text(lp.token_id), lp.logprob, texts.bytes(lp.token_id), top))
    return ChatLogprobs(entries)


def _top_dict(texts: TokenTextCache, top: list[TopLogprob] | None) -> dict[str, float] | None:
    if top is None:
        return None
    return {texts.text(t.token_id): t.logprob for t in top}


class _CompletionLogprobBuilder:
    """Accumulates the legacy completions logprobs arrays, with text offsets into the choice's text."""

    def __init__(self, texts: TokenTextCache) -> None:
        self.texts = texts
        self.offset = 0

    def build(
        self,
        ids: list[int],
        lps: list[float | None],
        tops: list[list[TopLogprob] | None],
    ) -> CompletionLogprobs:
        tokens, offsets = [], []
        for tid in ids:
            text = self.texts.text(tid)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        top = [_top_dict(self.texts, t) for t in tops]
        return CompletionLogprobs(tokens, lps, top, offsets)

    def prompt(self, run: ChoiceRun) -> CompletionLogprobs:
        ids = run.prepared.prompt.token_ids
        plps = run.post.prompt_logprobs or [None] * len(ids)
        ptop = run.post.prompt_top_logprobs
        tops: list[list[TopLogprob] | None] = [
            (ptop[i] if ptop is not None and i < len(ptop) and i > 0 else None) for i in range(len(ids))
        ]
        lps = [plps[i] if i < len(plps) else None for i in range(len(ids))]
        return self.build(ids, lps, tops)

    def generated(self, lps: list[TokenLogprob]) -> CompletionLogprobs:
        return self.build([lp.token_id for lp in lps], [lp.logprob for lp in lps], [lp.top for lp in lps])


# ---------------------------------------------------------------- plain streams


def _push_plain_tokens(
    p: RequestPipeline, sink: SseSink, may_push: Callable[[], bool], event: Callable[[str], bytes]
) -> None:
    """A plain stream's middle tokens go out from the request plane's frame callback: no task
    wake-up and no trip through the generators per token (~1/10 of the frontend's CPU at 64
    streams). The last token (with usage and [DONE]), anything the connection cannot take now,
    and what comes after a declined output go through iteration, in order."""
    run = p.runs[0]
    take = p.push_delta(run)

    def push(out: LLMEngineOutput) -> bool:
        if not may_push() or not sink.ready():
            return False
        text = take(out)
        if text is None:
            return False
        if text:
            sink.write(event(text))
        return True

    run.stream.install_push(push)


# ---------------------------------------------------------------- chat


async def chat_stream(
    p: RequestPipeline, include_usage: bool, continuous_usage: bool, sink: SseSink | None = None
) -> AsyncIterator[bytes]:
    rid, created, model = new_id("chatcmpl"), int(time.time()), p.model.name
    texts = TokenTextCache(p.model.preprocessor.tokenizer.tokenizer) if p.prepared.logprobs is not None else None
    skeletons: dict[int, ChatCompletionChunk] = {}
    # The role chunks go out in one write with the first delta, and the last delta in one write
    # with the usage chunk and [DONE]: the same events, three socket writes fewer per request.
    head = b""
    for run in p.runs:
        choice = ChatChunkChoice(run.index, ChatDelta(role="assistant", content=""))
        chunk = ChatCompletionChunk(rid, "chat.completion.chunk", created, model, [choice])
        if continuous_usage:
            chunk.usage = usage_of(p)
        head += frame(json_encoder.encode(chunk))
        choice.delta = ChatDelta()
        skeletons[run.index] = chunk
    single = len(p.runs) == 1
    tail = b""
    encode = json_encoder.encode
    parsed = p.prepared.reasoning_parser is not None or p.prepared.tool_call_parser is not None
    calls_sent = {run.index: 0 for run in p.runs}
    if sink is not None and single and texts is None and not continuous_usage and not parsed:
        chunk0 = skeletons[p.runs[0].index]

        def chat_event(text: str) -> bytes:
            choice0 = chunk0.choices[0]
            choice0.delta.content = text
            choice0.finish_reason = None
            choice0.logprobs = None
            return b"data: " + encode(chunk0) + b"\n\n"

        # The role chunk rides with the first delta: that one goes through iteration.
        _push_plain_tokens(p, sink, lambda: not head, chat_event)
    async for run, deltas in p.batches():
        chunk = skeletons[run.index]
        choice = chunk.choices[0]
        # One event (one token's text) per delta; a burst of them goes out in one write.
        out = head
        head = b""
        for delta in deltas:
            structured = bool(delta.reasoning or delta.tool_calls)
            keep = delta.text or (delta.finish_reason is None and not structured)
            choice.delta.content = delta.text if keep else None
            if parsed:
                choice.delta.reasoning_content = delta.reasoning or None
                choice.delta.tool_calls = None
                if delta.tool_calls:
                    first = calls_sent[run.index]
                    calls_sent[run.index] += len(delta.tool_calls)
                    choice.delta.tool_calls = [
                        ToolCallDelta(first + k, new_tool_call_id(), FunctionCall(c.name, c.arguments))
                        for k, c in enumerate(delta.tool_calls)
                    ]
            choice.finish_reason = delta.finish_reason
            choice.logprobs = _chat_logprobs(texts, delta.logprobs) if (texts and delta.logprobs) else None
            if continuous_usage:
                chunk.usage = usage_of(p)
            out += b"data: " + encode(chunk) + b"\n\n"
        if single and deltas[-1].finish_reason is not None:
            tail = out  # the sequence's last deltas: nothing follows but usage and [DONE]
            continue
        yield out
    end = head + tail
    if include_usage:
        final = ChatCompletionChunk(rid, "chat.completion.chunk", created, model, [], usage_of(p))
        end += frame(json_encoder.encode(final))
    yield end + DONE


async def chat_aggregate(p: RequestPipeline) -> bytes:
    texts = TokenTextCache(p.model.preprocessor.tokenizer.tokenizer) if p.prepared.logprobs is not None else None
    lps: dict[int, list[TokenLogprob]] = {r.index: [] for r in p.runs}
    async for run, delta in p.deltas():
        if delta.logprobs:
            lps[run.index].extend(delta.logprobs)
    choices = []
    for run in p.runs:
        post = run.post
        text = "".join(post.text_parts or [])
        logprobs = _chat_logprobs(texts, lps[run.index]) if texts is not None else None
        message = ResponseMessage("assistant", text)
        if post.reasoning_parts is not None:
            # Thinking switched off still leaves the template's empty block: that is no reasoning.
            reasoning = "".join(post.reasoning_parts)
            message.reasoning_content = reasoning if reasoning.strip() else None
        if post.tool_calls:
            message.tool_calls = [
                ToolCall(new_tool_call_id(), FunctionCall(c.name, c.arguments)) for c in post.tool_calls
            ]
            message.content = text if text.strip() else None
        choices.append(ChatChoice(run.index, message, logprobs, post.finish_reason))
    body = ChatCompletion(new_id("chatcmpl"), "chat.completion", int(time.time()), p.model.name, choices, usage_of(p))
    return json_encoder.encode(body)


# ---------------------------------------------------------------- completions


def _echo_text(run: ChoiceRun, p: RequestPipeline) -> str:
    prompt = run.prepared.prompt
    if prompt.text is not None:
        return prompt.text
    return p.model.preprocessor.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)


async def completion_stream(
    p: RequestPipeline, include_usage: bool, continuous_usage: bool, sink: SseSink | None = None
) -> AsyncIterator[bytes]:
    rid, created, model = new_id("cmpl"), int(time.time()), p.model.name
    want_lp = p.prepared.logprobs is not None
    texts = TokenTextCache(p.model.preprocessor.tokenizer.tokenizer) if want_lp else None
    builders = {r.index: _CompletionLogprobBuilder(texts) for r in p.runs} if texts else {}
    skeletons = {
        r.index: CompletionChunk(rid, "text_completion", created, model, [CompletionChoice(r.index, "")])
        for r in p.runs
    }
    echoed: set[int] = set()
    single = len(p.runs) == 1
    tail = b""
    started = False
    if sink is not None and single and not builders and not continuous_usage:
        chunk0 = skeletons[p.runs[0].index]

        def completion_event(text: str) -> bytes:
            choice0 = chunk0.choices[0]
            choice0.text = text
            choice0.finish_reason = None
            choice0.logprobs = None
            return frame(json_encoder.encode(chunk0))

        # The first delta (with the echo, if asked for) goes through iteration.
        _push_plain_tokens(p, sink, lambda: started, completion_event)
    async for run, deltas in p.batches():
        out = b""
        for delta in deltas:
            out += _completion_event(p, run, delta, skeletons, builders, echoed, continuous_usage)
        if single and deltas[-1].finish_reason is not None:
            tail = out  # written with [DONE], as in chat_stream
            continue
        yield out
        started = True
    end = tail
    if include_usage:
        final = CompletionChunk(rid, "text_completion", created, model, [], usage_of(p))
        end += frame(json_encoder.encode(final))
    yield end + DONE


def _completion_event(
    p: RequestPipeline,
    run: ChoiceRun,
    delta: ChoiceDelta,
    skeletons: dict[int, CompletionChunk],
    builders: dict[int, _CompletionLogprobBuilder],
    echoed: set[int],
    continuous_usage: bool,
) -> bytes:
    """One delta of one completion choice as its SSE event."""
    chunk = skeletons[run.index]
    choice = chunk.choices[0]
    text = delta.text
    logprobs = builders[run.index].generated(delta.logprobs or []) if builders else None
    if p.prepared.echo and run.index not in echoed:
        echoed.add(run.index)
        prefix = _echo_text(run, p)
        if builders:
            # Prompt logprobs arrive with the first output, so the echo goes out with it.
            b = builders[run.index]
            gen = delta.logprobs or []
            b.offset = 0
            plp = b.prompt(run)
            glp = b.generated(gen)
            logprobs = CompletionLogprobs(
                plp.tokens + glp.tokens,
                plp.token_logprobs + glp.token_logprobs,
                plp.top_logprobs + glp.top_logprobs,
                plp.text_offset + glp.text_offset,
            )
        text = prefix + text
    choice.text = text
    choice.finish_reason = delta.finish_reason
    choice.logprobs = logprobs
    if continuous_usage:
        chunk.usage = usage_of(p)
    return frame(json_encoder.encode(chunk))


async def completion_aggregate(p: RequestPipeline) -> bytes:
    want_lp = p.prepared.logprobs is not None
    lps: dict[int, list[TokenLogprob]] = {r.index: [] for r in p.runs}
    async for run, delta in p.deltas():
        if delta.logprobs:
            lps[run.index].extend(delta.logprobs)
    texts = TokenTextCache(p.model.preprocessor.tokenizer.tokenizer) if want_lp else None
    choices = []
    for run in p.runs:
        text = "".join(run.post.text_parts or [])
        logprobs = None
        if texts is not None:
            b = _CompletionLogprobBuilder(texts)
            gen = b.generated(lps[run.index]) if not p.prepared.echo else None
            if p.prepared.echo:
                plp = b.prompt(run)
                glp = b.generated(lps[run.index])
                gen = CompletionLogprobs(
                    plp.tokens + glp.tokens,
                    plp.token_logprobs + glp.token_logprobs,
                    plp.top_logprobs + glp.top_logprobs,
                    plp.text_offset + glp.text_offset,
                )
            logprobs = gen
        if p.prepared.echo:
            text = _echo_text(run, p) + text
        choices.append(CompletionChoice(run.index, text, logprobs, run.post.finish_reason))
    body = Completion(new_id("cmpl"), "text_completion", int(time.time()), p.model.name, choices, usage_of(p))
    return json_encoder.encode(body)
