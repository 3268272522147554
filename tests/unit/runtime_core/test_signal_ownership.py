"""The runtime owns SIGTERM/SIGINT: handlers installed by engine libraries are deferred."""

from __future__ import annotations

import asyncio
import os
import signal

from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime


async def test_engine_handlers_are_captured_and_run_after_shutdown() -> None:
    runtime = DistributedRuntime(MemoryStore(MemoryState()), grace_period_s=0)
    before = signal.getsignal(signal.SIGTERM)
    calls: list[str] = []
    owner = runtime.install_signal_handlers()
    try:
        loop = asyncio.get_running_loop()
        # An engine library tries both ways of taking SIGTERM over.
        loop.add_signal_handler(signal.SIGTERM, lambda: calls.append("loop-handler"))
        signal.signal(signal.SIGTERM, lambda s, f: calls.append("python-handler"))
        assert signal.getsignal(signal.SIGTERM) == owner._on_signal  # still ours

        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(runtime.wait_closed(), 5)
        assert calls == ["loop-handler", "python-handler"]  # after the runtime closed, in order
    finally:
        owner.uninstall()
        signal.signal(signal.SIGTERM, before)
    assert signal.signal is not owner._signal_signal  # the module function is restored


async def test_shutdown_by_call_runs_no_engine_handlers() -> None:
    runtime = DistributedRuntime(MemoryStore(MemoryState()), grace_period_s=0)
    before = signal.getsignal(signal.SIGINT)
    calls: list[str] = []
    owner = runtime.install_signal_handlers()
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: calls.append("engine"))
        await runtime.shutdown()
        assert calls == []
        assert signal.getsignal(signal.SIGINT) == before
    finally:
        owner.uninstall()
        signal.signal(signal.SIGINT, before)
