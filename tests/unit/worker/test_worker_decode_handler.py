"""Decode handler: PreprocessedRequest → engine → LLMEngineOutput, with cancellation.

The engine is the sglang adapter over the sgl.Engine stand-in (the only stand-in allowed: the real
package cannot run here); Context is the runtime's real one.
"""

from __future__ import annotations

import asyncio

import pytest
from sglang_standin import StandInSglEngine

from armature.protocols.llm import (
    FinishReason,
    LLMEngineOutput,
    OutputOptions,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
)
from armature.runtime.context import Context
from armature.runtime.request_plane.base import EngineShutdown, ErrorKind, RequestPlaneError
from armature.sglang.args import SglangServerConfig
from armature.sglang.handlers.decode import DecodeWorkerHandler
from armature.sglang.sgl_compat import SglangEngine


def _handler(sgl: StandInSglEngine | None = None, ready: bool = True) -> tuple[DecodeWorkerHandler, StandInSglEngine]:
    sgl = sgl or StandInSglEngine()
    engine = SglangEngine(sgl, SglangServerConfig(model_path="/m", served_model_name="m"))
    gate = asyncio.Event()
    if ready:
        gate.set()
    return DecodeWorkerHandler(engine, gate, asyncio.Event()), sgl


def _req(tokens: list[int], max_tokens: int | None = 4, **kw) -> PreprocessedRequest:
    return PreprocessedRequest(model="m", token_ids=tokens,
                               stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True), **kw)


async def _run(handler: DecodeWorkerHandler, req: PreprocessedRequest, ctx: Context | None = None) -> list[LLMEngineOutput]:
    return [o async for o in handler.generate(req, ctx or Context())]


async def test_stream_tokens_finish_and_usage() -> None:
    handler, _ = _handler()
    outs = await _run(handler, _req([5, 6, 7], max_tokens=4))
    assert sum(len(o.token_ids) for o in outs) == 4
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert outs[-1].usage is not None
    assert (outs[-1].usage.prompt_tokens, outs[-1].usage.completion_tokens) == (3, 4)
    assert all(o.finish_reason is None and o.usage is None for o in outs[:-1])


async def test_eos_from_request_stops_with_matched_stop() -> None:
    handler, sgl = _handler()
    first = (7 * 7 + 3) % 97
    second = (first * 7 + 3) % 97
    req = PreprocessedRequest(model="m", token_ids=[7], eos_token_ids=[second],
                              stop_conditions=StopConditions(max_tokens=10))
    outs = await _run(handler, req)
    assert [t for o in outs for t in o.token_ids] == [first, second]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].matched_stop == second
    assert second in sgl.calls[0]["sampling_params"]["stop_token_ids"]


async def test_sampling_and_logprobs_mapping() -> None:
    handler, sgl = _handler()
    req = _req([4, 5, 6], max_tokens=2,
               sampling_options=SamplingOptions(temperature=0.5, top_p=0.9, top_k=7, seed=3),
               output_options=OutputOptions(logprobs=1, prompt_logprobs=0))
    outs = await _run(handler, req)
    sp = sgl.calls[0]["sampling_params"]
    assert (sp["temperature"], sp["top_p"], sp["top_k"], sp["sampling_seed"]) == (0.5, 0.9, 7, 3)
    assert sgl.calls[0]["logprob_start_len"] == 0 and sgl.calls[0]["top_logprobs_num"] == 1
    assert [o.log_probs for o in outs] == [[-0.5], [-1.0]]
    assert all(len(o.top_logprobs[0]) == 1 for o in outs)
    assert outs[0].prompt_logprobs == [None, -1.0, -2.0]
    assert outs[0].prompt_top_logprobs is None  # prompt_logprobs=0: chosen tokens only


async def test_stop_from_caller_aborts_engine_and_finishes_cancelled() -> None:
    handler, sgl = _handler()
    ctx = Context()
    outs: list[LLMEngineOutput] = []
    async for out in handler.generate(_req([1, 2], max_tokens=500), ctx):
        outs.append(out)
        if len(outs) == 3:
            ctx.stop_generating()
    assert outs[-1].finish_reason is FinishReason.CANCELLED
    assert len(sgl.tokenizer_manager.abort_calls) == 1
    assert sgl.running == set() and handler.inflight == set()


async def test_stop_before_first_token_aborts_queued_request() -> None:
    hold = asyncio.Event()
    handler, sgl = _handler(StandInSglEngine(hold_first_token=hold))
    ctx = Context()
    task = asyncio.create_task(_run(handler, _req([1, 2], max_tokens=50), ctx))
    while not sgl.calls:
        await asyncio.sleep(0.001)
    ctx.stop_generating()
    outs = await task
    assert [t for o in outs for t in o.token_ids] == []
    assert outs[-1].finish_reason is FinishReason.CANCELLED
    assert sgl.tokenizer_manager.abort_calls == [sgl.calls[0]["rid"]]


async def test_closing_the_stream_early_frees_the_request() -> None:
    handler, sgl = _handler()
    gen = handler.generate(_req([1, 2], max_tokens=500), Context())
    await gen.__anext__()
    await gen.aclose()
    assert sgl.tokenizer_manager.abort_calls == [sgl.calls[0]["rid"]]
    assert handler.inflight == set()


async def test_shutdown_mid_stream_is_migratable() -> None:
    handler, _ = _handler()
    got = 0
    with pytest.raises(EngineShutdown) as exc:
        async for _ in handler.generate(_req([1, 2], max_tokens=500), Context()):
            got += 1
            if got == 2:
                handler.shutdown_event.set()
    assert exc.value.migratable is True


async def test_too_long_prompt_is_a_non_migratable_invalid_request() -> None:
    handler, _ = _handler(StandInSglEngine(context_len=8))
    with pytest.raises(RequestPlaneError) as exc:
        await _run(handler, _req(list(range(3, 20))))
    assert exc.value.kind == ErrorKind.INVALID_REQUEST and exc.value.migratable is False
    assert "context length" in exc.value.message


async def test_bad_sampling_is_invalid_request() -> None:
    handler, sgl = _handler()
    with pytest.raises(RequestPlaneError, match="temperature"):
        await _run(handler, _req([1], sampling_options=SamplingOptions(temperature=-0.5)))
    with pytest.raises(RequestPlaneError, match="no prompt tokens"):
        await _run(handler, _req([]))
    assert sgl.calls == []


async def test_requests_wait_for_registration() -> None:
    handler, sgl = _handler(ready=False)
    task = asyncio.create_task(_run(handler, _req([1, 2], max_tokens=2)))
    await asyncio.sleep(0.02)
    assert not task.done() and sgl.calls == []
    handler.ready.set()
    outs = await asyncio.wait_for(task, 5)
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_no_max_tokens_means_up_to_the_context() -> None:
    handler, sgl = _handler(StandInSglEngine(context_len=16))
    outs = await _run(handler, _req([1, 2, 3], max_tokens=None))
    assert sgl.calls[0]["sampling_params"]["max_new_tokens"] == 13
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_engine_stream_ending_without_finish_is_migratable() -> None:
    handler, _ = _handler(StandInSglEngine(vanish_after=2))
    got: list[LLMEngineOutput] = []
    with pytest.raises(EngineShutdown) as exc:
        async for out in handler.generate(_req([1, 2], max_tokens=10), Context()):
            got.append(out)
    assert exc.value.migratable and sum(len(o.token_ids) for o in got) == 2


async def test_decode_worker_requires_bootstrap_info() -> None:
    from armature.protocols.llm import BootstrapInfo

    handler, sgl = _handler()
    handler.require_bootstrap = True
    with pytest.raises(RequestPlaneError, match="bootstrap_info"):
        await _run(handler, _req([1, 2]))
    boot = BootstrapInfo(bootstrap_host="10.1.1.1", bootstrap_port=9000, bootstrap_room=5)
    outs = await _run(handler, _req([1, 2], max_tokens=2, bootstrap_info=boot))
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert sgl.calls[0]["bootstrap_room"] == 5
