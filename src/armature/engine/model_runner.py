"""Loads a model and runs one forward step of a scheduled batch over the paged KV pool."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from armature.engine.attention import AttentionBackend, TorchAttentionBackend
from armature.engine.config import ModelConfig
from armature.engine.forward_batch import ForwardBatch, ForwardMode
from armature.engine.host_copy import to_device
from armature.engine.kv_pool import KVPool, KVShape, pages_for_budget
from armature.engine.loader import load_weights, resolve_model_path
from armature.engine.models import MODEL_CLASSES
from armature.engine.models.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from armature.engine.cuda_graph import DecodeGraphs

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# CPU: the KV pool shares RAM with everything else on the machine and is zero-filled at start
# (seconds per GiB on a busy box), so take a modest share of what is free, at most 2 GiB (45k
# tokens of SmolLM2-135M in fp32), unless asked for more with max_total_tokens/mem_fraction_static.
_CPU_MEM_FRACTION = 0.1
_CPU_KV_CAP_BYTES = 2 << 30
# Small models would otherwise get millions of slots (and a slow zero-fill) nobody on a CPU uses.
_CPU_KV_CAP_TOKENS = 1 << 18
_CUDA_MEM_FRACTION = 0.85
# SGLang's default ladder tops out near here on an 80 GB card for an 8B model.
_DEFAULT_CUDA_GRAPH_MAX_BS = 160


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(
        self,
        model_path: str | None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        page_size: int = 16,
        max_total_tokens: int | None = None,
        mem_fraction_static: float | None = None,
        max_context_length: int | None = None,
        attention_backend: str = "auto",
        cuda_graph_max_bs: int | None = None,
        disable_cuda_graph: bool = False,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """``weights``: tensors already in memory, by checkpoint name (the model folder then only
        supplies config.json); used to run weights built elsewhere, e.g. shared with another
        framework in one process."""
        started = time.perf_counter()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
        self.dtype = parse_dtype(dtype, self.device)
        self.model_path = resolve_model_path(model_path)
        self.model_config = ModelConfig.from_folder(self.model_path)
        cfg = self.model_config
        self.context_length = cfg.max_position_embeddings
        if max_context_length is not None:
            if max_context_length <= 0:
                raise ValueError(f"max_context_length must be positive, got {max_context_length}")
            if max_context_length > cfg.max_position_embeddings:
                log.warning(
                    "context length %d is beyond the %d positions the model was trained on; quality may drop",
                    max_context_length,
                    cfg.max_position_embeddings,
                )
            self.context_length = max_context_length
        self.page_size = page_size

        if weights is None:
            weights = load_weights(self.model_path, cfg, self.dtype, self.device)
        else:
            weights = dict(weights)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.context_length, self.dtype, self.device
        )
        self.model = MODEL_CLASSES[cfg.architecture](cfg, weights, rotary)
        if weights:
            log.warning("ignored %d unexpected weights, e.g. %s", len(weights), next(iter(weights)))

        shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device)
        self.kv_pool = KVPool(shape, self._num_pages(shape, max_total_tokens, mem_fraction_static), page_size)
        self.attn_backend = self._make_backend(attention_backend)
        if self.attn_backend.uses_page_table:
            self.model.use_fused_ops()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not disable_cuda_graph and self.attn_backend.uses_page_table:
            from armature.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self, cuda_graph_max_bs or _DEFAULT_CUDA_GRAPH_MAX_BS)
        if self.device.type == "cuda" and self.attn_backend.uses_page_table:
            self._warm_prefill()
        log.info(
            "loaded %s (%s, %d layers) on %s %s in %.1fs; KV pool %d pages x %d tokens",
            self.model_path,
            cfg.architecture,
            cfg.num_layers,
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started,
            self.kv_pool.total_pages,
            page_size,
        )

    def _warm_prefill(self) -> None:
        """Compile the prefill path's Triton kernels now, not during the first request (the
        decode kernels compile when the graphs are captured). Writes only the scratch page."""
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            input_ids=torch.zeros(1, dtype=torch.int64),
            positions=torch.zeros(1, dtype=torch.int64),
            out_cache_loc=torch.tensor([self.kv_pool.scratch_page * self.page_size]),
            extend_lens=[1],
            prefix_lens=[0],
            kv_indices=[],
            return_all_logits=[False],
            page_table=[[self.kv_pool.scratch_page]],
        )
        self.forward(batch)
        torch.cuda.synchronize(self.device)

    def _make_backend(self, name: str) -> AttentionBackend:
        cfg = self.model_config
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "torch"
        args = (self.kv_pool, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
        if name == "torch":
            return TorchAttentionBackend(*args)
        if name == "triton":
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1)")
            from armature.engine.attention.triton_backend import TritonAttentionBackend

            return TritonAttentionBackend(*args)
        raise ValueError(f"unknown attention backend {name!r}; use auto, torch or triton")

    def recapture_graphs(self) -> None:
        """Weights or KV buffers moved: graphs hold their old addresses."""
        if self.graphs is not None:
            self.graphs.capture()

    def _num_pages(self, shape: KVShape, max_total_tokens: int | None, mem_fraction: float | None) -> int:
        if max_total_tokens is not None:
            if max_total_tokens <= 0:
                raise ValueError(f"max_total_tokens must be positive, got {max_total_tokens}")
            return -(-max_total_tokens // self.page_size)
        cuda = self.device.type == "cuda"
        explicit = mem_fraction is not None
        if mem_fraction is None:
            mem_fraction = _CUDA_MEM_FRACTION if cuda else _CPU_MEM_FRACTION
        if not 0 < mem_fraction <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {mem_fraction}")
        budget = int(available_memory_bytes(self.device) * mem_fraction)
        if not cuda and not explicit:
            budget = min(budget, _CPU_KV_CAP_BYTES)
        pages = pages_for_budget(shape, self.page_size, budget)
        if not cuda and not explicit:
            pages = min(pages, _CPU_KV_CAP_TOKENS // self.page_size)
        if pages == 0:
            raise MemoryError(
                f"no memory left for the KV cache ({budget} bytes budget); lower the model size or "
                "pass max_total_tokens"
            )
        return pages

    @property
    def total_pages(self) -> int:
        return self.kv_pool.total_pages

    def forward(self, batch: ForwardBatch, hidden: bool = False) -> torch.Tensor:
        """float32 logits, one row per ``batch.logit_rows()`` entry: ``[rows, vocab]``; with
        ``hidden``, the final-normed hidden states of those rows: ``[rows, hidden_size]``."""
        longest = max(p + e for p, e in zip(batch.prefix_lens, batch.extend_lens))
        if longest > self.context_length:
            raise ValueError(
                f"a sequence of {longest} tokens exceeds the context length {self.context_length}"
            )
        with torch.inference_mode():
            graphs = self.graphs
            if graphs is not None and batch.mode is ForwardMode.DECODE and graphs.fits(batch) and not hidden:
                if not any(batch.return_all_logits):
                    return graphs.replay(batch)
            self.attn_backend.prepare(batch)
            return self.model.forward(
                batch.device_input_ids(self.device),
                batch.positions.to(self.device, non_blocking=True),
                self.attn_backend,
                self._logit_rows(batch),
                hidden,
            )

    def _logit_rows(self, batch: ForwardBatch) -> torch.Tensor | None:
        if batch.mode is ForwardMode.DECODE and not any(batch.return_all_logits):
            return None
        rows = batch.logit_rows()
        if len(rows) == batch.input_ids.shape[0]:
            return None
        return to_device(rows, torch.int64, self.device)
