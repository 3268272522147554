"""Decode handler: the push path (``generate_push``) over an engine that pushes (the mocker), and
how handlers close an engine's stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from armature.engine.api import GenerateOutput, PushEngine
from armature.engine.server_args import ServerArgs
from armature.mocker import MockerArgs, MockerEngine
from armature.protocols.llm import FinishReason, LLMEngineOutput, PreprocessedRequest, StopConditions
from armature.runtime.context import Context
from armature.sglang.handlers.decode import DecodeWorkerHandler, closing_stream


def _handler(speedup: float) -> tuple[DecodeWorkerHandler, MockerEngine]:
    margs = MockerArgs(speedup_ratio=speedup, block_size=16, num_gpu_blocks_override=1024)
    engine = MockerEngine(ServerArgs(skip_tokenizer_init=True, context_length=4096), margs)
    ready = asyncio.Event()
    ready.set()
    return DecodeWorkerHandler(engine, ready, asyncio.Event()), engine


def _req(max_tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        model="m", token_ids=list(range(1, 41)), stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True)
    )


async def test_push_streams_the_request_to_its_end() -> None:
    handler, engine = _handler(speedup=0.0)
    try:
        assert isinstance(engine, PushEngine) and handler.can_push
        got: list[LLMEngineOutput] = []
        await asyncio.wait_for(handler.generate_push(_req(8), Context(), got.append), 10)
        assert sum(len(o.token_ids) for o in got) == 8
        assert got[-1].finish_reason is FinishReason.LENGTH
    finally:
        await engine.shutdown()


async def test_cancelled_push_handler_frees_the_request_in_the_engine() -> None:
    # The request plane cancels the handler when the caller's connection goes: the context is
    # never stopped, so only the handler's own abort frees the request's pages.
    handler, engine = _handler(speedup=1.0)
    try:
        got: list[LLMEngineOutput] = []
        task = asyncio.ensure_future(handler.generate_push(_req(10_000), Context(), got.append))

        async def first_output() -> None:
            while not got:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(first_output(), 10)
        assert engine.load_metrics().num_running_reqs == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()

        async def freed() -> None:
            while engine.load_metrics().num_running_reqs or engine.load_metrics().kv_active_blocks:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(freed(), 10)
        assert not handler.inflight
    finally:
        await engine.shutdown()


async def test_closing_stream_closes_a_generator_left_early_and_takes_any_iterator() -> None:
    cleaned: list[str] = []

    async def gen() -> AsyncIterator[GenerateOutput]:
        try:
            for i in range(5):
                yield GenerateOutput(rid=f"g{i}")
        finally:
            cleaned.append("gen")

    async with closing_stream(gen()) as stream:
        async for out in stream:
            break
    assert out.rid == "g0" and cleaned == ["gen"]

    class Plain:  # an async iterator with no aclose: what the Engine protocol promises
        def __init__(self) -> None:
            self.left = 2

        def __aiter__(self) -> Plain:
            return self

        async def __anext__(self) -> GenerateOutput:
            if not self.left:
                raise StopAsyncIteration
            self.left -= 1
            return GenerateOutput(rid="p")

    async with closing_stream(Plain()) as stream:
        assert [o.rid async for o in stream] == ["p", "p"]
