"""The one place that knows the real ``sglang`` package: imports, field names, call shapes.

``SglangEngine`` adapts an ``sgl.Engine`` (or any object with the same contract) to Armature's
``Engine`` protocol, so handlers treat SGLang exactly like the native engine and the mocker:

* our ``GenerateRequest`` becomes ``async_generate(input_ids=…, sampling_params={…}, stream=True,
  rid=…, return_logprob, top_logprobs_num, logprob_start_len, bootstrap_host/port/room)``;
* each streamed chunk's ``output_ids`` (disjoint, because the worker forces SGLang's incremental
  streaming) and ``meta_info`` (finish reason dict, token counts, logprob tuples) become a
  ``GenerateOutput`` delta;
* abort goes through ``tokenizer_manager.abort_request(rid=…)``.

The adapter takes the engine object as an argument so it can be exercised without the package
(tests use a stand-in named as such); ``create_sgl_engine`` is the only code that imports it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import math
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from armature.engine.api import (
    EncodeOutput,
    EncodeRequest,
    EngineFinishReason,
    EngineInfo,
    GenerateOutput,
    GenerateRequest,
    InvalidRequestError,
    LoadMetrics,
    SamplingParams,
)

if TYPE_CHECKING:
    from armature.sglang.args import SglangServerConfig


def reserve_free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (several workers on one host must not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sglang_importable() -> bool:
    return importlib.util.find_spec("sglang") is not None


def sglang_usable() -> bool:
    """The real engine can run here: the package imports and a CUDA device is present."""
    if not sglang_importable():
        return False
    import torch

    return bool(torch.cuda.is_available())


def server_kwargs(server: SglangServerConfig) -> dict[str, Any]:
    """``sgl.Engine(**kwargs)`` for our parsed server config (SGLang's own field names)."""
    kwargs: dict[str, Any] = {
        "model_path": server.model_path,
        "served_model_name": server.served_model_name,
        "tp_size": server.tp_size,
        "dp_size": server.dp_size,
        "max_prefill_tokens": server.max_prefill_tokens,
        "dtype": server.dtype,
        "enable_metrics": server.enable_metrics,
        # The frontend tokenizes and detokenizes; SGLang works on token ids only.
        "skip_tokenizer_init": True,
        "disaggregation_mode": server.disaggregation_mode,
        # SGLang needs a number; reserving it here, not at parse time, keeps it clear of the
        # status server's ephemeral port.
        "disaggregation_bootstrap_port": server.disaggregation_bootstrap_port or reserve_free_port(),
        "disaggregation_transfer_backend": server.disaggregation_transfer_backend,
        "stream_interval": server.stream_interval,
        "disable_radix_cache": server.disable_radix_cache,
        "disable_cuda_graph": server.disable_cuda_graph,
        "disable_overlap_schedule": server.disable_overlap_schedule,
        "trust_remote_code": server.trust_remote_code,
        "is_embedding": server.is_embedding,
        "log_level": server.log_level,
    }
    optional = {
        "page_size": server.page_size,
        "context_length": server.context_length,
        "max_running_requests": server.max_running_requests,
        "chunked_prefill_size": server.chunked_prefill_size,
        "max_total_tokens": server.max_total_tokens,
        "mem_fraction_static": server.mem_fraction_static,
        "device": server.device,
        "kv_events_config": server.kv_events_config,
        "chat_template": server.chat_template,
        "random_seed": server.random_seed,
        "attention_backend": server.attention_backend,
        "cuda_graph_max_bs": server.cuda_graph_max_bs,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def create_sgl_engine(server: SglangServerConfig) -> Any:
    """Start the real ``sgl.Engine`` (GPU clusters). Import errors surface with a clear message."""
    try:
        import sglang as sgl
        from sglang.srt.server_args import ServerArgs
    except ImportError as exc:
        raise RuntimeError(
            "--engine sglang needs the 'sglang' package (pip install sglang on a CUDA host); "
            "use --engine native on CPU"
        ) from exc
    kwargs = server_kwargs(server)
    fields = inspect.signature(ServerArgs).parameters
    # Disjoint per-chunk output_ids: the field was renamed between SGLang releases.
    for name in ("incremental_streaming_output", "stream_output"):
        if name in fields:
            kwargs[name] = True
            break
    return sgl.Engine(server_args=ServerArgs(**{k: v for k, v in kwargs.items() if k in fields}))


def sampling_params_dict(sp: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params`` keys; defaults are left out so SGLang's own apply."""
    out: dict[str, Any] = {
        "max_new_tokens": sp.max_new_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k,
        "min_p": sp.min_p,
        "frequency_penalty": sp.frequency_penalty,
        "presence_penalty": sp.presence_penalty,
        "repetition_penalty": sp.repetition_penalty,
        "ignore_eos": sp.ignore_eos,
    }
    if sp.min_new_tokens:
        out["min_new_tokens"] = sp.min_new_tokens
    if sp.stop_token_ids:
        out["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.seed is not None:
        out["sampling_seed"] = sp.seed
    return out


def _logprob_values(entries: list[Any] | None) -> list[float | None]:
    # SGLang logprob entries are (logprob, token_id, text_or_None) tuples.
    return [None if e is None or e[0] is None else float(e[0]) for e in entries or []]


def _top_pairs(entries: list[Any] | None) -> list[list[tuple[int, float]]]:
    out: list[list[tuple[int, float]]] = []
    for position in entries or []:
        out.append([(int(t[1]), float(t[0])) for t in position or [] if t is not None and t[0] is not None])
    return out


def _take_new(cumulative: list[Any] | None, seen: int, n_new: int) -> list[Any]:
    """SGLang's logprob lists may be cumulative or per-chunk depending on version: accept both."""
    if not cumulative:
        return []
    if len(cumulative) >= seen + n_new and len(cumulative) != n_new:
        return cumulative[seen : seen + n_new]
    return cumulative[-n_new:] if n_new else []


@dataclass
class _Tracked:
    prompt_tokens: int
    generated: int = 0


class SglangEngine:
    """Armature ``Engine`` over an ``sgl.Engine``-shaped object."""

    def __init__(self, sgl_engine: Any, server: SglangServerConfig) -> None:
        self._sgl = sgl_engine
        self._server = server
        self._aborted: set[str] = set()
        self._inflight: dict[str, _Tracked] = {}
        self._last_running = 0
        self._last_waiting = 0
        self._prompt_tokens_total = 0
        self._cached_tokens_total = 0
        params = inspect.signature(sgl_engine.async_generate).parameters
        # Newer SGLang renamed the DP-rank argument; older ones lack priority (Dynamo probes too).
        self._dp_kw = "routed_dp_rank" if "routed_dp_rank" in params else "data_parallel_rank"
        self.info = self._build_info()

    def _build_info(self) -> EngineInfo:
        sa = self._sgl.server_args
        page_size = int(getattr(sa, "page_size", None) or 1)
        sched = getattr(self._sgl, "scheduler_info", None) or {}
        max_total_tokens = int(sched.get("max_total_num_tokens") or getattr(sa, "max_total_tokens", 0) or 0)
        model_config = self._sgl.tokenizer_manager.model_config
        hf = getattr(model_config, "hf_config", None)
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
        bos = getattr(hf, "bos_token_id", None)
        disaggregated = getattr(sa, "disaggregation_mode", "null") not in (None, "null")
        return EngineInfo(
            model_path=str(sa.model_path),
            served_model_name=str(getattr(sa, "served_model_name", None) or sa.model_path),
            page_size=page_size,
            total_kv_blocks=math.ceil(max_total_tokens / page_size),
            max_running_requests=int(
                sched.get("max_running_requests") or getattr(sa, "max_running_requests", None) or 0
            ),
            max_prefill_tokens=int(getattr(sa, "max_prefill_tokens", 0) or 0),
            context_length=int(model_config.context_len),
            vocab_size=int(model_config.vocab_size),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            dp_size=int(getattr(sa, "dp_size", 1) or 1),
            bootstrap_host=bootstrap_host() if disaggregated else None,
            bootstrap_port=getattr(sa, "disaggregation_bootstrap_port", None) if disaggregated else None,
            kv_events_endpoint=_local_kv_events_endpoint(getattr(sa, "kv_events_config", None)),
            engine_kind="sglang",
        )

    def _call_kwargs(self, req: GenerateRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": list(req.input_ids),
            "sampling_params": sampling_params_dict(req.sampling),
            "stream": True,
            "rid": req.rid,
        }
        if req.return_logprob:
            kwargs["return_logprob"] = True
            kwargs["top_logprobs_num"] = req.top_logprobs_num
            if req.logprob_start_len is not None:
                kwargs["logprob_start_len"] = req.logprob_start_len
        if req.bootstrap is not None:
            kwargs["bootstrap_host"] = req.bootstrap.bootstrap_host
            kwargs["bootstrap_port"] = req.bootstrap.bootstrap_port
            kwargs["bootstrap_room"] = req.bootstrap.bootstrap_room
        if req.dp_rank is not None:
            kwargs[self._dp_kw] = req.dp_rank
        if req.lora_name:
            kwargs["lora_path"] = req.lora_name
        return kwargs

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        req.sampling.validate()
        if req.rid in self._aborted:
            # Aborted before it reached SGLang: never start it.
            self._aborted.discard(req.rid)
            yield GenerateOutput(rid=req.rid, finish_reason=EngineFinishReason.ABORT,
                                 prompt_tokens=len(req.input_ids))
            return
        self._inflight[req.rid] = _Tracked(prompt_tokens=len(req.input_ids))
        stream: Any = None
        try:
            try:
                stream = await self._sgl.async_generate(**self._call_kwargs(req))
            except ValueError as exc:
                # SGLang validates (context length, sampling) by raising ValueError.
                raise InvalidRequestError(str(exc)) from exc
            seen = 0
            first = True
            async for chunk in _aiter_guarded(stream):
                out = self._convert(req, chunk, seen, first)
                first = False
                seen += len(out.token_ids)
                self._inflight[req.rid].generated = seen
                yield out
                if out.finished:
                    return
        finally:
            self._inflight.pop(req.rid, None)
            self._aborted.discard(req.rid)
            # Close SGLang's generator now rather than at garbage collection, so its request
            # state is released when we stop reading (finish, abort or caller gone).
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()

    def _convert(self, req: GenerateRequest, chunk: dict[str, Any], seen: int, first: bool) -> GenerateOutput:
        meta: dict[str, Any] = chunk.get("meta_info") or {}
        ids = chunk.get("output_ids")
        if ids is None:
            ids = chunk.get("token_ids") or []  # older SGLang builds
        token_ids = [int(t) for t in ids]
        out = GenerateOutput(rid=req.rid, token_ids=token_ids)
        if "num_running_reqs" in meta:
            self._last_running = int(meta["num_running_reqs"])
            self._last_waiting = int(meta.get("num_waiting_reqs", 0))
        if req.return_logprob and token_ids:
            out.logprobs = [
                v if v is not None else float("-inf")
                for v in _logprob_values(_take_new(meta.get("output_token_logprobs"), seen, len(token_ids)))
            ]
            if req.top_logprobs_num:
                out.top_logprobs = _top_pairs(_take_new(meta.get("output_top_logprobs"), seen, len(token_ids)))
        if first and req.return_logprob and req.logprob_start_len is not None:
            out.input_logprobs = _logprob_values(meta.get("input_token_logprobs"))
            if req.top_logprobs_num:
                out.input_top_logprobs = _top_pairs(meta.get("input_top_logprobs"))
        finish = meta.get("finish_reason")
        if finish:
            out.prompt_tokens = int(meta.get("prompt_tokens", len(req.input_ids)))
            out.completion_tokens = int(meta.get("completion_tokens", seen + len(token_ids)))
            out.cached_tokens = int(meta.get("cached_tokens", 0) or 0)
            self._prompt_tokens_total += out.prompt_tokens
            self._cached_tokens_total += out.cached_tokens
            self._apply_finish(req.rid, out, finish)
        return out

    def _apply_finish(self, rid: str, out: GenerateOutput, finish: Any) -> None:
        kind = finish.get("type") if isinstance(finish, dict) else str(finish)
        if kind == "stop":
            out.finish_reason = EngineFinishReason.STOP
            matched = finish.get("matched") if isinstance(finish, dict) else None
            if isinstance(matched, int):
                out.matched_stop = matched
        elif kind == "length":
            out.finish_reason = EngineFinishReason.LENGTH
        elif kind is not None and kind.startswith("abort"):
            if rid in self._aborted:
                out.finish_reason = EngineFinishReason.ABORT
            else:
                # SGLang aborted on its own (bad input, OOM, transfer failure): that is an error.
                out.finish_reason = EngineFinishReason.ERROR
                out.error = str(finish.get("message") if isinstance(finish, dict) else finish) or "aborted by SGLang"
        else:
            out.finish_reason = EngineFinishReason.ERROR
            out.error = f"unknown SGLang finish reason {finish!r}"

    async def encode(self, req: EncodeRequest) -> EncodeOutput:
        result = await self._sgl.async_encode(prompt=list(req.input_ids), rid=req.rid)
        item = result[0] if isinstance(result, list) else result
        meta = item.get("meta_info") or {}
        return EncodeOutput(
            rid=req.rid,
            embedding=[float(x) for x in item["embedding"]],
            prompt_tokens=int(meta.get("prompt_tokens", len(req.input_ids))),
        )

    async def abort(self, rid: str) -> None:
        self._aborted.add(rid)
        result = self._sgl.tokenizer_manager.abort_request(rid=rid, abort_all=False)
        if inspect.isawaitable(result):
            await result

    def load_metrics(self) -> LoadMetrics:
        # SGLang does not expose page counts per request through the offline API: estimate the
        # locked pages from what this worker has in flight (prompt + generated tokens).
        page = max(self.info.page_size, 1)
        active = sum(math.ceil((t.prompt_tokens + t.generated) / page) for t in self._inflight.values())
        hit = self._cached_tokens_total / self._prompt_tokens_total if self._prompt_tokens_total else 0.0
        return LoadMetrics(
            num_running_reqs=self._last_running if self._inflight else 0,
            num_waiting_reqs=self._last_waiting if self._inflight else 0,
            kv_active_blocks=min(active, self.info.total_kv_blocks),
            kv_total_blocks=self.info.total_kv_blocks,
            cache_hit_rate=hit,
        )

    async def flush_cache(self) -> bool:
        result = await asyncio.to_thread(self._sgl.flush_cache)
        return bool(getattr(result, "success", True))

    async def release_memory(self, tags: list[str] | None = None) -> None:
        await asyncio.to_thread(self._sgl.release_memory_occupation, tags)

    async def resume_memory(self, tags: list[str] | None = None) -> None:
        await asyncio.to_thread(self._sgl.resume_memory_occupation, tags)

    async def update_weights_from_disk(self, model_path: str) -> None:
        await asyncio.to_thread(self._sgl.update_weights_from_disk, model_path)

    async def start_profile(self) -> None:
        await asyncio.to_thread(self._sgl.start_profile)

    async def stop_profile(self) -> None:
        await asyncio.to_thread(self._sgl.stop_profile)

    async def shutdown(self) -> None:
        for rid in list(self._inflight):
            await self.abort(rid)
        # sgl.Engine.shutdown blocks until the GPU context is released.
        await asyncio.to_thread(self._sgl.shutdown)


async def _aiter_guarded(stream: Any) -> AsyncIterator[dict[str, Any]]:
    try:
        async for chunk in stream:
            yield chunk
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from exc


def bootstrap_host() -> str:
    """The address decode workers reach this host's SGLang bootstrap server at.

    ``SGLANG_HOST_IP`` (SGLang's own override) or ``ARMATURE_HOST_IP`` wins; otherwise the
    host name's address, falling back to loopback for a single-host setup.
    """
    host = os.environ.get("SGLANG_HOST_IP") or os.environ.get("ARMATURE_HOST_IP")
    if not host:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _local_kv_events_endpoint(config: str | None) -> str | None:
    """SGLang's KV-event endpoint as configured (the relay decides whether to bind or connect)."""
    if not config:
        return None
    cfg = json.loads(config)
    if cfg.get("publisher", "null") == "null":
        return None
    return str(cfg.get("endpoint") or "") or None
