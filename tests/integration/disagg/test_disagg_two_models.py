"""Two disaggregated models in one namespace: their prefill workers share the prefill endpoint
(``dynamo.prefill.generate``) and their decode workers the decode one. Each model's requests
must be prefilled by its own prefill worker: the models differ (Llama vs Qwen2 KV layouts), so a
request prefilled by the other model's worker could not be decoded. Everything in-process, on
the TCP request plane and the tcp KV transfer."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import openai
import tokenizers
from integration.frontend.stack import start_http, start_worker_in_process

from armature.engine import Engine
from armature.frontend.main import runtime_client_factory
from armature.frontend.models import DiscoveryModelSource
from armature.frontend.server import Frontend
from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime

MODELS = {"llama": "tiny_llama_path", "qwen2": "tiny_qwen2_path"}


TEXTS = [f"Count with me: {i}, {i + 1}, {i + 2} and then" for i in range(6)]
MAX_TOKENS = 6


def reference(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy answers of the model alone (aggregated, offline engine)."""
    eng = Engine(model_path=str(path), max_total_tokens=4096, skip_tokenizer_init=True)
    try:
        params = {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        return [o["output_ids"] for o in outs]
    finally:
        eng.shutdown()


async def test_each_model_is_prefilled_by_its_own_workers(request: Any) -> None:
    paths = {name: request.getfixturevalue(fixture) for name, fixture in MODELS.items()}
    tok = tokenizers.Tokenizer.from_file(str(paths["llama"] / "tokenizer.json"))  # both use SmolLM2's
    prompts = [tok.encode(t).ids for t in TEXTS]
    expected = {name: reference(path, prompts) for name, path in paths.items()}
    state = MemoryState()
    workers: list[tuple[Any, Any, Any]] = []
    for name, path in paths.items():
        for mode in ("prefill", "decode"):
            workers.append(
                await start_worker_in_process(
                    state, path, "--served-model-name", name, "--disaggregation-mode", mode
                )
            )
    frt = DistributedRuntime(MemoryStore(state))
    await frt.start()
    frontend = Frontend(DiscoveryModelSource(frt.discovery), runtime_client_factory(frt))
    await frontend.start()
    server, task, url = await start_http(frontend)
    try:
        for name in MODELS:
            await frontend.wait_for_model(name, timeout_s=30)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def ask(model: str, i: int) -> str:
            r = await client.completions.create(
                model=model,
                prompt=prompts[i],
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return r.choices[0].text

        for model in MODELS:
            texts = await asyncio.gather(*(ask(model, i) for i in range(len(prompts))))
            want = [tok.decode(ids, skip_special_tokens=True) for ids in expected[model]]
            assert texts == want, model
    finally:
        server.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await frontend.stop()
        for rt, engine, worker in workers:
            await worker.stop()
            await rt.shutdown(grace_period_s=0.0)
            await engine.shutdown()
        await frt.shutdown(grace_period_s=0.0)
