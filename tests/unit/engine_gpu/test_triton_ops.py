"""The fused layer kernels (RMSNorm, SiLU*up, rotary + K/V store) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import enable_without_cuda

if not enable_without_cuda():
    pytest.skip("triton is not installed", allow_module_level=True)

from armature.engine.models import triton_ops as ops  # noqa: E402
from armature.engine.models.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 1e-2 if DTYPE is torch.bfloat16 else 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(DEVICE, DTYPE)


def test_rms_norm_and_silu_mul_match_torch() -> None:
    g = torch.Generator().manual_seed(0)
    x = _randn(5, 96, g=g)
    w = _randn(96, g=g)
    assert _rel(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6)) < TOL
    gu = _randn(3, 2 * 1500, g=g)  # wider than one block: the second grid axis covers it
    gate, up = gu.chunk(2, dim=-1)
    assert _rel(ops.silu_mul(gu), F.silu(gate) * up) < TOL


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_rotates_q_and_k_and_stores_k_v(qk_norm: bool) -> None:
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, t = 4, 2, 32, 6
    rot = RotaryEmbedding(d, 10000.0, None, 64, DTYPE, DEVICE)
    qkv = _randn(t, (heads + 2 * kv_heads) * d, g=g)
    positions = torch.tensor([0, 5, 9, 17, 33, 63], device=DEVICE)
    out_loc = torch.tensor([3, 11, 12, 0, 7, 30], device=DEVICE)
    k_buf = torch.zeros(32, kv_heads, d, dtype=DTYPE, device=DEVICE)
    v_buf = torch.zeros_like(k_buf)
    qn = _randn(d, g=g) if qk_norm else None
    kn = _randn(d, g=g) if qk_norm else None
    q = ops.rope_store(qkv, positions, rot.cos[:, 0], rot.sin[:, 1], qn, kn, 1e-6, k_buf, v_buf, out_loc, heads, kv_heads, d)

    q_ref = qkv[:, : heads * d].view(t, heads, d)
    k_ref = qkv[:, heads * d : (heads + kv_heads) * d].view(t, kv_heads, d)
    v_ref = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    if qk_norm:
        q_ref = F.rms_norm(q_ref, (d,), qn, 1e-6)
        k_ref = F.rms_norm(k_ref, (d,), kn, 1e-6)
    cos, sin = rot.lookup(positions)
    rotated = apply_rotary(torch.cat([q_ref, k_ref], dim=1).contiguous(), cos, sin)
    assert _rel(q, rotated[:, :heads]) < TOL
    assert _rel(k_buf[out_loc], rotated[:, heads:]) < TOL
    assert torch.equal(v_buf[out_loc], v_ref)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[out_loc.cpu()] = False
    assert not k_buf[untouched.to(DEVICE)].any(), "only the new tokens' slots are written"
