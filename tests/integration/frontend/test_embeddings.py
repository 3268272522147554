"""``/v1/embeddings`` end to end: an ``--embedding-worker`` (native engine, tiny Llama) behind the
frontend, called with the OpenAI SDK and over raw HTTP; vectors checked against transformers."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tokenizers
import torch
import transformers
from integration.frontend.stack import (
    CONTEXT,
    MODEL,
    ServedStack,
    served_stack,
    start_http,
    start_worker_in_process,
)

from armature.frontend.main import runtime_client_factory
from armature.frontend.models import DiscoveryModelSource
from armature.frontend.server import Frontend
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime


@pytest.fixture
async def embed_stack(tiny_llama_path: Path) -> AsyncIterator[ServedStack]:
    async with served_stack(tiny_llama_path, worker_flags=("--embedding-worker",)) as s:
        yield s


def reference(model_path: Path, texts: list[str]) -> np.ndarray:
    tok = tokenizers.Tokenizer.from_file(str(model_path / "tokenizer.json"))
    hf = transformers.AutoModel.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok.encode(text, add_special_tokens=True).ids])
            rows.append(torch.nn.functional.normalize(hf(ids).last_hidden_state[0, -1], dim=-1).numpy())
    return np.stack(rows)


async def test_sdk_embeddings_match_transformers(embed_stack: ServedStack, tiny_llama_path: Path) -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog", "a"]
    client = openai.AsyncOpenAI(base_url=embed_stack.v1, api_key="unused", max_retries=0, timeout=60)
    # The SDK asks for base64 unless told otherwise; ask for floats too and compare.
    b64 = await client.embeddings.create(model=MODEL, input=texts)
    floats = await client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    ref = reference(tiny_llama_path, texts)
    assert b64.model == MODEL and [d.index for d in b64.data] == [0, 1, 2]
    got = np.array([d.embedding for d in b64.data], dtype=np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(np.array([d.embedding for d in floats.data], dtype=np.float32), got)
    tok = tokenizers.Tokenizer.from_file(str(tiny_llama_path / "tokenizer.json"))
    n_tokens = sum(len(tok.encode(t, add_special_tokens=True).ids) for t in texts)
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == n_tokens

    # Token ids in, one input or several; the same text as ids gives the same vector.
    ids = tok.encode(texts[0], add_special_tokens=True).ids
    one = await client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    many = await client.embeddings.create(model=MODEL, input=[ids, ids[:2]], encoding_format="float")
    np.testing.assert_allclose(np.array(one.data[0].embedding), ref[0], atol=1e-5)
    assert len(many.data) == 2 and many.usage.prompt_tokens == len(ids) + 2


async def test_wire_format_and_concurrent_callers(embed_stack: ServedStack) -> None:
    async with httpx.AsyncClient(base_url=embed_stack.v1, timeout=60) as http:
        r = await http.post(
            "/embeddings", json={"model": MODEL, "input": "hello", "encoding_format": "base64"}
        )
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
        vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        assert vec.shape == (64,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5

        async def ask(i: int) -> list[float]:
            resp = await http.post("/embeddings", json={"model": MODEL, "input": f"caller {i % 4}"})
            assert resp.status_code == 200, resp.text
            return resp.json()["data"][0]["embedding"]

        vectors = await asyncio.gather(*(ask(i) for i in range(32)))
        for i, v in enumerate(vectors):
            np.testing.assert_allclose(v, vectors[i % 4], atol=1e-6)
        metrics = (await http.get(embed_stack.base_url + "/metrics")).text
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("armature_frontend_requests_total") and "embeddings" in x
    )
    assert 'status="success"' in line and line.endswith(" 33.0")
    # Every page borrowed for those forwards is back; the prefix cache holds nothing of them.
    sched = embed_stack.engine.scheduler
    assert sched.allocator.free_pages == sched.allocator.total_pages


async def test_bad_requests_get_openai_errors(embed_stack: ServedStack) -> None:
    async with httpx.AsyncClient(base_url=embed_stack.v1, timeout=60) as http:

        async def error(body: dict[str, object], path: str = "/embeddings") -> tuple[int, dict[str, object]]:
            r = await http.post(path, json=body)
            return r.status_code, r.json()["error"]

        status, err = await error({"model": MODEL, "input": [1] * (CONTEXT + 1)})
        assert status == 400 and err["code"] == "context_length_exceeded" and err["param"] == "input"
        status, err = await error({"model": MODEL, "input": ""})
        assert status == 400 and "input must not be empty" in str(err["message"])
        status, err = await error({"model": MODEL, "input": ["text", [1, 2]]})
        assert status == 400 and err["param"] == "input"
        status, err = await error({"model": MODEL, "input": "x", "encoding_format": "int8"})
        assert status == 400 and err["param"] == "encoding_format"
        status, err = await error({"model": MODEL, "input": "x", "dimensions": 32})
        assert status == 400 and "64 dimensions" in str(err["message"])
        status, err = await error({"model": "nope", "input": "x"})
        assert status == 404 and err["code"] == "model_not_found"
        status, err = await error(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "/chat/completions"
        )
        assert status == 400 and err["code"] == "model_not_supported"
        # Still serving after all of that.
        ok = await http.post("/embeddings", json={"model": MODEL, "input": "fine"})
        assert ok.status_code == 200


async def test_a_generative_model_refuses_embeddings(stack: ServedStack) -> None:
    async with httpx.AsyncClient(base_url=stack.v1, timeout=60) as http:
        r = await http.post("/embeddings", json={"model": MODEL, "input": "x"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "model_not_supported" and "/v1/embeddings" in err["message"]


async def test_an_embedding_and_a_chat_model_share_one_endpoint(tiny_llama_path: Path) -> None:
    # Both workers serve the default dyn://dynamo.backend.generate: each model's requests must
    # reach only its own workers (an embedding worker cannot generate, nor the reverse).
    state = MemoryState()
    chat_rt, chat_engine, chat_worker = await start_worker_in_process(state, tiny_llama_path)
    emb_rt, emb_engine, emb_worker = await start_worker_in_process(
        state, tiny_llama_path, "--embedding-worker", "--served-model-name", "tiny-embed"
    )
    frt = DistributedRuntime(MemoryStore(state))
    await frt.start()
    frontend = Frontend(DiscoveryModelSource(frt.discovery), runtime_client_factory(frt))
    await frontend.start()
    server, task, url = await start_http(frontend)
    try:
        await frontend.wait_for_model(MODEL, timeout_s=30)
        await frontend.wait_for_model("tiny-embed", timeout_s=30)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chats = [
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=3
            )
            for i in range(8)
        ]
        embeds = [client.embeddings.create(model="tiny-embed", input=f"text {i}") for i in range(8)]
        results = await asyncio.gather(*chats, *embeds)
        assert all(r.choices[0].finish_reason in ("stop", "length") for r in results[:8])
        assert all(len(r.data[0].embedding) == 64 for r in results[8:])
    finally:
        server.request_stop()
        await asyncio.wait_for(task, 10)
        await frontend.stop()
        for worker, rt, engine in ((chat_worker, chat_rt, chat_engine), (emb_worker, emb_rt, emb_engine)):
            await worker.stop()
            await rt.shutdown(grace_period_s=0.0)
            await engine.shutdown()
        await frt.shutdown(grace_period_s=0.0)
