"""Reasoning and tool-call parsing end to end: a model that always answers with thinking, a
sentence and a Hermes tool call (tests/fixtures/scripted_model.py), served by a worker started
with ``--dyn-reasoning-parser qwen --dyn-tool-call-parser hermes``, asked through the OpenAI SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from fixtures.scripted_model import TOOL_JSON
from integration.frontend.stack import MODEL, served_stack

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
RAW = f"<tool_call>{TOOL_JSON}</tool_call>"


@pytest.fixture
async def client(scripted_model_path: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    flags = ("--dyn-reasoning-parser", "qwen", "--dyn-tool-call-parser", "hermes")
    async with served_stack(scripted_model_path, worker_flags=flags) as stack:
        yield openai.AsyncOpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=60)


async def test_reasoning_content_and_tool_calls(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.content == "Let me look."
    assert (msg.model_extra or {}).get("reasoning_content") == "Check the weather."
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}


async def test_streamed_deltas_carry_the_same_answer(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True)
    reasoning, content, calls, finish = "", "", [], None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning == "Check the weather." and content == "Let me look." and finish == "tool_calls"
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert calls[0].id and json.loads(calls[0].function.arguments or "") == {"city": "Paris", "days": 2}


@pytest.mark.parametrize("tool_choice", [None, "none"])
async def test_without_tools_the_call_stays_text(client: openai.AsyncOpenAI, tool_choice: str | None) -> None:
    extra = {"tools": TOOLS, "tool_choice": tool_choice} if tool_choice else {}
    resp = await client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra)  # type: ignore[arg-type]
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "stop" and not msg.tool_calls
    assert msg.content == "Let me look." + RAW
    assert (msg.model_extra or {}).get("reasoning_content") == "Check the weather."


async def test_completions_are_not_parsed(client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model=MODEL, prompt="<|user|>hi<|assistant|>", max_tokens=20)
    assert resp.choices[0].text == "<think>Check the weather.</think>Let me look." + RAW
