from __future__ import annotations

import asyncio
import sys
import time

import pytest

from armature.mocker.deadline import DeadlineTimer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux-only")


async def test_sleep_until_never_returns_before_the_deadline() -> None:
    timer = DeadlineTimer.create(asyncio.get_running_loop())
    assert timer is not None
    try:
        for delay in (0.0003, 0.0011, 0.002):
            deadline = time.perf_counter() + delay
            await timer.sleep_until(deadline)
            assert time.perf_counter() >= deadline
    finally:
        timer.close()


async def test_a_deadline_in_the_past_returns() -> None:
    timer = DeadlineTimer.create(asyncio.get_running_loop())
    assert timer is not None
    try:
        await asyncio.wait_for(timer.sleep_until(time.perf_counter() - 1.0), 5.0)
    finally:
        timer.close()


async def test_a_cancelled_sleep_leaves_the_timer_usable() -> None:
    timer = DeadlineTimer.create(asyncio.get_running_loop())
    assert timer is not None
    try:
        task = asyncio.ensure_future(timer.sleep_until(time.perf_counter() + 30.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.perf_counter() + 0.001
        await asyncio.wait_for(timer.sleep_until(deadline), 5.0)
        assert time.perf_counter() >= deadline
    finally:
        timer.close()


async def test_a_closed_timer_refuses_to_sleep() -> None:
    timer = DeadlineTimer.create(asyncio.get_running_loop())
    assert timer is not None
    timer.close()
    timer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await timer.sleep_until(time.perf_counter() + 0.001)
