"""OpenAI request bodies (validated with msgspec) and the response/chunk shapes we emit.

Requests are decoded straight from bytes into Structs whose constraints (``Meta``) are both the
validation and the published JSON schema (``/openapi.json``), so the two never disagree.
Responses are Structs too: streaming reuses one chunk skeleton per choice and re-encodes it per
token instead of building a model or dict each time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# ---------------------------------------------------------------- request bodies

NonNegInt = Annotated[int, Meta(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Temperature = Annotated[float, Meta(ge=0.0, le=100.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, le=2**31 - 1, description="-1 or 0 disables top-k")]
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=2.0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
StopList = Annotated[list[str], Meta(max_length=16)]
ChoiceCount = Annotated[int, Meta(ge=1, le=16)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(msgspec.Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, omit_defaults=True):
    function: FunctionDef
    type: Literal["function"] = "function"


class RouterConfigOverride(msgspec.Struct, forbid_unknown_fields=False):
    overlap_score_weight: Annotated[float, Meta(ge=0.0)] | None = None
    router_temperature: Annotated[float, Meta(ge=0.0)] | None = None


InstanceId = Annotated[int, Meta(ge=0)] | Annotated[str, Meta(pattern="^(0x)?[0-9a-fA-F]{1,16}$")]


class NvExt(msgspec.Struct, forbid_unknown_fields=False):
    """Dynamo's request extension: routing pins and per-request router overrides.

    Instance ids are integers, or hex strings as ``/health`` prints them.
    """

    backend_instance_id: InstanceId | None = None
    dp_rank: NonNegInt | None = None
    router_config_override: RouterConfigOverride | None = None
    # Flat spellings of the two overrides; ``router_config_override`` wins when both are given.
    overlap_score_weight: Annotated[float, Meta(ge=0.0)] | None = None
    router_temperature: Annotated[float, Meta(ge=0.0)] | None = None
    annotations: list[str] | None = None


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: str | StopList | None = None
    n: ChoiceCount = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    skip_special_tokens: bool = True
    user: str | None = None
    nvext: NvExt | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


PromptItem = str | Annotated[int, Meta(ge=0, le=2**31 - 1)] | list[Annotated[int, Meta(ge=0, le=2**31 - 1)]]
PROMPT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}, "minItems": 1},
        {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                "minItems": 1,
            },
        },
    ]
}


class CompletionRequest(_SamplingFields, kw_only=True):
    # One prompt (string or token ids) or a batch of them; mixed batches are refused by the
    # preprocessor. The published schema lists the four accepted shapes exactly.
    prompt: Annotated[str | list[PromptItem], Meta(extra_json_schema=PROMPT_SCHEMA)]
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False


# ---------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprobEntry(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobEntry(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatLogprobEntry] | None
    refusal: None = None


class ToolCallDelta(msgspec.Struct):
    """A whole tool call in one streamed delta (``index`` counts the choice's calls)."""

    index: int
    id: str
    function: FunctionCall
    type: str = "function"


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ResponseMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None  # no default: always present, null when the answer is only tool calls
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelObject(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelObject]


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# ---------------------------------------------------------------- codecs

chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_request_decoder = msgspec.json.Decoder(CompletionRequest)
json_encoder = msgspec.json.Encoder()
