"""Fused Triton kernels for the layer's small ops on CUDA (also run under TRITON_INTERPRET=1).

At decode, a layer's matmuls stream weights at close to full bandwidth; what is left is a dozen
tiny elementwise launches per layer (norms, rotary, the K/V store, SiLU), each a few microseconds.
These kernels fold them into three launches a layer. Each rounds to the activation dtype exactly
where transformers' eager modules do (bf16 after each op), so our bf16 numbers follow theirs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + offs, mask=mask, other=0.0)
    y = (x * rstd).to(w.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(GU, Y, stride_gu, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0)
    u = tl.load(GU + row * stride_gu + n_cols + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(Y + row * stride_y + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


@triton.jit
def _rope_store_kernel(
    QKV,
    Pos,
    Cos,
    Sin,
    QNorm,
    KNorm,
    QOut,
    KBuf,
    VBuf,
    OutLoc,
    stride_t,
    stride_qo,
    stride_cos,
    stride_kt,
    stride_vt,
    eps,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    t = tl.program_id(0)
    j = tl.program_id(1)  # head: q heads, then k heads, then v heads
    offs = tl.arange(0, HALF)
    base = QKV + t * stride_t + j * (2 * HALF)
    x1 = tl.load(base + offs)
    x2 = tl.load(base + HALF + offs)
    slot = tl.load(OutLoc + t).to(tl.int64)
    if j >= HEADS + KV_HEADS:
        vh = j - HEADS - KV_HEADS
        dst = VBuf + slot * stride_vt + vh * (2 * HALF)
        tl.store(dst + offs, x1)
        tl.store(dst + HALF + offs, x2)
    else:
        dt = x1.dtype
        if HAS_NORM:  # Qwen3's per-head RMSNorm of q and k, before the rotation
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(a * a, 0) + tl.sum(b * b, 0)) / (2 * HALF) + eps)
            if j < HEADS:
                w1 = tl.load(QNorm + offs).to(tl.float32)
                w2 = tl.load(QNorm + HALF + offs).to(tl.float32)
            else:
                w1 = tl.load(KNorm + offs).to(tl.float32)
                w2 = tl.load(KNorm + HALF + offs).to(tl.float32)
            x1 = ((a * rstd).to(dt).to(tl.float32) * w1).to(dt)
            x2 = ((b * rstd).to(dt).to(tl.float32) * w2).to(dt)
        pos = tl.load(Pos + t)
        c = tl.load(Cos + pos * stride_cos + offs).to(tl.float32)
        s = tl.load(Sin + pos * stride_cos + offs).to(tl.float32)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        # x*cos + rotate_half(x)*sin, rounded after each op as transformers does in bf16.
        y1 = ((f1 * c).to(dt).to(tl.float32) - (f2 * s).to(dt).to(tl.float32)).to(dt)
        y2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
        if j < HEADS:
            tl.store(QOut + t * stride_qo + j * (2 * HALF) + offs, y1)
            tl.store(QOut + t * stride_qo + j * (2 * HALF) + HALF + offs, y2)
        else:
            kdst = KBuf + slot * stride_kt + (j - HEADS) * (2 * HALF)
            tl.store(kdst + offs, y1)
            tl.store(kdst + HALF + offs, y2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, cols = x.shape
    y = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](x, weight, y, x.stride(0), y.stride(0), cols, eps, BLOCK=triton.next_power_of_2(cols))
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    rows, two_i = gate_up.shape
    n = two_i // 2
    y = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, y, gate_up.stride(0), y.stride(0), n, BLOCK=block)
    return y


def rope_store(
    qkv: torch.Tensor,  # [T, (heads + 2 kv_heads) * D], rows may be strided
    positions: torch.Tensor,  # [T] int64
    cos: torch.Tensor,  # [max_pos, D/2] (row stride may exceed D/2)
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    k_buf: torch.Tensor,  # [slots, kv_heads, D]
    v_buf: torch.Tensor,
    out_loc: torch.Tensor,  # [T] int64
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """Rotate q and k (after Qwen3's q/k norms when given), write k and v into the pool at
    ``out_loc``, and return the rotated q ``[T, heads, D]``."""
    t = qkv.shape[0]
    q = torch.empty(t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    has_norm = q_norm is not None
    _rope_store_kernel[(t, heads + 2 * kv_heads)](
        qkv,
        positions,
        cos,
        sin,
        q_norm if has_norm else qkv,
        k_norm if has_norm else qkv,
        q,
        k_buf,
        v_buf,
        out_loc,
        qkv.stride(0),
        q.stride(0),
        cos.stride(0),
        k_buf.stride(0),
        v_buf.stride(0),
        eps,
        HEADS=heads,
        KV_HEADS=kv_heads,
        HALF=head_dim // 2,
        HAS_NORM=has_norm,
        num_warps=1,
    )
    return q
