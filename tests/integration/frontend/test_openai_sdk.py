"""Issue 4, bar 1: a running frontend + worker driven with the real openai SDK."""

from __future__ import annotations

import openai
import pytest

from integration.frontend.stack import MODEL, ServedStack

pytestmark = pytest.mark.integration


def client(stack: ServedStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=60)


async def test_chat_non_streaming_with_usage(stack: ServedStack) -> None:
    c = client(stack)
    r = await c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details is not None


async def _greedy_completion(c: openai.AsyncOpenAI, prompt: str, n_tokens: int, **kw: object) -> openai.types.Completion:
    return await c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=n_tokens, temperature=0, extra_body={"ignore_eos": True}, **kw
    )


async def test_chat_streaming_matches_non_streaming_and_reports_usage(stack: ServedStack) -> None:
    c = client(stack)
    messages = [{"role": "user", "content": "Count to five"}]
    whole = await c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = await c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == ["length"] and whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12 == whole.usage.completion_tokens


async def test_completions_text_ids_and_batches(stack: ServedStack) -> None:
    c = client(stack)
    by_text = await _greedy_completion(c, "The capital of France is", 6)
    ids = stack.frontend.models.get(MODEL).preprocessor.tokenizer.encode("The capital of France is", True)
    by_ids = await _greedy_completion(c, ids, 6)  # type: ignore[arg-type]
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    batch = await _greedy_completion(c, ["The capital of France is", "One two three"], 6)  # type: ignore[arg-type]
    assert [ch.index for ch in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    streamed = await c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join([ch.choices[0].text async for ch in streamed]) == by_text.choices[0].text


async def test_max_tokens_gives_length(stack: ServedStack) -> None:
    r = await _greedy_completion(client(stack), "Hello", 5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


async def test_stop_string_spanning_token_boundary(stack: ServedStack) -> None:
    c = client(stack)
    full = await _greedy_completion(c, "Once upon a time", 40, logprobs=0)
    tokens = full.choices[0].logprobs.tokens
    text = full.choices[0].text
    # A stop string made of the end of one token and the start of the next.
    stop = None
    for k in range(2, len(tokens) - 1):
        left, right = tokens[k].strip(), tokens[k + 1]
        if len(left) >= 2 and right and not right.isspace() and "\ufffd" not in left + right:
            candidate = tokens[k][-2:] + right[:2]
            if text.find(candidate) >= 0:
                stop = candidate
                break
    assert stop is not None, f"no usable token boundary in {tokens!r}"
    expected = text[: text.find(stop)]
    for stream in (False, True):
        if stream:
            s = await c.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop, "\x00never"],
                stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = [ch async for ch in s]
            got = "".join(ch.choices[0].text for ch in chunks)
            reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]
            assert reason == ["stop"]
        else:
            r = await _greedy_completion(c, "Once upon a time", 40, stop=[stop, "\x00never"])
            got, reason = r.choices[0].text, r.choices[0].finish_reason
            assert reason == "stop"
        assert got == expected
        assert stop not in got


async def test_n2_returns_two_choices(stack: ServedStack) -> None:
    r = await client(stack).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, seed=7,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(ch.index for ch in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 8


async def test_chat_logprobs_and_top_logprobs(stack: ServedStack) -> None:
    r = await client(stack).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
    assert "".join(e.token for e in content) == r.choices[0].message.content


async def test_completion_echo_with_prompt_logprobs(stack: ServedStack) -> None:
    r = await _greedy_completion(client(stack), "Hello world", 3, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Hello world")
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


async def test_seeded_sampling_is_repeatable(stack: ServedStack) -> None:
    c = client(stack)

    async def sample(seed: int) -> str:
        r = await c.completions.create(
            model=MODEL, prompt="Random words:", max_tokens=16, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return r.choices[0].text

    first = await sample(1234)
    assert await sample(1234) == first


async def test_models_health_and_metrics(stack: ServedStack) -> None:
    import httpx

    c = client(stack)
    assert [m.id for m in (await c.models.list()).data] == [MODEL]
    s = await c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    _ = [ch async for ch in s]
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["models"] == [MODEL]
        text = (await http.get("/metrics")).text
    label = f'model="{MODEL}"'
    for name in (
        "armature_frontend_requests_total", "armature_frontend_inflight_requests",
        "armature_frontend_time_to_first_token_seconds_count", "armature_frontend_inter_token_latency_seconds_count",
        "armature_frontend_input_sequence_tokens_count", "armature_frontend_output_sequence_tokens_sum",
        "armature_frontend_request_duration_seconds_count",
    ):  # fmt: skip
        assert any(line.startswith(name) and label in line for line in text.splitlines()), name
    assert f'armature_frontend_output_sequence_tokens_sum{{{label}}} 3.0' in text
    # The stream that ended with [DONE] counts as a success (not as an error or a disconnect).
    ok = f'armature_frontend_requests_total{{endpoint="chat_completions",{label},request_type="stream",status="success"}} 1.0'
    assert ok in text, text


async def test_completion_stream_with_echo_matches_the_whole_answer(stack: ServedStack) -> None:
    c = client(stack)
    prompt = "One two three"
    whole = await _greedy_completion(c, prompt, 24)
    streamed = await c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True, echo=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts = [ch.choices[0].text async for ch in streamed]
    assert texts[0].startswith(prompt)  # the echo rides with the first token's event
    assert "".join(texts) == prompt + whole.choices[0].text
    assert len(texts) == 24  # one event per token
