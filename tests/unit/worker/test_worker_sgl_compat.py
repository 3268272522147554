"""The sglang adapter against a stand-in for sgl.Engine (the real package cannot run here)."""

from __future__ import annotations

import asyncio

import pytest
from sglang_standin import StandInSglEngine

from armature.engine.api import (
    EngineFinishReason,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    SamplingParams,
)
from armature.protocols.llm import BootstrapInfo
from armature.sglang.args import SglangServerConfig
from armature.sglang.sgl_compat import SglangEngine, server_kwargs


def _server() -> SglangServerConfig:
    return SglangServerConfig(model_path="/models/standin", served_model_name="standin", page_size=4)


async def _collect(engine: SglangEngine, req: GenerateRequest) -> list[GenerateOutput]:
    return [out async for out in engine.generate_stream(req)]


def _expected_tokens(last: int, n: int, vocab: int = 97) -> list[int]:
    out = []
    for _ in range(n):
        last = (last * 7 + 3) % vocab
        out.append(last)
    return out


async def test_request_maps_to_async_generate_call() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, _server())
    req = GenerateRequest(
        rid="r-1",
        input_ids=[5, 6, 7],
        sampling=SamplingParams(max_new_tokens=3, temperature=0.0, top_k=5, seed=42, stop_token_ids=[90],
                                min_new_tokens=1, ignore_eos=True),
        return_logprob=True,
        top_logprobs_num=2,
        bootstrap=BootstrapInfo(bootstrap_host="10.0.0.1", bootstrap_port=8998, bootstrap_room=77),
        dp_rank=0,
    )
    await _collect(engine, req)
    call = sgl.calls[0]
    assert call["input_ids"] == [5, 6, 7]
    assert call["stream"] is True and call["rid"] == "r-1"
    assert call["return_logprob"] is True and call["top_logprobs_num"] == 2
    assert (call["bootstrap_host"], call["bootstrap_port"], call["bootstrap_room"]) == ("10.0.0.1", 8998, 77)
    assert call["routed_dp_rank"] == 0
    sp = call["sampling_params"]
    assert sp["max_new_tokens"] == 3 and sp["temperature"] == 0.0 and sp["top_k"] == 5
    assert sp["sampling_seed"] == 42 and sp["stop_token_ids"] == [90] and sp["min_new_tokens"] == 1
    assert sp["ignore_eos"] is True
    # Logprob switches are request fields, never sampling params (SGLang rejects them there).
    assert "return_logprob" not in sp and "top_logprobs_num" not in sp


async def test_stream_deltas_usage_and_length_finish() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, _server())
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    outs = await _collect(engine, GenerateRequest(rid="a", input_ids=prompt,
                                                  sampling=SamplingParams(max_new_tokens=5, ignore_eos=True)))
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == _expected_tokens(prompt[-1], 5)
    final = outs[-1]
    assert final.finish_reason is EngineFinishReason.LENGTH
    assert (final.prompt_tokens, final.completion_tokens, final.cached_tokens) == (9, 5, 0)
    assert all(o.finish_reason is None for o in outs[:-1])
    # The same prompt again: SGLang reports the page-aligned cached prefix.
    again = await _collect(engine, GenerateRequest(rid="b", input_ids=prompt,
                                                   sampling=SamplingParams(max_new_tokens=1)))
    assert again[-1].cached_tokens == 8


async def test_stop_token_sets_matched_stop() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, _server())
    expected = _expected_tokens(10, 6)
    stop = expected[3]
    outs = await _collect(engine, GenerateRequest(rid="s", input_ids=[10],
                                                  sampling=SamplingParams(max_new_tokens=20, stop_token_ids=[stop])))
    assert [t for o in outs for t in o.token_ids] == expected[:4]
    assert outs[-1].finish_reason is EngineFinishReason.STOP
    assert outs[-1].matched_stop == stop


async def test_logprobs_are_sliced_per_delta() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, _server())
    outs = await _collect(engine, GenerateRequest(rid="l", input_ids=[4, 5, 6], return_logprob=True,
                                                  top_logprobs_num=2, logprob_start_len=0,
                                                  sampling=SamplingParams(max_new_tokens=3, ignore_eos=True)))
    assert [o.logprobs for o in outs] == [[-0.5], [-1.0], [-1.5]]
    assert all(len(o.top_logprobs[0]) == 2 for o in outs)
    tok = outs[1].token_ids[0]
    assert outs[1].top_logprobs[0][0] == (tok, -1.0)
    assert outs[0].input_logprobs == [None, -1.0, -2.0]
    assert outs[1].input_logprobs is None


async def test_abort_mid_stream_and_before_first_token() -> None:
    hold = asyncio.Event()
    sgl = StandInSglEngine(hold_first_token=hold)
    engine = SglangEngine(sgl, _server())
    req = GenerateRequest(rid="early", input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=50))
    task = asyncio.create_task(_collect(engine, req))
    await asyncio.sleep(0.01)
    await engine.abort("early")
    outs = await task
    assert outs[-1].finish_reason is EngineFinishReason.ABORT
    assert [t for o in outs for t in o.token_ids] == []
    assert sgl.tokenizer_manager.abort_calls == ["early"]
    assert engine.load_metrics().kv_active_blocks == 0

    hold.set()
    seen: list[GenerateOutput] = []
    async for out in engine.generate_stream(GenerateRequest(rid="mid", input_ids=[1, 2, 3],
                                                            sampling=SamplingParams(max_new_tokens=50,
                                                                                    ignore_eos=True))):
        seen.append(out)
        if len(seen) == 2:
            await engine.abort("mid")
    assert seen[-1].finish_reason is EngineFinishReason.ABORT
    assert sum(len(o.token_ids) for o in seen) == 2


async def test_abort_before_reaching_sglang_never_starts_it() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, _server())
    await engine.abort("pre")
    outs = await _collect(engine, GenerateRequest(rid="pre", input_ids=[1, 2]))
    assert outs[-1].finish_reason is EngineFinishReason.ABORT
    assert sgl.calls == []


async def test_input_longer_than_context_is_invalid_request() -> None:
    engine = SglangEngine(StandInSglEngine(context_len=8), _server())
    with pytest.raises(InvalidRequestError, match="context length"):
        await _collect(engine, GenerateRequest(rid="x", input_ids=list(range(3, 13))))


async def test_bad_sampling_is_invalid_before_sglang() -> None:
    sgl = StandInSglEngine()
    engine = SglangEngine(sgl, _server())
    with pytest.raises(InvalidRequestError, match="temperature"):
        await _collect(engine, GenerateRequest(rid="t", input_ids=[1], sampling=SamplingParams(temperature=-1)))
    assert sgl.calls == []


def test_engine_info_from_sglang_state() -> None:
    engine = SglangEngine(StandInSglEngine(page_size=4, max_total_num_tokens=1001, context_len=64), _server())
    info = engine.info
    assert info.total_kv_blocks == 251  # ceil(1001 / 4), as Dynamo publishes it
    assert (info.page_size, info.context_length, info.vocab_size) == (4, 64, 97)
    assert (info.bos_token_id, info.eos_token_ids, info.max_running_requests) == (1, [2], 48)
    assert info.engine_kind == "sglang"


def test_server_kwargs_use_sglang_names() -> None:
    cfg = _server()
    cfg.kv_events_config = '{"publisher":"zmq","endpoint":"tcp://*:5557"}'
    kwargs = server_kwargs(cfg)
    assert kwargs["skip_tokenizer_init"] is True
    assert kwargs["page_size"] == 4 and kwargs["tp_size"] == 1
    assert kwargs["kv_events_config"] == cfg.kv_events_config
    assert "context_length" not in kwargs  # unset values leave SGLang's defaults alone
