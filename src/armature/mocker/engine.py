"""``MockerEngine``: the native engine's scheduler and radix cache over a simulated runner."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from armature.engine.api import EngineInfo, GenerateOutput
from armature.engine.engine import ThreadedEngine
from armature.engine.scheduler import Scheduler, SchedulerConfig
from armature.engine.server_args import ServerArgs
from armature.mocker.args import MockerArgs
from armature.mocker.deadline import DeadlineTimer
from armature.mocker.runner import SimulatedExecutor

log = logging.getLogger(__name__)
T = TypeVar("T")

# A step that starts up to this long after the previous simulated forward ended follows on from
# its end: the step loop's wake-up comes a little late when the event loop is busy, and
# following on keeps the model's pace over many steps. It never runs faster than the model:
# each forward still takes its full predicted time after the previous one, and never starts
# before the newest request reached the engine.
_TIMER_SLACK_S = 0.002
_STOP_WAIT_S = 10.0
# A sleep longer than this waits on the loop's timer until this much is left, then on a thread.
_COARSE_SLEEP_S = 0.002
# Shorter steps of more requests than this sleep on the loop's timer alone.
_EXACT_TIMER_MAX_BATCH = 4


def _model_facts(model_path: str | None, args: MockerArgs) -> tuple[int, list[int], int | None, int]:
    """vocab size, EOS ids, BOS id and context length from a model folder's config.json if any."""
    if model_path:
        folder = Path(model_path)
        if folder.is_file() and folder.suffix.lower() == ".gguf":
            # The tokenizer and vocabulary of a GGUF come from its converted folder (made once).
            from armature.engine.loader import resolve_model_path

            folder = resolve_model_path(folder)
        cfg_path = folder / "config.json"
        if cfg_path.is_file():
            raw = json.loads(cfg_path.read_text())
            eos = raw.get("eos_token_id")
            eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([] if eos is None else [int(eos)])
            ctx = int(raw.get("max_position_embeddings") or args.context_length)
            return int(raw.get("vocab_size") or args.vocab_size), eos_ids, raw.get("bos_token_id"), ctx
    return args.vocab_size, [], None, args.context_length


class MockerEngine(ThreadedEngine):
    """Implements the ``Engine`` protocol with simulated forwards.

    Scheduling comes from ``MockerArgs`` (Dynamo's mocker flags); the model identity, the context
    length cap, KV events, stream interval and seed come from ``ServerArgs``.
    """

    def __init__(self, server_args: ServerArgs | None = None, mocker_args: MockerArgs | None = None) -> None:
        sargs = server_args or ServerArgs(skip_tokenizer_init=True)
        margs = mocker_args or MockerArgs()
        self.server_args = sargs
        self.mocker_args = margs
        vocab, eos, bos, ctx = _model_facts(sargs.model_path, margs)
        if sargs.context_length is not None:
            ctx = sargs.context_length
        self.executor = SimulatedExecutor(
            num_pages=margs.num_gpu_blocks_override,
            page_size=margs.block_size,
            vocab_size=vocab,
            speedup_ratio=margs.speedup_ratio,
            seed=sargs.random_seed,
        )
        config = SchedulerConfig(
            page_size=margs.block_size,
            context_length=ctx,
            vocab_size=vocab,
            eos_token_ids=eos,
            max_running_requests=margs.max_num_seqs,
            max_prefill_tokens=margs.max_num_batched_tokens,
            chunked_prefill_size=margs.max_num_batched_tokens if margs.enable_chunked_prefill else None,
            # vLLM-style steps: new prefill chunks ride along with the running decodes.
            enable_mixed_chunk=True,
            disable_radix_cache=not margs.enable_prefix_caching,
            stream_interval=sargs.stream_interval,
            watermark_pages=int(margs.watermark * margs.num_gpu_blocks_override),
            random_seed=sargs.random_seed,
        )
        self.executor.timer_slack_s = _TIMER_SLACK_S
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._deadline_timer: DeadlineTimer | None = None
        self._driver_lock = threading.Lock()
        self._driver_done = threading.Event()
        self._timer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mocker-timer")
        super().__init__(Scheduler(config, self.executor), sargs.kv_events(), "mocker")
        self.info = EngineInfo(
            model_path=sargs.model_path or "mocker",
            served_model_name=sargs.served_model_name or Path(sargs.model_path or "mocker").name,
            page_size=margs.block_size,
            total_kv_blocks=margs.num_gpu_blocks_override,
            max_running_requests=margs.max_num_seqs,
            max_prefill_tokens=margs.max_num_batched_tokens,
            context_length=ctx,
            vocab_size=vocab,
            bos_token_id=bos,
            eos_token_ids=eos,
            dp_size=1,
            kv_events_endpoint=self.publisher.endpoint if self.publisher else None,
            engine_kind="mocker",
        )

    # --- the step loop: a task on the caller's event loop ------------------------------------
    #
    # The mocker has no model: its "forward" is a sleep. So its step loop runs as an asyncio
    # task on the event loop of whoever first uses it (the worker's), sleeping with the loop
    # instead of blocking a thread: no cross-thread hand-off per step, no GIL contention with
    # the request plane. The scheduler, commands, metrics and output routing are the native
    # engine's own (ThreadedEngine). Used from plain threads with no event loop, it falls back
    # to the native engine's step-loop thread.

    def _start_driver(self) -> None:
        pass  # started by the first command, on the loop (or thread) that sends it

    def _ensure_driver(self) -> None:
        with self._driver_lock:
            if self._thread is not None:
                return
            if self._task_loop is not None and not self._task_loop.is_closed():
                return
            # Not started yet, or its event loop has closed (a script's asyncio.run() after
            # another): start it where this caller runs. The scheduler's state carries over.
            self._task_loop = self._task = self._wake = None
            loop = _running_loop()
            if loop is None:
                self.executor.blocking = True
                super()._start_driver()
                return
            self.executor.blocking = False
            self._wake = asyncio.Event()
            self._task_loop = loop
            self._task = loop.create_task(self._drive(), name="mocker-step-loop")

    def _post(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "submit":
            # A simulated forward never starts before its newest request arrived (a plain float
            # store: atomic under the GIL, read by the step loop).
            self.executor.not_before = time.perf_counter()
        self._cmds.put(cmd)
        self._ensure_driver()
        loop, wake = self._task_loop, self._wake
        if loop is None or wake is None:
            return
        if _running_loop() is loop:
            wake.set()
        else:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that loop is closed: nothing will run the commands
                pass

    def run_in_loop(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._task_loop is not None and _running_loop() is self._task_loop:
            # Called from the step loop's own event loop: the step loop is parked between two
            # steps right now, so run it here (a blocking .result() on a queued call would hang).
            self._check_alive()
            fut: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._handle(("call", fn, fut))
            return fut
        return super().run_in_loop(fn)

    def _drain_commands(self) -> bool:
        """Run the queued commands; False once told to stop."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True
            if cmd[0] == "stop":
                self._drain_on_stop()
                return False
            self._handle(cmd)

    async def _drive(self) -> None:
        wake = self._wake
        assert wake is not None
        self._deadline_timer = DeadlineTimer.create(asyncio.get_running_loop())
        try:
            while self._drain_commands():
                if self.scheduler.has_work and not self._paused:
                    outputs: list[GenerateOutput] = self._run_step()
                    try:
                        await self._sleep_until(self.executor.deadline, self.executor.batch_size)
                    finally:  # even when cancelled: what the step produced reaches its callers
                        self.executor.forward_done()
                        self._emit(outputs)
                else:
                    wake.clear()
                    if self._cmds.empty():
                        await wake.wait()
        finally:
            timer, self._deadline_timer = self._deadline_timer, None
            if timer is not None:
                timer.close()
            self._driver_done.set()

    async def _sleep_until(self, deadline: float, batch_size: int) -> None:
        """Sleep until ``deadline`` (perf_counter), exactly enough that the model's times hold.

        On Linux a timerfd on the loop (``DeadlineTimer``) wakes it at the deadline itself.
        Elsewhere: the event loop's timer ticks in whole milliseconds (a 1.72 ms prefill would
        take 2 ms); a timer thread is exact but costs a hand-off per step, which on a busy worker adds up.
        So: the loop's timer for the bulk of a long sleep and the thread for its last stretch;
        the thread alone for a short step of few requests (latency is what is measured then);
        the loop's timer alone (rounded up) for a short step of many, whose lateness following
        on absorbs (``SimulatedExecutor.timer_slack_s``).
        """
        delay = deadline - time.perf_counter()
        if delay <= 0:
            await asyncio.sleep(0)  # let the callers' tasks run before the next step
            return
        timer = self._deadline_timer
        if timer is not None:  # exact, and no thread: the loop's poll wakes at the deadline
            await timer.sleep_until(deadline)
            return
        if delay < _COARSE_SLEEP_S and batch_size > _EXACT_TIMER_MAX_BATCH:
            await asyncio.sleep(delay + 0.0005)  # uvloop rounds to the nearest ms: round up
            return
        if delay > _COARSE_SLEEP_S:
            await asyncio.sleep(delay - _COARSE_SLEEP_S)
            delay = deadline - time.perf_counter()
            if delay <= 0:
                return
        await asyncio.wrap_future(self._timer.submit(time.sleep, delay))

    def shutdown_sync(self) -> None:
        if self._stopped.is_set():
            return
        loop, task, wake = self._task_loop, self._task, self._wake
        if loop is None or wake is None:
            super().shutdown_sync()  # never started, or on the step-loop thread: stop and join it
            self._timer.shutdown(wait=False)
            return
        self._stopped.set()
        self._cmds.put(("stop",))
        inline = _running_loop() is loop or loop.is_closed()
        if not inline:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # closed meanwhile
                inline = True
        if inline:
            # The task cannot run while this call blocks its loop (or its loop is gone): stop
            # here, on this thread; the "stop" just queued aborts what runs.
            if task is not None:
                task.cancel()
            self._drain_commands()
        elif not self._driver_done.wait(_STOP_WAIT_S):
            log.warning("the mocker's step loop did not stop within %.0f s", _STOP_WAIT_S)
        self._timer.shutdown(wait=False)
        if self.publisher is not None:
            self.publisher.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
