"""The native engine: a ``Scheduler`` driven by its own thread, behind the ``Engine`` protocol.

The step loop never runs on the caller's asyncio loop: callers enqueue commands (submit, abort,
control calls), the loop thread executes them between steps, and each request's outputs cross
back with ``loop.call_soon_threadsafe`` into that request's own queue. ``ThreadedEngine`` holds
all of that and is shared with the mocker; ``NativeEngine`` adds the model (``ModelRunner`` +
``Sampler`` as the step executor), the tokenizer and the SGLang-style offline API.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from armature.engine.api import (
    EncodeOutput,
    EncodeRequest,
    EngineError,
    EngineFinishReason,
    EngineInfo,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    KvBatchCallback,
    LoadMetrics,
    OutputCallback,
    SamplingParams,
)
from armature.engine.embedding import EmbeddingBatcher
from armature.engine.kv_events import KvEventPublisher
from armature.engine.model_executor import ModelExecutor
from armature.engine.sampler import Sampler
from armature.engine.scheduler import Scheduler, SchedulerConfig
from armature.engine.server_args import KvEventsConfig, ServerArgs
from armature.protocols.kv_events import EventBatch

if TYPE_CHECKING:
    from armature.engine.disagg.config import DisaggConfig
    from armature.engine.disagg.link import DisaggLink

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound="ThreadedEngine")


class _Done:
    """An already-finished awaitable (what a synchronous ``shutdown()`` returns)."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


_DONE = _Done()
_PRE_ABORT_MEMORY = 10_000
_IDLE_WAIT_S = 0.5


class OutputSink(Protocol):
    def put(self, out: GenerateOutput) -> None: ...


class _AsyncSink:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[GenerateOutput] = asyncio.Queue()

    def put(self, out: GenerateOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _CallbackSink:
    """``generate_push``: outputs go to a callback on the caller's event loop."""

    __slots__ = ("loop", "fn")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: OutputCallback) -> None:
        self.loop = loop
        self.fn = fn

    def put(self, out: GenerateOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.fn, out)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[OutputCallback, GenerateOutput]]) -> None:
    for fn, out in items:
        try:
            fn(out)
        except Exception:  # noqa: BLE001 - one caller's failing callback must not starve the others
            log.exception("output callback for request %s failed", out.rid)


class _SyncSink:
    def __init__(self, q: queue.SimpleQueue[GenerateOutput]) -> None:
        self.queue = q

    def put(self, out: GenerateOutput) -> None:
        self.queue.put(out)


class ThreadedEngine:
    """The step-loop thread, per-request output routing and the control plane of the protocol."""

    info: EngineInfo

    def __init__(self, scheduler: Scheduler, kv_events: KvEventsConfig | None, name: str) -> None:
        self.scheduler = scheduler
        self._cmds: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._sinks_lock = threading.Lock()
        self._pre_aborted: OrderedDict[str, None] = OrderedDict()
        self._metrics = scheduler.load_metrics()
        self._paused = False
        self._stopped = threading.Event()
        self.publisher = KvEventPublisher(kv_events) if kv_events else None
        self._kv_listeners: tuple[tuple[asyncio.AbstractEventLoop, KvBatchCallback], ...] = ()
        self._name = name
        self._thread: threading.Thread | None = None
        self._start_driver()

    def _start_driver(self) -> None:
        """Start what drives the step loop: a thread of its own, so the model's forward passes
        never run on the caller's event loop (the mocker, which only sleeps, overrides this)."""
        self._thread = threading.Thread(target=self._loop, name=f"{self._name}-step-loop", daemon=True)
        self._thread.start()

    def _post(self, cmd: tuple[Any, ...]) -> None:
        """Hand a command to the step loop (it runs between two steps)."""
        self._cmds.put(cmd)

    # --- the step loop (its own thread) --------------------------------------------------

    def _loop(self) -> None:
        while True:
            busy = self.scheduler.has_work and not self._paused
            try:
                cmd = self._cmds.get_nowait() if busy else self._cmds.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    self._drain_on_stop()
                    return
                self._handle(cmd)
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
            if self.scheduler.has_work and not self._paused:
                self._step()

    def _handle(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "submit":
            _, req = cmd
            try:
                self.scheduler.add_request(req)
            except InvalidRequestError as exc:
                self._deliver([GenerateOutput(rid=req.rid, finish_reason=EngineFinishReason.ERROR, error=str(exc))])
        elif kind == "abort":
            out = self.scheduler.abort(cmd[1])
            if out is not None:
                self._publish_state()
                self._deliver([out])
        elif kind == "call":
            _, fn, fut = cmd
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:  # handed to the caller, who re-raises it
                    self._publish_state()
                    fut.set_exception(exc)
                else:
                    self._publish_state()
                    fut.set_result(result)
            return
        self._publish_state()

    def _step(self) -> None:
        self._emit(self._run_step())

    def _run_step(self) -> list[GenerateOutput]:
        try:
            return self.scheduler.step()
        except Exception as exc:  # a failed forward fails its requests, not the engine
            log.exception("engine step failed")
            outputs = self.scheduler.abort_all(f"engine step failed: {exc!r}")
            for o in outputs:
                o.finish_reason = EngineFinishReason.ERROR
            return outputs

    def _emit(self, outputs: list[GenerateOutput]) -> None:
        # Metrics first: a caller who has seen a request finish must not see it still running.
        self._publish_state()
        self._deliver(outputs)

    def add_kv_event_listener(self, on_batch: KvBatchCallback) -> None:
        """``on_batch(EventBatch)`` on the calling event loop after each step that changed the cache."""
        self._kv_listeners = (*self._kv_listeners, (asyncio.get_running_loop(), on_batch))

    def _publish_state(self) -> None:
        listeners = self._kv_listeners
        if self.publisher is not None or listeners:
            events = self.scheduler.take_events()
            if events and self.publisher is not None:
                self.publisher.publish(events)
            if events and listeners:
                batch = EventBatch(ts=time.time(), events=events, attn_dp_rank=0)
                here = _running_loop()
                for loop, on_batch in listeners:
                    if loop is here:  # the mocker's step loop runs on the worker's loop
                        on_batch(batch)
                    else:
                        with contextlib.suppress(RuntimeError):  # that loop is closed
                            loop.call_soon_threadsafe(on_batch, batch)
        else:
            self.scheduler.events.clear()
        self._metrics = self.scheduler.load_metrics()

    def _deliver(self, outputs: Sequence[GenerateOutput]) -> None:
        if not outputs:
            return
        # One cross-thread wake-up per event loop per step, not one per output: at 64 running
        # requests the per-token call_soon_threadsafe (a self-pipe write each) dominated.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputCallback, GenerateOutput]]] = {}
        others: list[tuple[OutputSink, GenerateOutput]] = []
        with self._sinks_lock:
            sinks = self._sinks
            for out in outputs:
                sink = sinks.pop(out.rid, None) if out.finish_reason is not None else sinks.get(out.rid)
                if sink is None:
                    continue
                kind = type(sink)
                if kind is _CallbackSink or kind is _AsyncSink:
                    batch = per_loop.get(sink.loop)  # type: ignore[attr-defined]
                    if batch is None:
                        batch = per_loop[sink.loop] = []  # type: ignore[attr-defined]
                    fn = sink.fn if kind is _CallbackSink else sink.queue.put_nowait  # type: ignore[attr-defined]
                    batch.append((fn, out))
                else:
                    others.append((sink, out))
        here = _running_loop()
        for loop, items in per_loop.items():
            if loop is here:  # the step loop runs on this event loop (the mocker): no hand-off
                _put_all(items)
                continue
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass
        for sink, out in others:
            sink.put(out)

    def _drain_on_stop(self) -> None:
        self._deliver(self.scheduler.abort_all("the engine is shutting down"))
        self._publish_state()
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "call":
                cmd[2].cancel()
            elif cmd[0] == "submit":
                rid = cmd[1].rid
                out = GenerateOutput(rid=rid, finish_reason=EngineFinishReason.ABORT, error="engine shut down")
                self._deliver([out])

    # --- calls from other threads --------------------------------------------------------

    def _check_alive(self) -> None:
        if self._stopped.is_set():
            raise EngineError("the engine has been shut down")

    def run_in_loop(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the step-loop thread between two steps."""
        self._check_alive()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._post(("call", fn, fut))
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.run_in_loop(fn))

    def submit(self, req: GenerateRequest, sink: OutputSink) -> None:
        """Validate and enqueue; raises ``InvalidRequestError`` right away for a bad request."""
        self._check_alive()
        self.scheduler.validate(req)
        with self._sinks_lock:
            if req.rid in self._sinks:
                raise InvalidRequestError(f"request id {req.rid!r} is already in use")
            if req.rid in self._pre_aborted:
                del self._pre_aborted[req.rid]
                sink.put(GenerateOutput(rid=req.rid, finish_reason=EngineFinishReason.ABORT, error="aborted"))
                return
            self._sinks[req.rid] = sink
        self._post(("submit", req))

    # --- the Engine protocol -------------------------------------------------------------

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        sink = _AsyncSink(asyncio.get_running_loop())
        self.submit(req, sink)
        finished = False
        try:
            while True:
                out = await sink.queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                # The consumer stopped listening (cancelled, or broke out): free what it held.
                self._post(("abort", req.rid))

    def generate_push(self, req: GenerateRequest, on_output: OutputCallback) -> None:
        self.submit(req, _CallbackSink(asyncio.get_running_loop(), on_output))

    async def abort(self, rid: str) -> None:
        with self._sinks_lock:
            if rid not in self._sinks:
                # Not submitted yet (or already done): remember it, so a submit that races
                # behind this abort finishes at once instead of running.
                self._pre_aborted[rid] = None
                while len(self._pre_aborted) > _PRE_ABORT_MEMORY:
                    self._pre_aborted.popitem(last=False)
                return
        self._post(("abort", rid))

    def load_metrics(self) -> LoadMetrics:
        return self._metrics

    async def flush_cache(self) -> bool:
        return await self._call(self.scheduler.flush_cache)

    async def encode(self, req: EncodeRequest) -> EncodeOutput:
        raise EngineError(f"{type(self).__name__} serves generative models; it does not compute embeddings")

    async def release_memory(self, tags: list[str] | None = None) -> None:
        await self._call(lambda: self._release_memory(tags))

    async def resume_memory(self, tags: list[str] | None = None) -> None:
        await self._call(lambda: self._resume_memory(tags))

    def _release_memory(self, tags: list[str] | None) -> None:
        if self.scheduler.has_work:
            raise EngineError("release_memory needs an idle engine: abort or finish the running requests first")
        self.scheduler.cache.reset()
        self._paused = True

    def _resume_memory(self, tags: list[str] | None) -> None:
        self._paused = False

    async def update_weights_from_disk(self, model_path: str) -> None:
        raise EngineError(f"{type(self).__name__} has no weights to update")

    async def start_profile(self) -> None:
        raise EngineError(f"{type(self).__name__} has no profiler")

    async def stop_profile(self) -> str | None:
        """Where the trace was written, if the engine writes one."""
        raise EngineError(f"{type(self).__name__} has no profiler")

    def shutdown(self) -> Awaitable[None]:
        """Stop the step loop (aborting what runs) and the event publisher.

        Works both ways: ``await engine.shutdown()`` inside a running event loop (the join runs
        in a worker thread), and a plain ``engine.shutdown()`` in synchronous code (it blocks
        until done, as SGLang's offline ``Engine.shutdown`` does).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.shutdown_sync()
            return _DONE
        return asyncio.ensure_future(asyncio.to_thread(self.shutdown_sync))

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown_sync()

    def shutdown_sync(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._post(("stop",))
        if self._thread is not None:
            self._thread.join()
        if self.publisher is not None:
            self.publisher.close()


def _overlap_schedule(args: ServerArgs, device: torch.device, disaggregated: bool) -> bool:
    # Disaggregated schedulers hand KV between engines at step boundaries: they step synchronously.
    if disaggregated or args.disable_overlap_schedule:
        return False
    return args.disable_overlap_schedule is False or device.type == "cuda"


# --- SGLang-style offline helpers -----------------------------------------------------------

_SAMPLING_KEYS = {f.name for f in fields(SamplingParams)}
_SAMPLING_ALIASES = {"sampling_seed": "seed", "max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}


def sampling_params_from(value: SamplingParams | dict[str, Any] | None) -> SamplingParams:
    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if not isinstance(value, dict):
        raise InvalidRequestError(f"sampling_params must be a dict or SamplingParams, got {type(value).__name__}")
    kw = {_SAMPLING_ALIASES.get(k, k): v for k, v in value.items() if v is not None}
    unknown = sorted(set(kw) - _SAMPLING_KEYS)
    if unknown:
        raise InvalidRequestError(
            f"unsupported sampling params {unknown}; the native engine takes {sorted(_SAMPLING_KEYS)} "
            "(stop strings are matched by the frontend on text)"
        )
    params = SamplingParams(**kw)
    params.validate()
    return params


def finish_reason_dict(out: GenerateOutput, completion_tokens: int) -> dict[str, Any] | None:
    fr = out.finish_reason
    if fr is None:
        return None
    if fr is EngineFinishReason.STOP:
        return {"type": "stop", "matched": out.matched_stop}
    if fr is EngineFinishReason.LENGTH:
        return {"type": "length", "length": completion_tokens}
    return {"type": fr.value, "message": out.error}


class NativeEngine(ThreadedEngine):
    """``Engine(model_path=..., **server_args)``: SGLang's offline engine, on our own runtime."""

    def __init__(
        self,
        server_args: ServerArgs | None = None,
        *,
        disaggregation: DisaggConfig | None = None,
        weights: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """``weights``: checkpoint tensors already in memory (``model_path`` then only needs its
        config.json), e.g. to serve weights another framework built, without a copy on disk."""
        from armature.engine.model_runner import ModelRunner

        args = server_args if server_args is not None else ServerArgs.from_kwargs(**kwargs)
        if server_args is not None and kwargs:
            raise TypeError("pass either server_args or keyword arguments, not both")
        self.server_args = args
        self._runner_kwargs = dict(
            dtype=args.dtype,
            device=args.device,
            page_size=args.page_size,
            max_total_tokens=args.max_total_tokens,
            mem_fraction_static=args.mem_fraction_static,
            max_context_length=args.context_length,
            attention_backend=args.attention_backend,
            cuda_graph_max_bs=args.cuda_graph_max_bs,
            disable_cuda_graph=args.disable_cuda_graph,
        )
        runner = ModelRunner(args.model_path, weights=weights, **self._runner_kwargs)  # type: ignore[arg-type]
        self.runner = runner
        cfg = runner.model_config
        self.tokenizer = None if args.skip_tokenizer_init else _load_tokenizer(runner.model_path)
        self.executor = ModelExecutor(runner, Sampler(runner.device, args.random_seed))
        sched_cfg = SchedulerConfig(
            page_size=args.page_size,
            context_length=runner.context_length,
            vocab_size=cfg.vocab_size,
            eos_token_ids=list(cfg.eos_token_ids),
            max_running_requests=args.max_running_requests,
            max_prefill_tokens=args.max_prefill_tokens,
            chunked_prefill_size=args.prefill_chunk_limit,
            enable_mixed_chunk=args.enable_mixed_chunk,
            disable_radix_cache=args.disable_radix_cache,
            stream_interval=args.stream_interval,
            random_seed=args.random_seed,
            overlap_schedule=_overlap_schedule(args, runner.device, disaggregation is not None),
        )
        self._profiler: torch.profiler.profile | None = None
        # Shapes of the KV buffers dropped by release_memory, to allocate again on resume.
        self._released_kv: list[tuple[torch.Size, torch.dtype, torch.device]] | None = None
        self._rid_counter = itertools.count()
        scheduler = Scheduler(sched_cfg, self.executor)
        if disaggregation is not None:
            from armature.engine.disagg.scheduler import DisaggScheduler

            scheduler = DisaggScheduler(sched_cfg, self.executor, disaggregation.mode)
        super().__init__(scheduler, args.kv_events(), "native")
        self.info = EngineInfo(
            model_path=str(runner.model_path),
            served_model_name=args.served_model_name or Path(args.model_path or runner.model_path).stem,
            page_size=args.page_size,
            total_kv_blocks=runner.kv_pool.total_pages,
            max_running_requests=args.max_running_requests,
            max_prefill_tokens=args.max_prefill_tokens,
            context_length=runner.context_length,
            vocab_size=cfg.vocab_size,
            bos_token_id=cfg.bos_token_id,
            eos_token_ids=list(cfg.eos_token_ids),
            dp_size=1,
            kv_events_endpoint=self.publisher.endpoint if self.publisher else None,
            engine_kind="native",
        )
        self.embeddings = EmbeddingBatcher(
            self.executor,
            self.scheduler,
            self.run_in_loop,
            token_budget=args.max_prefill_tokens,
            context_length=runner.context_length,
            vocab_size=cfg.vocab_size,
            paused=lambda: self._paused,
        )
        # Disaggregated prefill/decode: the bootstrap server (prefill) or KV puller (decode).
        self.disagg: DisaggLink | None = None
        if disaggregation is not None:
            from armature.engine.disagg.link import DisaggLink

            self.disagg = DisaggLink.attach(self, disaggregation)

    async def encode(self, req: EncodeRequest) -> EncodeOutput:
        """The prompt's embedding: its last token's final hidden state, L2-normalised."""
        return await asyncio.wrap_future(self.embeddings.submit(req))

    def shutdown_sync(self) -> None:
        super().shutdown_sync()
        # Embeddings held while memory was released have no drain coming any more.
        self.embeddings.fail_pending(EngineError("the engine has been shut down"))
        link = getattr(self, "disagg", None)
        if link is not None:
            link.close()

    # --- control calls that need the model ----------------------------------------------

    async def update_weights_from_disk(self, model_path: str) -> None:
        from armature.engine.loader import load_weights, resolve_model_path

        def swap() -> None:
            if self.scheduler.has_work:
                raise EngineError("update_weights_from_disk needs an idle engine")
            from armature.engine.config import ModelConfig

            path = resolve_model_path(model_path)
            new_cfg = ModelConfig.from_folder(path)
            old = self.runner.model_config
            for attr in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
                if getattr(new_cfg, attr) != getattr(old, attr):
                    raise EngineError(f"new weights differ in {attr}: {getattr(new_cfg, attr)} vs {getattr(old, attr)}")
            from armature.engine.models import MODEL_CLASSES

            weights = load_weights(path, new_cfg, self.runner.dtype, self.runner.device)
            self.runner.model = MODEL_CLASSES[new_cfg.architecture](new_cfg, weights, self.runner.model.rotary)
            self.runner.recapture_graphs()
            # Cached KV was computed by the old weights: it must not be reused.
            self.scheduler.cache.reset()

        await self._call(swap)

    async def start_profile(self) -> None:
        def start() -> None:
            if self._profiler is not None:
                raise EngineError("a profile is already running")
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.runner.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=acts, record_shapes=False)
            self._profiler.__enter__()

        await self._call(start)

    async def stop_profile(self) -> str:
        def stop() -> str:
            prof = self._profiler
            if prof is None:
                raise EngineError("no profile is running")
            self._profiler = None
            prof.__exit__(None, None, None)
            folder = Path(os.environ.get("ARMATURE_TORCH_PROFILER_DIR", "/tmp/armature-profiles"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"native-{int(time.time() * 1000)}.trace.json"
            prof.export_chrome_trace(str(path))
            return str(path)

        return await self._call(stop)

    def _release_memory(self, tags: list[str] | None) -> None:
        super()._release_memory(tags)
        if tags is None or "kv_cache" in tags:
            # Drop the KV buffers themselves; resume_memory allocates them again (zeroed).
            pool = self.runner.kv_pool
            self._released_kv = [(t.shape, t.dtype, t.device) for t in pool.k_buffer]
            pool.k_buffer = [torch.empty(0, dtype=t.dtype, device=t.device) for t in pool.k_buffer]
            pool.v_buffer = [torch.empty(0, dtype=t.dtype, device=t.device) for t in pool.v_buffer]

    def _resume_memory(self, tags: list[str] | None) -> None:
        released = self._released_kv
        if released and (tags is None or "kv_cache" in tags):
            pool = self.runner.kv_pool
            pool.k_buffer = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in released]
            pool.v_buffer = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in released]
            self._released_kv = None
            self.runner.recapture_graphs()
        super()._resume_memory(tags)
        self.embeddings.resume()

    # --- offline API ---------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("text prompts need the tokenizer (skip_tokenizer_init is set): pass input_ids")
        return self.tokenizer.encode(text).ids

    def _decode_text(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _build_requests(
        self,
        prompt: str | list[str] | None,
        input_ids: list[int] | list[list[int]] | None,
        sampling_params: Any,
        return_logprob: bool,
        logprob_start_len: int | None,
        top_logprobs_num: int,
        rid: str | list[str] | None,
    ) -> tuple[list[GenerateRequest], bool]:
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("pass exactly one of prompt and input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            texts = [prompt] if isinstance(prompt, str) else prompt
            token_lists = [self._encode_text(p) for p in texts]
        else:
            assert input_ids is not None
            single = bool(input_ids) and isinstance(input_ids[0], int)
            token_lists = [list(input_ids)] if single else [list(x) for x in input_ids]  # type: ignore[arg-type]
        n = len(token_lists)
        if isinstance(sampling_params, list):
            if len(sampling_params) != n:
                raise InvalidRequestError(f"{len(sampling_params)} sampling_params for {n} prompts")
            params = [sampling_params_from(p) for p in sampling_params]
        else:
            params = [sampling_params_from(sampling_params)] * n
        rids = [rid] if isinstance(rid, str) else (rid or [uuid.uuid4().hex for _ in range(n)])
        if len(rids) != n:
            raise InvalidRequestError(f"{len(rids)} rids for {n} prompts")
        reqs = [
            GenerateRequest(
                rid=r,
                input_ids=ids,
                sampling=p,
                return_logprob=return_logprob or logprob_start_len is not None,
                top_logprobs_num=top_logprobs_num,
                logprob_start_len=logprob_start_len,
            )
            for r, ids, p in zip(rids, token_lists, params)
        ]
        return reqs, single

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: SamplingParams | dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Run a prompt (or a batch) to completion; SGLang's ``Engine.generate`` result dicts."""
        reqs, single = self._build_requests(
            prompt, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num, rid
        )
        q: queue.SimpleQueue[GenerateOutput] = queue.SimpleQueue()
        sink = _SyncSink(q)
        started = time.perf_counter()
        submitted: list[GenerateRequest] = []
        try:
            for r in reqs:
                self.submit(r, sink)
                submitted.append(r)
            acc = {r.rid: _Accumulator(r) for r in reqs}
            done = 0
            while done < len(reqs):
                out = q.get()
                a = acc[out.rid]
                a.add(out)
                if out.finished:
                    a.latency = time.perf_counter() - started
                    done += 1
        except BaseException:
            for r in submitted:
                self._post(("abort", r.rid))
            raise
        results = [acc[r.rid].result(self) for r in reqs]
        return results[0] if single else results

    async def async_generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        async for out in self.generate_stream(req):
            yield out


class _Accumulator:
    def __init__(self, req: GenerateRequest) -> None:
        self.req = req
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.input_logprobs: list[float | None] | None = None
        self.input_top: list[list[tuple[int, float]]] | None = None
        self.last: GenerateOutput | None = None
        self.latency = 0.0

    def add(self, out: GenerateOutput) -> None:
        self.output_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.top_logprobs:
            self.top.extend(out.top_logprobs)
        if out.input_logprobs is not None:
            self.input_logprobs = out.input_logprobs
            self.input_top = out.input_top_logprobs
        self.last = out

    def result(self, engine: NativeEngine) -> dict[str, Any]:
        last = self.last
        assert last is not None
        if last.finish_reason is EngineFinishReason.ERROR and not self.output_ids:
            raise InvalidRequestError(last.error or "request failed")
        meta: dict[str, Any] = {
            "id": self.req.rid,
            "finish_reason": finish_reason_dict(last, len(self.output_ids)),
            "prompt_tokens": len(self.req.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": last.cached_tokens,
            "e2e_latency": self.latency,
        }
        if self.req.return_logprob:
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(self.logprobs, self.output_ids)]
            if self.req.top_logprobs_num:
                meta["output_top_logprobs"] = [[(lp, t, None) for t, lp in row] for row in self.top]
        if self.input_logprobs is not None:
            meta["input_token_logprobs"] = [(lp, t, None) for lp, t in zip(self.input_logprobs, self.req.input_ids)]
            if self.input_top is not None:
                meta["input_top_logprobs"] = [[(lp, t, None) for t, lp in row] or None for row in self.input_top]
        return {"text": engine._decode_text(self.output_ids), "output_ids": self.output_ids, "meta_info": meta}


def _load_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise EngineError(f"no tokenizer.json in {folder}; pass skip_tokenizer_init=True and input_ids")
    return Tokenizer.from_file(str(path))
