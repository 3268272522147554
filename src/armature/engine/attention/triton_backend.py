"""Attention on CUDA with the Triton kernels of ``triton_kernels.py``, addressed by page table.

``prepare`` turns the batch's page lists into device tensors once per forward (one host-to-device
copy); every layer then stores the new K/V at ``out_cache_loc`` and runs one kernel launch (extend)
or two (decode: splits + merge). Decode state can instead live in fixed buffers (``DecodeBuffers``)
so that a CUDA graph captured over them replays for any batch of that size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from armature.engine.attention import triton_kernels as kernels
from armature.engine.attention.base import AttentionBackend
from armature.engine.forward_batch import ForwardBatch, ForwardMode
from armature.engine.kv_pool import KVPool

_EXTEND_BLOCK_M = 64
_DECODE_MAX_SPLITS = 64


@dataclass
class DecodeBuffers:
    """Fixed-address decode inputs for up to ``max_bs`` sequences (CUDA-graph capture/replay)."""

    page_table: torch.Tensor  # [max_bs, max_pages] int32
    seq_lens: torch.Tensor  # [max_bs] int32
    out_loc: torch.Tensor  # [max_bs] int64
    part_out: torch.Tensor  # [max_bs, heads, max_splits, D] float32
    part_lse: torch.Tensor  # [max_bs, heads, max_splits] float32

    @classmethod
    def allocate(
        cls, max_bs: int, max_pages: int, heads: int, head_dim: int, device: torch.device, splits: int
    ) -> DecodeBuffers:
        return cls(
            page_table=torch.zeros(max_bs, max_pages, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_bs, dtype=torch.int32, device=device),
            out_loc=torch.zeros(max_bs, dtype=torch.int64, device=device),
            part_out=torch.empty(max_bs, heads, splits, head_dim, dtype=torch.float32, device=device),
            part_lse=torch.empty(max_bs, heads, splits, dtype=torch.float32, device=device),
        )


@dataclass
class _DecodePlan:
    bs: int
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    out_loc: torch.Tensor
    part_out: torch.Tensor
    part_lse: torch.Tensor
    splits: int


@dataclass
class _ExtendPlan:
    out_loc: torch.Tensor
    page_table: torch.Tensor
    block_seq: torch.Tensor
    block_start: torch.Tensor
    seq_prefix: torch.Tensor
    seq_extend: torch.Tensor
    seq_row: torch.Tensor


class TritonAttentionBackend(AttentionBackend):
    uses_page_table = True

    def __init__(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int, scale: float
    ) -> None:
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim, scale)
        self.device = kv_pool.shape.device
        self.page_size = kv_pool.page_size
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        else:  # the Triton interpreter (tests without a GPU)
            self.num_sms = 4
        self._decode: _DecodePlan | None = None
        self._extend: _ExtendPlan | None = None
        self._scratch: DecodeBuffers | None = None

    # --- per-batch plans ---------------------------------------------------------------------

    def prepare(self, batch: ForwardBatch) -> None:
        assert batch.page_table is not None, "the Triton backend needs ForwardBatch.page_table"
        out_loc = batch.out_cache_loc.to(self.device, non_blocking=True)
        if batch.mode is ForwardMode.DECODE:
            bs = batch.batch_size
            table = _pad_table(batch.page_table)
            bufs = self._scratch_buffers(bs)
            splits = self.splits_for(bs)
            self._decode = _DecodePlan(
                bs,
                table.to(self.device, non_blocking=True),
                torch.tensor(batch.seq_lens, dtype=torch.int32).to(self.device, non_blocking=True),
                out_loc,
                bufs.part_out,
                bufs.part_lse,
                splits,
            )
            self._extend = None
            return
        block_seq: list[int] = []
        block_start: list[int] = []
        rows: list[int] = []
        row = 0
        for i, n in enumerate(batch.extend_lens):
            for m0 in range(0, n, _EXTEND_BLOCK_M):
                block_seq.append(i)
                block_start.append(m0)
            rows.append(row)
            row += n
        meta = torch.tensor(
            [block_seq, block_start], dtype=torch.int32
        ).to(self.device, non_blocking=True)
        seq_meta = torch.tensor([batch.prefix_lens, batch.extend_lens, rows], dtype=torch.int32).to(
            self.device, non_blocking=True
        )
        self._extend = _ExtendPlan(
            out_loc,
            _pad_table(batch.page_table).to(self.device, non_blocking=True),
            meta[0],
            meta[1],
            seq_meta[0],
            seq_meta[1],
            seq_meta[2],
        )
        self._decode = None

    def splits_for(self, bs: int) -> int:
        return kernels.decode_splits(bs, self.num_kv_heads, self.num_sms, _DECODE_MAX_SPLITS)

    def _scratch_buffers(self, bs: int) -> DecodeBuffers:
        s = self._scratch
        if s is None or s.part_out.shape[0] < bs:
            s = DecodeBuffers.allocate(
                max(bs, 8), 1, self.num_heads, self.head_dim, self.device, _DECODE_MAX_SPLITS
            )
            self._scratch = s
        return s

    def bind_decode_buffers(self, bufs: DecodeBuffers, bs: int) -> None:
        """Point decode at ``bufs[:bs]``: what a CUDA graph captures and later replays."""
        self._decode = _DecodePlan(
            bs,
            bufs.page_table[:bs],
            bufs.seq_lens[:bs],
            bufs.out_loc[:bs],
            bufs.part_out,
            bufs.part_lse,
            self.splits_for(bs),
        )
        self._extend = None

    # --- the layer call ----------------------------------------------------------------------

    @property
    def out_loc(self) -> torch.Tensor:
        """Slots of this forward's new tokens (for kernels that store K/V themselves)."""
        plan = self._decode if self._decode is not None else self._extend
        assert plan is not None, "prepare() must run before forward()"
        return plan.out_loc

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        out_loc = self.out_loc
        self.kv_pool.k_buffer[layer].index_copy_(0, out_loc, k)
        self.kv_pool.v_buffer[layer].index_copy_(0, out_loc, v)
        return self.attend(q, layer)

    def attend(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention of ``q`` over the pool, whose K/V for the new tokens are already stored."""
        k_buf = self.kv_pool.k_buffer[layer]
        v_buf = self.kv_pool.v_buffer[layer]
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        if self._decode is not None:
            d = self._decode
            kernels.decode_attention(
                q, k_buf, v_buf, d.page_table, d.seq_lens, out, d.part_out, d.part_lse,
                self.page_size, d.splits, self.scale,
            )
        else:
            e = self._extend
            assert e is not None, "prepare() must run before forward()"
            kernels.extend_attention(
                q, k_buf, v_buf, out, e.page_table, e.block_seq, e.block_start,
                e.seq_prefix, e.seq_extend, e.seq_row, self.page_size, self.scale, _EXTEND_BLOCK_M,
            )
        return out.view(q.shape[0], self.num_heads * self.head_dim)


def _pad_table(pages: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(p) for p in pages))
    table = torch.zeros(len(pages), width, dtype=torch.int32)
    for i, p in enumerate(pages):
        if p:
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
    return table
