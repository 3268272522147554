"""``MockerEngine.generate_push``: the same outputs as ``generate_stream``, handed to a callback."""

from __future__ import annotations

import asyncio
import threading

import pytest

from armature.engine.api import (
    EngineFinishReason,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    PushEngine,
    SamplingParams,
)
from armature.engine.server_args import ServerArgs
from armature.mocker import MockerArgs, MockerEngine


def make(speedup: float = 0.0) -> MockerEngine:
    margs = MockerArgs(speedup_ratio=speedup, block_size=16, num_gpu_blocks_override=1024)
    return MockerEngine(ServerArgs(skip_tokenizer_init=True, context_length=4096), margs)


class Collector:
    def __init__(self) -> None:
        self.outputs: list[GenerateOutput] = []
        self.threads: set[int] = set()
        self.done = asyncio.Event()

    def __call__(self, out: GenerateOutput) -> None:
        self.threads.add(threading.get_ident())
        self.outputs.append(out)
        if out.finished:
            self.done.set()


async def test_push_delivers_what_the_stream_does_on_the_callers_loop() -> None:
    eng = make()
    try:
        assert isinstance(eng, PushEngine)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True, seed=7)
        pulled = [t async for o in eng.generate_stream(GenerateRequest("pull", list(range(30)), params)) for t in o.token_ids]
        got = Collector()
        eng.generate_push(GenerateRequest("push", list(range(30)), params), got)
        await asyncio.wait_for(got.done.wait(), 10)
        assert [t for o in got.outputs for t in o.token_ids] == pulled
        assert got.outputs[-1].finish_reason is EngineFinishReason.LENGTH
        assert [o for o in got.outputs if o.finished] == got.outputs[-1:]
        assert got.threads == {threading.get_ident()}
    finally:
        await eng.shutdown()


async def test_many_pushed_requests_all_finish() -> None:
    eng = make()
    try:
        collectors = [Collector() for _ in range(64)]
        for i, c in enumerate(collectors):
            eng.generate_push(GenerateRequest(f"r{i}", [1 + i, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True)), c)
        await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in collectors)), 20)
        assert all(sum(len(o.token_ids) for o in c.outputs) == 20 for c in collectors)
        m = eng.load_metrics()
        assert m.num_running_reqs == 0 and m.kv_active_blocks == 0
    finally:
        await eng.shutdown()


async def test_a_bad_request_is_refused_at_once_and_abort_ends_a_pushed_one() -> None:
    eng = make(speedup=1.0)
    try:
        with pytest.raises(InvalidRequestError, match="context length"):
            eng.generate_push(GenerateRequest("long", [1] * 4096, SamplingParams(max_new_tokens=1)), Collector())
        got = Collector()
        eng.generate_push(GenerateRequest("late", list(range(40)), SamplingParams(max_new_tokens=10_000)), got)

        async def first_output() -> None:
            while not got.outputs:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(first_output(), 10)
        await eng.abort("late")
        await asyncio.wait_for(got.done.wait(), 10)
        assert got.outputs[-1].finish_reason is EngineFinishReason.ABORT
        m = eng.load_metrics()
        assert m.num_running_reqs == 0 and m.kv_active_blocks == 0
    finally:
        await eng.shutdown()
