"""Issue 4, bar 2: bad input gets an OpenAI-style error and the server keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from armature.frontend.main import runtime_client_factory
from armature.frontend.models import DiscoveryModelSource
from armature.frontend.server import Frontend
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime
from integration.frontend.stack import CONTEXT, MODEL, ServedStack, start_http

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


async def assert_still_serving(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).status_code == 200
    r = await http.post(CHAT, json={"model": MODEL, "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.fixture
async def http(stack: ServedStack):
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        yield client


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    r = await http.post(CHAT, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "Malformed JSON")
    await assert_still_serving(http)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": MSG, "max_tokens": "ten"}, "max_tokens"),
        ({"model": 5, "messages": MSG}, "model"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "temperature": -0.5}, "temperature"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": MSG, "n": 0}, "n"),
        ({"model": MODEL, "messages": MSG, "top_p": 0}, "top_p"),
    ],
)
async def test_invalid_fields_are_400_naming_the_field(http: httpx.AsyncClient, body: dict, param: str) -> None:
    err = assert_openai_error(await http.post(CHAT, json=body), 400)
    assert err["param"] == param
    await assert_still_serving(http)


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    err = assert_openai_error(await http.post(CHAT, json={"model": "nope", "messages": MSG}), 404, "nope")
    assert err["param"] == "model"
    await assert_still_serving(http)


async def test_prompt_longer_than_context_says_the_limits(http: httpx.AsyncClient) -> None:
    long = "word " * (CONTEXT * 2)
    r = await http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long}], "max_tokens": 4})
    err = assert_openai_error(r, 400, str(CONTEXT), "max_tokens is 4")
    assert err["code"] == "context_length_exceeded"
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1] * 500, "max_tokens": 100})
    assert_openai_error(r, 400, str(CONTEXT), "500 tokens")
    await assert_still_serving(http)


async def test_mixed_or_out_of_vocab_prompts_are_400(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", 1]})
    assert_openai_error(r, 400, "prompt must be")
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]})
    assert_openai_error(r, 400, "vocabulary")
    await assert_still_serving(http)


async def test_20mb_body_is_413_without_reading_it(stack: ServedStack) -> None:
    host, port = stack.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    size = 20 * 1024 * 1024
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode()
        + b"{" + b" " * 65536
    )
    await writer.drain()
    # The answer comes after 64 KiB of the 20 MiB: the body was never read in full.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 413")
    writer.close()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:
        # A chunked body (no Content-Length) is cut off as it streams in.
        async def chunks():
            for _ in range(20):
                yield b" " * (1024 * 1024)

        r = await http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert_openai_error(r, 413, "limit")
        await assert_still_serving(http)


async def test_no_worker_is_503_then_serves_when_one_arrives(tiny_llama_path: Path) -> None:
    from integration.frontend.stack import start_worker_in_process

    state = MemoryState()
    frt = DistributedRuntime(MemoryStore(state))
    await frt.start()
    frontend = Frontend(DiscoveryModelSource(frt.discovery), runtime_client_factory(frt))
    await frontend.start()
    server, task, url = await start_http(frontend)
    wrt = engine = worker = None
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            assert_openai_error(await http.post(CHAT, json={"model": MODEL, "messages": MSG}), 503, "no worker")
            assert (await http.get("/health")).status_code == 503
            assert (await http.get("/live")).status_code == 200
            wrt, engine, worker = await start_worker_in_process(state, tiny_llama_path)
            await frontend.wait_for_model(MODEL, timeout_s=30)
            await assert_still_serving(http)
            assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == [MODEL]
    finally:
        server.request_stop()
        await asyncio.wait_for(task, 10)
        await frontend.stop()
        if worker is not None:
            await worker.stop()
            await wrt.shutdown(grace_period_s=0.0)
            await engine.shutdown()
        await frt.shutdown(grace_period_s=0.0)


async def test_api_key_is_enforced(tiny_llama_path: Path) -> None:
    from armature.frontend.server import FrontendConfig
    from integration.frontend.stack import served_stack

    async with served_stack(tiny_llama_path, FrontendConfig(api_key="s3cret")) as s:
        async with httpx.AsyncClient(base_url=s.base_url, timeout=60) as http:
            assert_openai_error(await http.get("/v1/models"), 401, "API key")
            r = await http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
