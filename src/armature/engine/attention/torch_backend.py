"""Attention with torch's scaled_dot_product_attention over the paged KV pool (CPU and CUDA).

One-token rows (a decode batch, or the decodes mixed into an extend batch) are attended in one
call: every such sequence's context slots are gathered into a padded ``[B, max_len]`` index once
per forward, and an additive mask hides the padding. Multi-token rows (prefill chunks) go per
sequence (prefill is matmul-bound, so the loop costs little), reading the new tokens' K/V straight
from the projection when there is no cached prefix. GQA never materialises repeated K/V heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from armature.engine.attention.base import AttentionBackend
from armature.engine.forward_batch import ForwardBatch, ForwardMode


@dataclass
class _ExtendSeq:
    start: int  # first row of this sequence in the packed token dimension
    end: int
    kv_idx: torch.Tensor | None  # context slots; None when the context is exactly the new tokens
    mask: torch.Tensor | None  # [new, ctx] bool, True = may attend; None = plain causal


@dataclass
class _DecodePlan:
    idx: torch.Tensor  # [B, max_len] slots, padded with slot 0
    mask: torch.Tensor | None  # [B, 1, 1, max_len] additive (0 / -inf); None when all lengths are equal
    rows: torch.Tensor | None  # rows of the packed batch these sequences own; None = all rows, in order


@dataclass
class _Plan:
    out_loc: torch.Tensor
    decode: _DecodePlan | None
    extend: list[_ExtendSeq]


class TorchAttentionBackend(AttentionBackend):
    _plan: _Plan | None = None

    def prepare(self, batch: ForwardBatch) -> None:
        device = self.kv_pool.shape.device
        out_loc = batch.out_cache_loc.to(device, non_blocking=True)
        if batch.mode is ForwardMode.DECODE:
            self._plan = _Plan(out_loc, self._decode_plan(batch.kv_indices, batch.seq_lens, None), [])
            return
        extend: list[_ExtendSeq] = []
        single_rows: list[int] = []
        single_kv: list[torch.Tensor] = []
        start = 0
        for n, prefix, kv in zip(batch.extend_lens, batch.prefix_lens, batch.kv_indices):
            if n == 1:
                single_rows.append(start)
                single_kv.append(kv)
            elif prefix == 0:
                extend.append(_ExtendSeq(start, start + n, None, None))
            else:
                ctx = prefix + n
                # New token j sits at context position prefix + j and sees positions <= that.
                ctx_pos = torch.arange(ctx, device=device)[None, :]
                mask = ctx_pos <= (torch.arange(n, device=device) + prefix)[:, None]
                extend.append(_ExtendSeq(start, start + n, kv.to(device), mask))
            start += n
        decode = None
        if single_rows:
            rows = torch.tensor(single_rows, dtype=torch.int64, device=device)
            decode = self._decode_plan(single_kv, [kv.shape[0] for kv in single_kv], rows)
        self._plan = _Plan(out_loc, decode, extend)

    def _decode_plan(self, kv: list[torch.Tensor], lens: list[int], rows: torch.Tensor | None) -> _DecodePlan:
        device = self.kv_pool.shape.device
        max_len = max(lens)
        if min(lens) == max_len:
            return _DecodePlan(torch.stack(kv).to(device), None, rows)
        idx = torch.nn.utils.rnn.pad_sequence(kv, batch_first=True, padding_value=0).to(device)
        pad = torch.arange(max_len, device=device)[None, :] >= torch.tensor(lens, device=device)[:, None]
        mask = torch.zeros(pad.shape, dtype=self.kv_pool.shape.dtype, device=device)
        return _DecodePlan(idx, mask.masked_fill_(pad, float("-inf"))[:, None, None, :], rows)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        plan = self._plan
        assert plan is not None, "prepare() must run before forward()"
        k_buf = self.kv_pool.k_buffer[layer]
        v_buf = self.kv_pool.v_buffer[layer]
        k_buf.index_copy_(0, plan.out_loc, k)
        v_buf.index_copy_(0, plan.out_loc, v)
        if not plan.extend:
            assert plan.decode is not None
            if plan.decode.rows is None:
                return self._forward_decode(q, k_buf, v_buf, plan.decode)
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        for p in plan.extend:
            out[p.start : p.end] = self._forward_one(q, k, v, k_buf, v_buf, p)
        if plan.decode is not None:
            rows = plan.decode.rows
            assert rows is not None
            out.index_copy_(0, rows, self._forward_decode(q.index_select(0, rows), k_buf, v_buf, plan.decode))
        return out

    def _forward_decode(
        self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, plan: _DecodePlan
    ) -> torch.Tensor:
        b = q.shape[0]
        keys = _gather(k_buf, plan.idx).transpose(1, 2)  # [B, kv_heads, L, D]
        values = _gather(v_buf, plan.idx).transpose(1, 2)
        # The query heads sharing a KV head become that head's "query rows": one SDPA over
        # [B, kv_heads, group, D] does GQA with no repeated K/V and no GQA bookkeeping, which
        # measured faster on CPU than enable_gqa (the mask broadcasts over heads and rows).
        group = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(b, self.num_kv_heads, group, self.head_dim),
            keys,
            values,
            attn_mask=plan.mask,
            scale=self.scale,
        )  # [B, kv_heads, group, D]
        return out.reshape(b, self.num_heads * self.head_dim)

    def _forward_one(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        p: _ExtendSeq,
    ) -> torch.Tensor:
        qi = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, D]
        if p.kv_idx is None:
            ki, vi = k[p.start : p.end], v[p.start : p.end]
        else:
            ki, vi = _gather(k_buf, p.kv_idx), _gather(v_buf, p.kv_idx)
        ki = ki.transpose(0, 1).unsqueeze(0)
        vi = vi.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qi, ki, vi, attn_mask=p.mask, is_causal=p.kv_idx is None, scale=self.scale, enable_gqa=True
        )  # [1, heads, n, D]
        return o[0].transpose(0, 1).reshape(p.end - p.start, self.num_heads * self.head_dim)


def _gather(buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``buf[idx]`` through index_select, which is several times faster than advanced indexing on CPU."""
    return buf.index_select(0, idx.reshape(-1)).view(*idx.shape, *buf.shape[1:])
