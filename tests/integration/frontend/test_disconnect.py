"""Issue 4, bar 3: a client that disconnects mid-stream stops the request down to the engine."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from integration.frontend.stack import MODEL, ServedStack

pytestmark = pytest.mark.integration


async def _wait_for_baseline(stack: ServedStack, active_blocks: int, bound_s: float = 10.0) -> float:
    start = time.monotonic()
    while True:
        m = stack.engine.load_metrics()
        if m.num_running_reqs == 0 and m.num_waiting_reqs == 0 and m.kv_active_blocks == active_blocks:
            return time.monotonic() - start
        assert time.monotonic() - start < bound_s, f"engine still busy after disconnect: {m}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_frees_engine_requests_and_pages(stack: ServedStack, stream: bool) -> None:
    baseline = stack.engine.load_metrics()
    assert baseline.num_running_reqs == 0
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 400,
        "ignore_eos": True, "stream": stream,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                    if seen >= 4:
                        break
                assert stack.engine.load_metrics().num_running_reqs == 1
        else:
            task = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
            while stack.engine.load_metrics().num_running_reqs == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    # Leaving the client closes the connection; the engine must let go of the request.
    elapsed = await _wait_for_baseline(stack, baseline.kv_active_blocks)
    print(f"engine back to baseline {elapsed * 1000:.0f} ms after the disconnect (stream={stream})")
    text = stack.frontend.metrics.render().decode()
    assert f'armature_frontend_client_disconnects_total{{model="{MODEL}"}}' in text
