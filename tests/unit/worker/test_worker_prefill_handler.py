"""Disaggregated prefill handler over the sgl.Engine stand-in (the real package cannot run here)."""

from __future__ import annotations

import asyncio

import pytest
from sglang_standin import StandInSglEngine

from armature.protocols.llm import BootstrapInfo, PreprocessedRequest, StopConditions
from armature.runtime.context import Context
from armature.runtime.request_plane.base import RequestPlaneError
from armature.sglang.args import SglangServerConfig
from armature.sglang.handlers.prefill import PrefillWorkerHandler
from armature.sglang.sgl_compat import SglangEngine


def _prefill_handler(monkeypatch: pytest.MonkeyPatch) -> tuple[PrefillWorkerHandler, StandInSglEngine]:
    monkeypatch.setenv("SGLANG_HOST_IP", "10.2.3.4")
    sgl = StandInSglEngine()
    sgl.server_args.disaggregation_mode = "prefill"
    sgl.server_args.disaggregation_bootstrap_port = 12345
    engine = SglangEngine(sgl, SglangServerConfig(model_path="/m", served_model_name="m"))
    ready = asyncio.Event()
    ready.set()
    return PrefillWorkerHandler(engine, ready, asyncio.Event()), sgl


def _req(**kw) -> PreprocessedRequest:
    return PreprocessedRequest(model="m", token_ids=[3, 4, 5], stop_conditions=StopConditions(max_tokens=50), **kw)


async def test_first_item_is_the_bootstrap_then_prefill_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    handler, sgl = _prefill_handler(monkeypatch)
    outs = [o async for o in handler.generate(_req(), Context())]
    assert len(outs) == 1 and outs[0].token_ids == []
    boot = outs[0].disaggregated_params
    assert (boot.bootstrap_host, boot.bootstrap_port) == ("10.2.3.4", 12345)
    call = sgl.calls[0]
    assert call["sampling_params"]["max_new_tokens"] == 1
    assert (call["bootstrap_host"], call["bootstrap_port"], call["bootstrap_room"]) == ("10.2.3.4", 12345,
                                                                                        boot.bootstrap_room)
    assert sgl.running == set()


async def test_router_chosen_room_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    handler, sgl = _prefill_handler(monkeypatch)
    req = _req(bootstrap_info=BootstrapInfo(bootstrap_host="x", bootstrap_port=1, bootstrap_room=777))
    outs = [o async for o in handler.generate(req, Context())]
    assert outs[0].disaggregated_params.bootstrap_room == 777 and sgl.calls[0]["bootstrap_room"] == 777


async def test_prompt_over_context_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    handler, _ = _prefill_handler(monkeypatch)
    req = PreprocessedRequest(model="m", token_ids=list(range(3, 100)))
    with pytest.raises(RequestPlaneError, match="context length"):
        [o async for o in handler.generate(req, Context())]
