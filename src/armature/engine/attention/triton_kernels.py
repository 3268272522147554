"""Triton kernels for attention over the paged KV pool (GPU; also run under TRITON_INTERPRET=1).

The pool is slot-addressed (``[slots, kv_heads, head_dim]`` per layer) and a sequence owns whole
pages, so a kernel finds token ``j`` of sequence ``b`` at slot
``page_table[b, j // page_size] * page_size + j % page_size``: the page table is page_size times
smaller than a token table, which keeps the per-step host-to-device copy small.

Decode is memory-bound: one program reads one KV head's slice of one sequence for all the query
heads that share it (GQA), so every K/V byte is read once per step. Long contexts are split
across programs (flash-decoding) so a batch of one still fills the GPU; a second kernel merges the
splits by their log-sum-exp. Extend (prefill, possibly over a cached prefix) is compute-bound: one
program owns a block of one sequence's new tokens for one query head and walks the context up to
its causal limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


# Triton compiles a kernel once per specialisation of its arguments: each integer's "is 1 / is a
# multiple of 16" and each pointer's 16-byte alignment. The page-table width and the offsets of
# the per-batch metadata rows change from batch to batch, so left specialised they made a fresh
# compile (0.5-1 s, the engine stalled) at random points of serving. These are never specialised:
# one compile per kernel, done at start-up.
_PER_BATCH_INTS = ["stride_pt"]


@triton.jit(do_not_specialize=_PER_BATCH_INTS, do_not_specialize_on_alignment=["PageTable", "SeqLens"])
def _decode_split_kernel(
    Q,
    K,
    V,
    PageTable,
    SeqLens,
    PartOut,
    PartLse,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    sm_scale_log2,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    # Split lengths are whole blocks so only a split's last block is ragged.
    per_split = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_valid = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        page = tl.load(PageTable + b * stride_pt + offs_n // PAGE, mask=n_valid, other=0)
        slot = page.to(tl.int64) * PAGE + offs_n % PAGE
        k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        qk = tl.where(n_valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty split (short sequence) leaves l_i = 0: it writes zeros and a -inf weight.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        PartOut + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
        out,
        mask=g_valid[:, None],
    )
    tl.store(PartLse + b * stride_lb + heads * stride_lh + split, lse, mask=g_valid)


@triton.jit
def _decode_merge_kernel(
    PartOut,
    PartLse,
    Out,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_xb,
    stride_xh,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < SPLITS
    lse = tl.load(PartLse + b * stride_lb + h * stride_lh + offs_s, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    parts = tl.load(
        PartOut + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=s_valid[:, None],
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_xb + h * stride_xh + offs_d, out.to(Out.dtype.element_ty))


@triton.jit(
    do_not_specialize=_PER_BATCH_INTS,
    do_not_specialize_on_alignment=["PageTable", "BlockSeq", "BlockStart", "SeqPrefix", "SeqExtend", "SeqRow"],
)
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    PageTable,
    BlockSeq,
    BlockStart,
    SeqPrefix,
    SeqExtend,
    SeqRow,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_xt,
    stride_xh,
    stride_pt,
    sm_scale_log2,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seq = tl.load(BlockSeq + blk)
    m0 = tl.load(BlockStart + blk)  # first new token of this block, counted within the sequence
    prefix = tl.load(SeqPrefix + seq)
    n_new = tl.load(SeqExtend + seq)
    row0 = tl.load(SeqRow + seq)  # packed row of the sequence's first new token

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_valid = offs_m < n_new
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + (row0 + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_valid[:, None],
        other=0.0,
    )
    q_pos = prefix + offs_m  # context position of each new token
    ctx_end = prefix + tl.minimum(m0 + BLOCK_M, n_new)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, ctx_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < ctx_end
        page = tl.load(PageTable + seq * stride_pt + offs_n // PAGE, mask=n_valid, other=0)
        slot = page.to(tl.int64) * PAGE + offs_n % PAGE
        k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        Out + (row0 + offs_m)[:, None].to(tl.int64) * stride_xt + h * stride_xh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_valid[:, None],
    )


def _precision(q: torch.Tensor) -> str:
    # float32 models get float32 products (tl.dot would round operands to tf32 by default).
    return "ieee" if q.dtype == torch.float32 else "tf32"


def decode_splits(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int = 64) -> int:
    """Splits per sequence so that about two programs per SM are in flight."""
    want = -(-2 * num_sms // max(1, batch_size * num_kv_heads))
    return max(1, min(max_splits, want))


def decode_attention(
    q: torch.Tensor,  # [B, heads, D]
    k_buf: torch.Tensor,  # [slots, kv_heads, D]
    v_buf: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32
    out: torch.Tensor,  # [B, heads, D]
    part_out: torch.Tensor,  # [>=B, heads, >=splits, D] float32 scratch
    part_lse: torch.Tensor,  # [>=B, heads, >=splits] float32 scratch
    page_size: int,
    splits: int,
    scale: float,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> None:
    b, heads, d = q.shape
    kv_heads = k_buf.shape[1]
    group = heads // kv_heads
    _decode_split_kernel[(b, kv_heads, splits)](
        q,
        k_buf,
        v_buf,
        page_table,
        seq_lens,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        v_buf.stride(0),
        v_buf.stride(1),
        page_table.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        scale * _LOG2E,
        PAGE=page_size,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_N=block_n,
        SPLITS=splits,
        PRECISION=_precision(q),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_merge_kernel[(b, heads)](
        part_out,
        part_lse,
        out,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=d,
        SPLITS=splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        num_warps=4,
    )


def extend_attention(
    q: torch.Tensor,  # [T, heads, D] packed new tokens
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    out: torch.Tensor,  # [T, heads, D]
    page_table: torch.Tensor,  # [B, max_pages] int32
    block_seq: torch.Tensor,  # [num_blocks] int32: sequence of each BLOCK_M block of new tokens
    block_start: torch.Tensor,  # [num_blocks] int32: first new token of the block within its sequence
    seq_prefix: torch.Tensor,  # [B] int32
    seq_extend: torch.Tensor,  # [B] int32
    seq_row: torch.Tensor,  # [B] int32: packed row of each sequence's first new token
    page_size: int,
    scale: float,
    block_m: int,
    block_n: int = 64,
) -> None:
    heads, d = q.shape[1], q.shape[2]
    group = heads // k_buf.shape[1]
    _extend_kernel[(block_seq.shape[0], heads)](
        q,
        k_buf,
        v_buf,
        out,
        page_table,
        block_seq,
        block_start,
        seq_prefix,
        seq_extend,
        seq_row,
        q.stride(0),
        q.stride(1),
        k_buf.stride(0),
        k_buf.stride(1),
        v_buf.stride(0),
        v_buf.stride(1),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        scale * _LOG2E,
        PAGE=page_size,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(q),
        num_warps=8 if block_m >= 128 else 4,
        num_stages=2,
    )
