"""OpenAI request → token ids → ``PreprocessedRequest`` (one per choice), with the limits checked.

Chat requests go through the model's chat template; completions take text or token ids as
given. Long inputs are tokenized on a worker thread so one big prompt never stalls the event
loop that streams everyone else's tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from armature.frontend.chat_template import ChatTemplateError
from armature.frontend.errors import ApiError
from armature.frontend.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, NvExt, TextPart
from armature.frontend.parsers import (
    REASONING_PARSER_NAMES,
    TOOL_CALL_PARSER_NAMES,
    tool_call_parser,
)
from armature.frontend.tokenizer import ModelTokenizer
from armature.protocols.llm import (
    OutputOptions,
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)
from armature.protocols.model_card import ModelCard

log = logging.getLogger(__name__)

# Below this many characters tokenizing inline is cheaper than a thread hop.
_INLINE_TOKENIZE_CHARS = 4096
_SEED_MASK = 2**63 - 1


def routing_hints(nvext: NvExt | None) -> RoutingHints | None:
    """The request's routing pins and router overrides from ``nvext`` (None when it has none)."""
    if nvext is None:
        return None
    wid = nvext.backend_instance_id
    if isinstance(wid, str):
        wid = int(wid, 16)
    override = nvext.router_config_override
    weight = override.overlap_score_weight if override is not None else None
    temperature = override.router_temperature if override is not None else None
    hints = RoutingHints(
        backend_instance_id=wid,
        dp_rank=nvext.dp_rank,
        overlap_score_weight=weight if weight is not None else nvext.overlap_score_weight,
        router_temperature=temperature if temperature is not None else nvext.router_temperature,
    )
    return hints if hints != RoutingHints() else None


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    text: str | None  # the rendered/original text, when there was one (for echo)


@dataclass
class PreparedChoice:
    index: int
    prompt: PreparedPrompt
    request: PreprocessedRequest


@dataclass
class PreparedRequest:
    model: str
    choices: list[PreparedChoice]
    stop: list[str]
    min_tokens: int
    hidden_stop_ids: frozenset[int]
    skip_special_tokens: bool
    logprobs: int | None
    echo: bool
    # Chat only: the model's output parsers (names from its card) that apply to this request.
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None

    @property
    def prompt_tokens(self) -> int:
        # Usage counts each distinct prompt once, as OpenAI does for n > 1.
        seen: dict[int, int] = {}
        for c in self.choices:
            seen.setdefault(id(c.prompt), len(c.prompt.token_ids))
        return sum(seen.values())


def _known(name: str | None, known: tuple[str, ...], model: str, kind: str) -> str | None:
    if name is None or name in known:
        return name
    # A worker newer than this frontend: serve the model, unparsed, rather than not at all.
    log.warning("model %r asks for %s parser %r, which this frontend does not have (it has: %s); "
                "its output is passed through unparsed", model, kind, name, ", ".join(known))  # fmt: skip
    return None


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    return [s for s in items if s]


def _message_text(content: str | list[TextPart] | None) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def _message_dict(msg: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.role, "content": _message_text(msg.content)}
    if msg.name is not None:
        out["name"] = msg.name
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    if msg.reasoning_content is not None:
        out["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        calls = []
        for call in msg.tool_calls:
            # Templates index into the arguments (e.g. ``arguments | tojson``), so pass a dict
            # when the string is JSON, as vLLM and SGLang do.
            try:
                args: Any = json.loads(call.function.arguments)
            except ValueError:
                args = call.function.arguments
            calls.append(
                {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": args}}
            )
        out["tool_calls"] = calls
    return out


async def _encode(tok: ModelTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) < _INLINE_TOKENIZE_CHARS:
        return tok.encode(text, add_special_tokens)
    return await asyncio.to_thread(tok.encode, text, add_special_tokens)


class Preprocessor:
    """Turns requests for one model into engine requests; holds that model's tokenizer and card."""

    def __init__(self, card: ModelCard, tokenizer: ModelTokenizer) -> None:
        self.card = card
        self.tokenizer = tokenizer
        rc = card.runtime_config
        self.reasoning_parser = _known(rc.reasoning_parser, REASONING_PARSER_NAMES, card.name, "reasoning")
        self.tool_call_parser = _known(rc.tool_call_parser, TOOL_CALL_PARSER_NAMES, card.name, "tool-call")
        # Parsers whose markers are special tokens need them in the text they read.
        self._tools_need_special = bool(self.tool_call_parser) and tool_call_parser(
            self.tool_call_parser or ""
        ).needs_special_tokens

    def render_chat(self, req: ChatCompletionRequest) -> str:
        tools = [msgspec.to_builtins(t) for t in req.tools] if req.tools else None
        template = self.tokenizer.chat_template(with_tools=tools is not None)
        if template is None:
            raise ApiError(
                400,
                f"model '{self.card.name}' has no chat template; use /v1/completions",
                code="no_chat_template",
            )
        try:
            return template.render(
                [_message_dict(m) for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
                tools=tools,
                extra=req.chat_template_kwargs,
            )
        except ChatTemplateError as exc:
            raise ApiError(400, f"chat template rejected the messages: {exc}", param="messages") from exc

    async def chat(self, req: ChatCompletionRequest) -> PreparedRequest:
        text = self.render_chat(req)
        # The template already wrote BOS and friends; adding them again would double them.
        ids = await _encode(self.tokenizer, text, add_special_tokens=False)
        if not ids:
            raise ApiError(400, "the rendered prompt is empty", param="messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        prompt = [PreparedPrompt(ids, text)]
        prepared = self._build(req, prompt, max_tokens, logprobs, prompt_logprobs=None, echo=False)
        prepared.reasoning_parser = self.reasoning_parser
        # As OpenAI: tool calls are looked for only when the request offers tools and allows them.
        if self.tool_call_parser and req.tools and req.tool_choice != "none":
            prepared.tool_call_parser = self.tool_call_parser
            if self._tools_need_special:
                prepared.skip_special_tokens = False
        return prepared

    async def completion(self, req: CompletionRequest) -> PreparedRequest:
        prompts = await self._prompts(req.prompt, "prompt")
        prompt_logprobs = req.logprobs if (req.echo and req.logprobs is not None) else None
        return self._build(req, prompts, req.max_tokens, req.logprobs, prompt_logprobs, echo=req.echo)

    async def embedding_inputs(self, value: str | list[Any]) -> list[list[int]]:
        """``/v1/embeddings``' ``input`` as token ids, each within the model's context."""
        limit = self.card.context_length
        out = []
        for i, p in enumerate(await self._prompts(value, "input")):
            if len(p.token_ids) > limit:
                raise ApiError(
                    400,
                    f"input {i} has {len(p.token_ids)} tokens; model '{self.card.name}' takes at most {limit}",
                    param="input",
                    code="context_length_exceeded",
                )
            out.append(p.token_ids)
        return out

    async def _prompts(self, prompt: str | list[Any], param: str) -> list[PreparedPrompt]:
        if isinstance(prompt, str):
            texts: list[str] | None = [prompt]
            id_lists: list[list[int]] | None = None
        elif not prompt:
            raise ApiError(400, f"{param} must not be empty", param=param)
        elif all(isinstance(p, str) for p in prompt):
            texts, id_lists = list(prompt), None
        elif all(isinstance(p, int) for p in prompt):
            texts, id_lists = None, [list(prompt)]
        elif all(isinstance(p, list) for p in prompt):
            texts, id_lists = None, [list(p) for p in prompt]
        else:
            raise ApiError(
                400,
                f"{param} must be a string, a list of strings, a list of token ids or a list of token-id lists",
                param=param,
            )
        if texts is not None:
            if len(texts) == 1:
                encoded = [await _encode(self.tokenizer, texts[0], add_special_tokens=True)]
            else:
                # A batch (embeddings often send hundreds): one call, tokenized in parallel, off the loop.
                encoded = await asyncio.to_thread(self.tokenizer.encode_batch, texts, True)
            if not all(encoded):
                raise ApiError(400, f"{param} must not be empty", param=param)
            return [PreparedPrompt(ids, text) for ids, text in zip(encoded, texts, strict=True)]
        assert id_lists is not None
        vocab = self.tokenizer.vocab_size
        for ids in id_lists:
            if not ids:
                raise ApiError(400, f"a token-id {param} must not be empty", param=param)
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is out of the vocabulary (size {vocab})", param=param)
        return [PreparedPrompt(ids, None) for ids in id_lists]

    def _build(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompts: list[PreparedPrompt],
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
        echo: bool,
    ) -> PreparedRequest:
        card = self.card
        context = card.context_length
        for p in prompts:
            n_prompt = len(p.token_ids)
            if max_tokens is None:
                budget_ok = n_prompt < context
            else:
                budget_ok = n_prompt + max_tokens <= context
            if not budget_ok:
                asked = "" if max_tokens is None else f" and max_tokens is {max_tokens}"
                raise ApiError(
                    400,
                    f"This model's maximum context length is {context} tokens; the prompt has "
                    f"{n_prompt} tokens{asked} ({n_prompt + (max_tokens or 1)} tokens requested at least). "
                    "Shorten the prompt or lower max_tokens.",
                    param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                    code="context_length_exceeded",
                )
        stop = _stop_list(req.stop)
        hidden = list(card.eos_token_ids)
        top_k = req.top_k if req.top_k not in (0,) else -1
        routing = routing_hints(req.nvext)
        choices: list[PreparedChoice] = []
        index = 0
        for p in prompts:
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) & _SEED_MASK
                limit = max_tokens if max_tokens is not None else context - len(p.token_ids)
                pre = PreprocessedRequest(
                    model=card.name,
                    token_ids=p.token_ids,
                    stop_conditions=StopConditions(
                        max_tokens=limit,
                        stop=stop or None,
                        stop_token_ids_hidden=hidden or None,
                        min_tokens=req.min_tokens or None,
                        ignore_eos=req.ignore_eos,
                    ),
                    sampling_options=SamplingOptions(
                        temperature=req.temperature,
                        top_p=req.top_p,
                        top_k=top_k,
                        min_p=req.min_p,
                        frequency_penalty=req.frequency_penalty,
                        presence_penalty=req.presence_penalty,
                        repetition_penalty=req.repetition_penalty,
                        seed=seed,
                    ),
                    output_options=OutputOptions(
                        logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs,
                        skip_special_tokens=req.skip_special_tokens,
                    ),
                    eos_token_ids=[] if req.ignore_eos else list(card.eos_token_ids),
                    routing=routing,
                    annotations=req.nvext.annotations if req.nvext is not None else None,
                )
                choices.append(PreparedChoice(index, p, pre))
                index += 1
        return PreparedRequest(
            model=card.name,
            choices=choices,
            stop=stop,
            min_tokens=req.min_tokens,
            hidden_stop_ids=frozenset(hidden),
            skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs,
            echo=echo,
        )
