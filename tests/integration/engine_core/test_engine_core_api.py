"""The native engine through its public APIs: the Engine protocol and the offline API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from armature.engine import Engine
from armature.engine.api import (
    Engine as EngineProtocol,
)
from armature.engine.api import (
    EncodeRequest,
    EngineFinishReason,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from armature.engine.server_args import ServerArgs, ServerArgsError


@pytest.fixture(scope="module")
def engine(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    eng = Engine(model_path=str(tiny_llama_path), max_total_tokens=4096, context_length=256, stream_interval=1)
    yield eng
    eng.shutdown()


async def drain(eng, req: GenerateRequest) -> list:  # type: ignore[no-untyped-def]
    return [o async for o in eng.generate_stream(req)]


def test_offline_text_api_and_protocol(engine) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(engine, EngineProtocol)
    out = engine.generate("Hello there, how are you?", {"max_new_tokens": 5, "temperature": 0})
    assert isinstance(out, dict) and isinstance(out["text"], str) and len(out["output_ids"]) <= 5
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode("Hello there, how are you?").ids)
    assert meta["completion_tokens"] == len(out["output_ids"])
    batch = engine.generate(["a b c", "d e f g"], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert isinstance(batch, list) and len(batch) == 2
    with pytest.raises(InvalidRequestError, match="unsupported sampling params"):
        engine.generate("x", {"stop": ["\n"]})


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(300, 340))
    p = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95, "ignore_eos": True}
    a = engine.generate(input_ids=prompt, sampling_params={**p, "seed": 11})["output_ids"]
    # The same seed inside a batch with other (unseeded and seeded) requests: the same tokens.
    batch = engine.generate(
        input_ids=[prompt, prompt, list(range(50, 90))],
        sampling_params=[{**p, "seed": 11}, {**p, "seed": 12}, p],
    )
    assert batch[0]["output_ids"] == a
    assert batch[1]["output_ids"] != a


async def test_abort_before_first_token_and_mid_decode(engine) -> None:  # type: ignore[no-untyped-def]
    await engine.abort("pre")
    outs = await drain(engine, GenerateRequest("pre", [5, 6, 7], SamplingParams(max_new_tokens=4)))
    assert outs[-1].finish_reason is EngineFinishReason.ABORT and not outs[-1].token_ids

    req = GenerateRequest("mid", list(range(100, 140)), SamplingParams(max_new_tokens=200, ignore_eos=True))
    stream = engine.generate_stream(req)
    first = await stream.__anext__()
    assert first.token_ids
    await engine.abort("mid")
    rest = [o async for o in stream]
    assert rest[-1].finish_reason is EngineFinishReason.ABORT
    assert rest[-1].completion_tokens < 200
    m = engine.load_metrics()
    assert m.num_running_reqs == 0 and m.kv_active_blocks == 0


async def test_cancelled_consumer_frees_its_pages(engine) -> None:  # type: ignore[no-untyped-def]
    req = GenerateRequest("gone", list(range(100, 180)), SamplingParams(max_new_tokens=200, ignore_eos=True))

    async def consume() -> None:
        async for _ in engine.generate_stream(req):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if engine.load_metrics().num_running_reqs == 0:
            break
        await asyncio.sleep(0.05)
    m = engine.load_metrics()
    assert m.num_running_reqs == 0 and m.kv_active_blocks == 0


async def test_context_length_is_enforced(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError, match="context length is 256"):
        await drain(engine, GenerateRequest("long", [7] * 256, SamplingParams(max_new_tokens=1)))
    outs = await drain(engine, GenerateRequest("edge", [7] * 250, SamplingParams(max_new_tokens=50, ignore_eos=True)))
    assert sum(len(o.token_ids) for o in outs) == 6  # stops at the context length
    assert outs[-1].finish_reason is EngineFinishReason.LENGTH


async def test_stream_interval_batches_deltas(tiny_llama_path: Path) -> None:
    eng = Engine(model_path=str(tiny_llama_path), max_total_tokens=1024, stream_interval=4, skip_tokenizer_init=True)
    try:
        outs = await drain(eng, GenerateRequest("s", [9] * 20, SamplingParams(max_new_tokens=10, ignore_eos=True)))
        assert [len(o.token_ids) for o in outs] == [1, 4, 4, 1]
        assert outs[-1].finished and outs[-1].completion_tokens == 10
    finally:
        await eng.shutdown()


async def test_control_calls(engine, tiny_llama_path: Path) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(400, 440))
    before = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert await engine.flush_cache()
    assert engine.load_metrics().kv_cached_blocks == 0
    await engine.start_profile()
    engine.generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
    trace = await engine.stop_profile()
    assert Path(trace).stat().st_size > 0
    await engine.update_weights_from_disk(str(tiny_llama_path))
    after = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert after["output_ids"] == before["output_ids"]
    await engine.release_memory()
    assert engine.runner.kv_pool.k_buffer[0].numel() == 0
    # Submitted while released: it waits, then runs once memory is back.
    pending = asyncio.ensure_future(
        drain(engine, GenerateRequest("queued", prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
    )
    embedding = asyncio.ensure_future(engine.encode(EncodeRequest("e", [1, 2, 3])))
    await asyncio.sleep(0.2)
    assert not pending.done() and engine.load_metrics().num_waiting_reqs == 1
    assert not embedding.done()
    await engine.resume_memory()
    outs = await pending
    assert [t for o in outs for t in o.token_ids] == before["output_ids"]
    assert len((await embedding).embedding) == engine.runner.model_config.hidden_size


def test_server_args_are_validated() -> None:
    with pytest.raises(ServerArgsError, match="page_size"):
        ServerArgs(page_size=0)
    with pytest.raises(ServerArgsError, match="kv_events_config"):
        ServerArgs(kv_events_config="{not json")
    with pytest.raises(ServerArgsError, match="publisher"):
        ServerArgs(kv_events_config='{"publisher": "nats", "endpoint": "tcp://*:1"}')
    with pytest.raises(ServerArgsError, match="unknown engine arguments"):
        ServerArgs.from_kwargs(model_pth="x")
    with pytest.raises(ServerArgsError, match="dp_size"):
        ServerArgs(dp_size=2)
