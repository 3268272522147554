"""Engine output → client-visible text, per choice: detokenize, jail stop strings, finish reasons.

One ``ChoicePostprocessor`` follows one generated sequence. It turns each ``LLMEngineOutput``
delta into the text the client may see now, the logprobs that go with that text, and, at the
end, the OpenAI finish reason. Hidden stop ids (EOS) are never shown; a stop string ends the
sequence early and the caller must then stop the engine request.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from armature.frontend.detokenize import IncrementalDetokenizer
from armature.frontend.parsers import ParsedToolCall, ReasoningParser, ToolCallParser
from armature.frontend.stop_jail import StopStringJail
from armature.protocols.llm import FinishReason, LLMEngineOutput, TopLogprob


class EngineStreamError(RuntimeError):
    """The worker reported an error for this sequence (not a transport failure)."""


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] | None


@dataclass(slots=True)
class ChoiceDelta:
    text: str  # content: with output parsers, what is neither reasoning nor a tool call
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # True when the frontend ended the sequence (stop string) and the engine is still running.
    stopped_early: bool = False
    reasoning: str = ""
    tool_calls: list[ParsedToolCall] | None = None


_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


class ChoicePostprocessor:
    __slots__ = (
        "_detok", "_jail", "_jailing", "_min_tokens", "_hidden", "_want_logprobs", "_pending_lp",
        "_reasoning", "_tools", "completion_tokens", "cached_tokens", "finish_reason", "prompt_logprobs",
        "prompt_top_logprobs", "text_parts", "reasoning_parts", "tool_calls",
    )  # fmt: skip

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: list[str],
        min_tokens: int,
        hidden_stop_ids: frozenset[int],
        skip_special_tokens: bool,
        want_logprobs: bool,
        keep_text: bool = False,
        reasoning: ReasoningParser | None = None,
        tools: ToolCallParser | None = None,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self._jail = StopStringJail(stop)
        self._jailing = self._jail.active  # stop strings never change: not a property call per token
        self._min_tokens = min_tokens
        self._hidden = hidden_stop_ids
        self._want_logprobs = want_logprobs
        self._pending_lp: list[TokenLogprob] = []
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[TopLogprob]] | None = None
        self.text_parts: list[str] | None = [] if keep_text else None
        # Output parsers (chat): reasoning first, then tool calls in what is left.
        self._reasoning = reasoning
        self._tools = tools
        self.reasoning_parts: list[str] | None = [] if keep_text and reasoning is not None else None
        self.tool_calls: list[ParsedToolCall] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pushable(self) -> bool:
        """An output can become text here without iteration: no stop strings held, no logprobs."""
        return (
            not self._jailing
            and not self._want_logprobs
            and self.finish_reason is None
            and self._reasoning is None
            and self._tools is None
        )

    def process(self, out: LLMEngineOutput) -> ChoiceDelta | None:
        """The client-visible delta for one engine output (None when nothing to show yet)."""
        if self.finish_reason is not None:
            return None
        if out.error is not None or out.finish_reason is FinishReason.ERROR:
            raise EngineStreamError(out.error or "the worker failed this request")
        if out.usage is not None:
            self.cached_tokens = out.usage.cached_tokens
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top_logprobs = out.prompt_top_logprobs
        ids = out.token_ids
        last = len(ids) - 1
        ends_on_stop_id = out.finish_reason is FinishReason.STOP
        pieces: list[str] = []
        stopped_early = False
        for i, tid in enumerate(ids):
            self.completion_tokens += 1
            if self._want_logprobs and out.log_probs is not None and i < len(out.log_probs):
                top = out.top_logprobs[i] if out.top_logprobs is not None and i < len(out.top_logprobs) else None
                self._pending_lp.append(TokenLogprob(tid, out.log_probs[i], top))
            if i == last and ends_on_stop_id and (tid == out.matched_stop or tid in self._hidden):
                # The stop id itself (EOS or a hidden user id) is not part of the answer.
                continue
            text = self._detok.step(tid)
            if not text:
                continue
            if self._jailing and self.completion_tokens >= self._min_tokens:
                res = self._jail.push(text)
                if res.text:
                    pieces.append(res.text)
                if res.stopped:
                    self.finish_reason = "stop"
                    stopped_early = out.finish_reason is None
                    break
            else:
                pieces.append(text)
        if self.finish_reason is None and out.finish_reason is not None:
            if out.finish_reason is FinishReason.CANCELLED:
                raise EngineStreamError("the worker cancelled this request")
            pieces.append(self._jail.flush())
            self.finish_reason = _FINISH[out.finish_reason]
        text = "".join(pieces)
        reasoning = ""
        calls: list[ParsedToolCall] | None = None
        if self._reasoning is not None or self._tools is not None:
            text, reasoning, calls = self._parse(text)
        if self.text_parts is not None and text:
            self.text_parts.append(text)
        if not text and not reasoning and not calls and self.finish_reason is None:
            return None
        lps: list[TokenLogprob] | None = None
        if self._pending_lp:
            lps, self._pending_lp = self._pending_lp, []
        return ChoiceDelta(text, lps, self.finish_reason, stopped_early, reasoning, calls)

    def _parse(self, text: str) -> tuple[str, str, list[ParsedToolCall] | None]:
        """Split visible text into content, reasoning and tool calls; the sequence's end flushes
        what the parsers held back."""
        final = self.finish_reason is not None
        reasoning = ""
        if self._reasoning is not None:
            reasoning, text = self._reasoning.feed(text)
            if final:
                more_reasoning, more_text = self._reasoning.flush()
                reasoning += more_reasoning
                text += more_text
            if self.reasoning_parts is not None and reasoning:
                self.reasoning_parts.append(reasoning)
        calls: list[ParsedToolCall] = []
        if self._tools is not None:
            text, calls = self._tools.feed(text)
            if final:
                more_text, more_calls = self._tools.flush()
                text += more_text
                calls += more_calls
            self.tool_calls += calls
            if final and self.tool_calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        return text, reasoning, calls or None

    def end_of_stream(self) -> ChoiceDelta:
        """The stream ended without a finish reason: the worker broke the contract."""
        raise EngineStreamError("the worker's stream ended before the sequence finished")
