"""CUDA graphs for decode: one captured forward per batch size of a ladder, replayed each step.

A decode step of a large model is hundreds of small kernel launches; replaying a graph issues
them all with one call, so the GPU never waits on Python. Every input the graph reads lives in a
fixed buffer (token ids, positions, the attention backend's ``DecodeBuffers``); a step copies the
live batch into them and replays the graph of the smallest captured size that fits. Rows past
the live batch are padding: they write their K/V into the pool's scratch page and attend one
token there, and their logits are dropped.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from armature.engine.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from armature.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


def batch_size_ladder(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64 and of 16 beyond: padding wastes at most ~12%."""
    sizes = [s for s in (1, 2, 4) if s < max_bs]
    step_sizes = list(range(8, min(max_bs, 64) + 1, 8)) + list(range(80, max_bs + 1, 16))
    sizes += [s for s in step_sizes if s <= max_bs]
    if not sizes or sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_bs: int) -> None:
        # Imported here: the Triton modules need triton, which CPU-only installs lack.
        from armature.engine.attention.triton_backend import DecodeBuffers, TritonAttentionBackend

        backend = runner.attn_backend
        if not isinstance(backend, TritonAttentionBackend):
            raise TypeError("CUDA graphs need the Triton attention backend")
        self.runner = runner
        self.backend = backend
        self.max_bs = max_bs
        self.sizes = batch_size_ladder(max_bs)
        device = runner.device
        pool = runner.kv_pool
        self.page_size = pool.page_size
        self.max_pages = -(-runner.context_length // pool.page_size)
        self.bufs = DecodeBuffers.allocate(
            max_bs, self.max_pages, backend.num_heads, backend.head_dim, device, backend.splits_for(1)
        )
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        # Host staging, pinned so the per-step copies are asynchronous DMA.
        self._host_i64 = torch.zeros(3, max_bs, dtype=torch.int64, pin_memory=True)
        self._host_lens = torch.zeros(max_bs, dtype=torch.int32, pin_memory=True)
        self._host_table = torch.zeros(max_bs * self.max_pages, dtype=torch.int32, pin_memory=True)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture()

    def capture(self) -> None:
        """(Re)capture every size: needed again whenever weights or KV buffers move."""
        started = time.perf_counter()
        self._graphs.clear()
        self._outputs.clear()
        scratch = self.runner.kv_pool.scratch_page
        self.bufs.page_table.fill_(scratch)
        self.bufs.seq_lens.fill_(1)
        self.bufs.out_loc.fill_(scratch * self.page_size)
        self.input_ids.zero_()
        self.positions.zero_()
        mem_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        with torch.inference_mode():
            for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
                self.backend.bind_decode_buffers(self.bufs, bs)
                stream.wait_stream(torch.cuda.current_stream(self.runner.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                        self._forward(bs)
                torch.cuda.current_stream(self.runner.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mem_pool, stream=stream):
                    self._outputs[bs] = self._forward(bs)
                self._graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)
        log.info("captured decode CUDA graphs for batch sizes %s in %.2fs", self.sizes, time.perf_counter() - started)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.runner.model.forward(self.input_ids[:bs], self.positions[:bs], self.backend, None)

    def fits(self, batch: ForwardBatch) -> bool:
        return batch.batch_size <= self.max_bs and batch.page_table is not None

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        bs = batch.batch_size
        gbs = next(s for s in self.sizes if s >= bs)
        assert batch.page_table is not None
        scratch = self.runner.kv_pool.scratch_page
        host = self._host_i64
        host[0, :bs].copy_(batch.input_ids)
        host[1, :bs].copy_(batch.positions)
        host[2, :bs].copy_(batch.out_cache_loc)
        lens = self._host_lens
        lens[:bs] = torch.tensor(batch.seq_lens, dtype=torch.int32)
        if gbs > bs:
            host[0, bs:gbs] = 0
            host[1, bs:gbs] = 0
            host[2, bs:gbs] = scratch * self.page_size
            lens[bs:gbs] = 1
        width = max(len(p) for p in batch.page_table)
        flat: list[int] = []
        for p in batch.page_table:
            flat.extend(p)
            flat.extend([scratch] * (width - len(p)))
        flat.extend([scratch] * (width * (gbs - bs)))
        table = self._host_table[: gbs * width].view(gbs, width)
        table.view(-1).copy_(torch.tensor(flat, dtype=torch.int32))
        self.input_ids[:gbs].copy_(host[0, :gbs], non_blocking=True)
        if batch.future_rows is not None:
            assert batch.future_ids is not None
            self.input_ids.index_copy_(0, batch.future_rows, batch.future_ids)
        self.positions[:gbs].copy_(host[1, :gbs], non_blocking=True)
        self.bufs.out_loc[:gbs].copy_(host[2, :gbs], non_blocking=True)
        self.bufs.seq_lens[:gbs].copy_(lens[:gbs], non_blocking=True)
        self.bufs.page_table[:gbs, :width].copy_(table, non_blocking=True)
        self._graphs[gbs].replay()
        return self._outputs[gbs][:bs]
