"""Chat templates render exactly as transformers' apply_chat_template does (without importing it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from armature.frontend.chat_template import ChatTemplate, ChatTemplateError
from armature.frontend.tokenizer import ModelTokenizer

# Templates in the style of well-known model families, written for these tests.
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{%- if tools is not none %}{{- 'Tools:\\n' }}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}"
    "{%- endfor %}{%- endif %}\n"
    "{{- 'Today: ' + strftime_now('%Y') + '\\n' }}"
    "{{- system }}{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)

QWEN2_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LOOPCONTROLS_NAMESPACE = (
    "{% set ns = namespace(found=false) %}{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.found = true %}{% break %}{% endif %}{% endfor %}"
    "{% if not ns.found %}<default system>{% endif %}"
    "{% for m in messages %}{% generation %}[{{ m.role }}]{{ m.content }}{% endgeneration %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there <b>&</b> 'quotes' — ünïcode 😀"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <now>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"wind": 3}'},
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path))


@pytest.fixture(scope="module")
def ours(smollm2_path: Path) -> ModelTokenizer:
    return ModelTokenizer.from_dir(smollm2_path)


def _hf(hf_tokenizer: Any, template: str | None, messages: list[dict[str, Any]], **kw: Any) -> str:
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


def _ours(tok: ModelTokenizer, template: str | None, messages: list[dict[str, Any]], **kw: Any) -> str:
    tpl = tok.chat_template() if template is None else ChatTemplate(template, tok.special_tokens)
    assert tpl is not None
    return tpl.render(messages, **kw)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_template_matches_transformers(
    hf_tokenizer: Any, ours: ModelTokenizer, conversation: list[dict[str, Any]], add_generation_prompt: bool
) -> None:
    expected = _hf(hf_tokenizer, None, conversation, add_generation_prompt=add_generation_prompt)
    assert _ours(ours, None, conversation, add_generation_prompt=add_generation_prompt) == expected
    # Tokenizing the rendered text gives the ids transformers would feed the model.
    hf_ids = hf_tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.encode(expected, add_special_tokens=False) == list(hf_ids)


@pytest.mark.parametrize("template", [LLAMA3_STYLE, QWEN2_STYLE, LOOPCONTROLS_NAMESPACE], ids=["llama3", "qwen2", "ns"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_inline_templates_match_transformers(
    hf_tokenizer: Any, ours: ModelTokenizer, template: str, conversation: list[dict[str, Any]]
) -> None:
    expected = _hf(hf_tokenizer, template, conversation, add_generation_prompt=True)
    assert _ours(ours, template, conversation, add_generation_prompt=True) == expected


@pytest.mark.parametrize("template", [LLAMA3_STYLE, QWEN2_STYLE], ids=["llama3", "qwen2"])
def test_tools_and_tool_messages_match_transformers(hf_tokenizer: Any, ours: ModelTokenizer, template: str) -> None:
    conversation = TOOL_CONVERSATION if template is QWEN2_STYLE else CONVERSATIONS[1]
    expected = _hf(hf_tokenizer, template, conversation, tools=TOOLS, add_generation_prompt=True)
    got = _ours(ours, template, conversation, tools=TOOLS, add_generation_prompt=True)
    assert got == expected
    assert "<now>" in got  # tojson does not HTML-escape


def test_mistral_style_template_raises_on_bad_roles(hf_tokenizer: Any, ours: ModelTokenizer) -> None:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    assert _ours(ours, MISTRAL_STYLE, good) == _hf(hf_tokenizer, MISTRAL_STYLE, good)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        _ours(ours, MISTRAL_STYLE, bad)
    with pytest.raises(Exception, match="alternate"):
        _hf(hf_tokenizer, MISTRAL_STYLE, bad)


def test_sandbox_blocks_attribute_escapes(ours: ModelTokenizer) -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([{"role": "user", "content": "x"}])


def test_empty_conversation_and_broken_template_are_clear_errors() -> None:
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("{{ messages }}").render([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
