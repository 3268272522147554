"""Failure and cancellation between a prefill and a decode engine (one process, loopback)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from disagg_pair import ENGINE_KW, bootstrap_of, decode_engine, greedy, prefill_engine, settled

from armature.engine.api import EngineFinishReason, GenerateOutput, GenerateRequest
from armature.engine.disagg import DisaggConfig, DisaggMode, TransferBackend
from armature.engine.disagg.scheduler import is_transfer_error
from armature.engine.engine import NativeEngine
from armature.protocols.llm import BootstrapInfo

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
PROMPT = list(range(100, 400))


@pytest.fixture(scope="module")
def prefill(tiny_llama_path: Path) -> Iterator[NativeEngine]:
    eng = prefill_engine(tiny_llama_path, timeout_s=TIMEOUT_S)
    yield eng
    eng.shutdown_sync()


@pytest.fixture(scope="module")
def decode(tiny_llama_path: Path) -> Iterator[NativeEngine]:
    # A long wait for the KV, so the prefill side's bootstrap timeout is what ends an orphan.
    eng = decode_engine(tiny_llama_path, TransferBackend.TCP, timeout_s=TIMEOUT_S, waiting_s=30.0)
    yield eng
    eng.shutdown_sync()


async def last_output(engine: NativeEngine, req: GenerateRequest) -> GenerateOutput:
    last = None
    async for o in engine.generate_stream(req):
        last = o
    assert last is not None
    return last


async def at_baseline(*engines: NativeEngine) -> None:
    for eng in engines:
        await settled(eng)
        m = eng.load_metrics()
        assert (m.num_running_reqs, m.num_waiting_reqs, m.kv_active_blocks) == (0, 0, 0)


def open_rooms(prefill: NativeEngine) -> int:
    assert prefill.disagg is not None and prefill.disagg.server is not None
    return prefill.disagg.server.open_rooms


async def test_decode_side_that_never_connects_frees_the_prefill(prefill: NativeEngine) -> None:
    boot = bootstrap_of(prefill)
    req = GenerateRequest(rid="lonely-prefill", input_ids=PROMPT, sampling=greedy(1), bootstrap=boot)
    out = await last_output(prefill, req)
    # The prefill computed its token and staged its KV; its stream stays open until the room is
    # done, and nobody came for it within the bootstrap timeout: the request ends, KV dropped.
    assert out.token_ids and out.finish_reason is EngineFinishReason.ABORT
    assert "no decode side connected" in (out.error or "")
    assert open_rooms(prefill) == 0
    await at_baseline(prefill)


async def test_cancelled_prefill_drops_its_staged_kv(prefill: NativeEngine) -> None:
    boot = bootstrap_of(prefill)
    req = GenerateRequest(rid="staged-then-cancelled", input_ids=PROMPT, sampling=greedy(1), bootstrap=boot)
    task = asyncio.ensure_future(last_output(prefill, req))
    for _ in range(200):  # computed and staged, waiting for its decode side
        if prefill.scheduler.held_prefills == 1:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert prefill.scheduler.held_prefills == 1 and open_rooms(prefill) == 1  # type: ignore[attr-defined]
    await prefill.abort("staged-then-cancelled")
    out = await task
    assert out.finish_reason is EngineFinishReason.ABORT
    for _ in range(100):
        if open_rooms(prefill) == 0:
            break
        await asyncio.sleep(0.01)
    assert open_rooms(prefill) == 0
    await at_baseline(prefill)


async def test_prefill_request_that_never_arrives_fails_the_decode(
    prefill: NativeEngine, decode: NativeEngine
) -> None:
    boot = bootstrap_of(prefill)
    req = GenerateRequest(rid="orphan-decode", input_ids=PROMPT, sampling=greedy(8), bootstrap=boot)
    out = await last_output(decode, req)
    assert out.finish_reason is EngineFinishReason.ERROR and is_transfer_error(out.error)
    assert "no prefill request" in (out.error or "")
    await at_baseline(prefill, decode)


async def test_unreachable_bootstrap_server_fails_the_decode(decode: NativeEngine) -> None:
    boot = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=1, bootstrap_room=secrets.randbits(63))
    req = GenerateRequest(rid="nowhere", input_ids=PROMPT, sampling=greedy(4), bootstrap=boot)
    out = await last_output(decode, req)
    assert out.finish_reason is EngineFinishReason.ERROR and is_transfer_error(out.error)
    assert "127.0.0.1:1" in (out.error or "")
    await at_baseline(decode)


async def test_cancelled_decode_aborts_its_prefill(prefill: NativeEngine, decode: NativeEngine) -> None:
    boot = bootstrap_of(prefill)
    dreq = GenerateRequest(rid="cancel-d", input_ids=PROMPT, sampling=greedy(8), bootstrap=boot)
    dtask = asyncio.ensure_future(last_output(decode, dreq))
    # The decode side is connected and waiting (its pages reserved) before the prefill arrives.
    for _ in range(100):
        if open_rooms(prefill) == 1:
            break
        await asyncio.sleep(0.01)
    assert decode.load_metrics().kv_active_blocks > 0
    await decode.abort("cancel-d")
    out = await dtask
    assert out.finish_reason is EngineFinishReason.ABORT
    # A prefill request for that room arriving afterwards finds it gone and is not served KV-less.
    for _ in range(100):
        if open_rooms(prefill) == 0:
            break
        await asyncio.sleep(0.01)
    assert open_rooms(prefill) == 0
    await at_baseline(prefill, decode)


async def test_prefill_aborted_mid_flight_fails_the_decode(
    prefill: NativeEngine, decode: NativeEngine
) -> None:
    boot = bootstrap_of(prefill)
    long_prompt = list(range(10, 3000))
    preq = GenerateRequest(rid="abort-p", input_ids=long_prompt, sampling=greedy(1), bootstrap=boot)
    dreq = GenerateRequest(rid="abort-d", input_ids=long_prompt, sampling=greedy(8), bootstrap=boot)
    dtask = asyncio.ensure_future(last_output(decode, dreq))
    ptask = asyncio.ensure_future(last_output(prefill, preq))
    for _ in range(200):  # abort it once it is in the engine (queued or mid-prefill)
        m = prefill.load_metrics()
        if m.num_running_reqs + m.num_waiting_reqs > 0 or ptask.done():
            break
        await asyncio.sleep(0.005)
    await prefill.abort("abort-p")
    pout = await ptask
    dout = await dtask
    if pout.finish_reason is EngineFinishReason.ABORT:
        assert dout.finish_reason is EngineFinishReason.ERROR and is_transfer_error(dout.error)
        assert "aborted" in (dout.error or "")
    else:  # the prefill won the race: then the decode simply completes
        assert dout.finish_reason is EngineFinishReason.LENGTH
    await at_baseline(prefill, decode)


async def test_layout_mismatch_is_a_clear_error(tiny_llama_path: Path, prefill: NativeEngine) -> None:
    cfg = DisaggConfig(
        mode=DisaggMode.DECODE, transfer_backend=TransferBackend.SHM, bootstrap_timeout_s=TIMEOUT_S
    )
    kw = {**ENGINE_KW, "page_size": 32}  # pages twice the prefill side's
    other = NativeEngine(model_path=str(tiny_llama_path), disaggregation=cfg, **kw)  # type: ignore[arg-type]
    try:
        boot = bootstrap_of(prefill)
        dreq = GenerateRequest(rid="mismatch", input_ids=PROMPT, sampling=greedy(4), bootstrap=boot)
        out = await last_output(other, dreq)
        assert out.finish_reason is EngineFinishReason.ERROR and "KV layout mismatch" in (out.error or "")
        await at_baseline(other)
    finally:
        other.shutdown_sync()


async def test_prefill_engine_shutdown_fails_waiting_decodes(
    tiny_llama_path: Path, decode: NativeEngine
) -> None:
    doomed = prefill_engine(tiny_llama_path, timeout_s=30)
    boot = bootstrap_of(doomed)
    dreq = GenerateRequest(rid="orphaned-by-shutdown", input_ids=PROMPT, sampling=greedy(4), bootstrap=boot)
    dtask = asyncio.ensure_future(last_output(decode, dreq))
    for _ in range(100):
        if doomed.disagg and doomed.disagg.server and doomed.disagg.server.open_rooms == 1:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(doomed.shutdown_sync)
    out = await asyncio.wait_for(dtask, 30)
    assert out.finish_reason is EngineFinishReason.ERROR and is_transfer_error(out.error)
    await at_baseline(decode)
