"""The Triton paged-attention kernels against a plain softmax(QK^T)V over the same pool.

On a machine without CUDA they run under Triton's interpreter (when triton is installed); without
triton the module is skipped. Page tables are shuffled so a wrong slot computation cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import enable_without_cuda

if not enable_without_cuda():
    pytest.skip("triton is not installed", allow_module_level=True)

from armature.engine.attention import triton_kernels as kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOL = 2e-2 if DTYPE is torch.bfloat16 else 1e-4


def _pool(num_pages: int, page: int, kv_heads: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages * page, kv_heads, d)
    k = torch.randn(shape, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(shape, generator=g).to(DEVICE, DTYPE)
    return k, v


def _slots(pages: list[int], n: int, page: int) -> torch.Tensor:
    return torch.tensor([pages[j // page] * page + j % page for j in range(n)], device=DEVICE)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, H, D], k/v [ctx, KVH, D]; row i sees context positions <= q_pos[i]."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,chd->hnc", q.double(), kk) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hnc,chd->nhd", s.softmax(-1), vv)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("page,heads,kv_heads", [(16, 4, 2), (32, 8, 8), (64, 6, 2)])
def test_decode_matches_reference(page: int, heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(page + heads)
    d, num_pages = 32, 24
    k_buf, v_buf = _pool(num_pages, page, kv_heads, d, g)
    lens = [1, page - 1, 3 * page + 5, 5 * page]
    order = torch.randperm(num_pages, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        need = -(-n // page)
        tables.append(order[used : used + need])
        used += need
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), heads, d, generator=g).to(DEVICE, DTYPE)
    for splits in (1, 3):
        out = torch.full_like(q, float("nan"))
        part_o = torch.empty(len(lens), heads, splits, d, dtype=torch.float32, device=DEVICE)
        part_l = torch.empty(len(lens), heads, splits, dtype=torch.float32, device=DEVICE)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        kernels.decode_attention(q, k_buf, v_buf, table, seq_lens, out, part_o, part_l, page, splits, d**-0.5, block_n=16)
        for i, n in enumerate(lens):
            slots = _slots(tables[i], n, page)
            ref = _reference(q[i : i + 1], k_buf[slots], v_buf[slots], torch.tensor([n - 1], device=DEVICE), d**-0.5)
            assert _rel(out[i : i + 1], ref) < TOL, (splits, i)


def test_extend_over_a_cached_prefix_matches_reference() -> None:
    g = torch.Generator().manual_seed(7)
    page, heads, kv_heads, d, num_pages = 16, 4, 2, 32, 40
    k_buf, v_buf = _pool(num_pages, page, kv_heads, d, g)
    # (cached prefix, new tokens): no prefix, a prefix ending mid-page, a lone decode token.
    seqs = [(0, 37), (21, 70), (48, 1), (16, 16)]
    order = torch.randperm(num_pages, generator=g).tolist()
    tables, used = [], 0
    for p, n in seqs:
        need = -(-(p + n) // page)
        tables.append(order[used : used + need])
        used += need
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    total = sum(n for _, n in seqs)
    q = torch.randn(total, heads, d, generator=g).to(DEVICE, DTYPE)
    block_m = 16
    block_seq, block_start, rows, row = [], [], [], 0
    for i, (_, n) in enumerate(seqs):
        for m0 in range(0, n, block_m):
            block_seq.append(i)
            block_start.append(m0)
        rows.append(row)
        row += n
    i32 = dict(dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    kernels.extend_attention(
        q, k_buf, v_buf, out, table,
        torch.tensor(block_seq, **i32), torch.tensor(block_start, **i32),
        torch.tensor([p for p, _ in seqs], **i32), torch.tensor([n for _, n in seqs], **i32),
        torch.tensor(rows, **i32), page, d**-0.5, block_m, block_n=16,
    )
    assert not torch.isnan(out).any(), "every row must be written"
    for i, (p, n) in enumerate(seqs):
        slots = _slots(tables[i], p + n, page)
        q_pos = torch.arange(p, p + n, device=DEVICE)
        ref = _reference(q[rows[i] : rows[i] + n], k_buf[slots], v_buf[slots], q_pos, d**-0.5)
        assert _rel(out[rows[i] : rows[i] + n], ref) < TOL, i


@pytest.mark.skipif(DEVICE.type != "cuda", reason="counts CUDA compiles; the interpreter compiles nothing")
def test_extend_compiles_once_whatever_the_batch_shape() -> None:
    # A compile is a 0.5-1 s stall of the engine: batch shapes met while serving must not cause one.
    g = torch.Generator().manual_seed(5)
    page, heads, kv_heads, d = 16, 8, 2, 64
    k, v = _pool(64, page, kv_heads, d, g)
    compiled = kernels._extend_kernel.device_caches[torch.cuda.current_device()][0]
    counts = []
    for nseq in (1, 2, 3, 5):
        for width in (1, 2, 16, 17):  # page-table widths: 1, a multiple of 16, neither
            ext = [5] * nseq
            table = (torch.arange(nseq * width, dtype=torch.int32) % 64).view(nseq, width).to(DEVICE)
            meta = torch.tensor([list(range(nseq)), [0] * nseq], dtype=torch.int32, device=DEVICE)
            seqs = torch.tensor([[width * page - 5] * nseq, ext, [5 * i for i in range(nseq)]], dtype=torch.int32,
                                device=DEVICE)  # fmt: skip
            q = torch.randn(sum(ext), heads, d, generator=g).to(DEVICE, DTYPE)
            out = torch.empty_like(q)
            kernels.extend_attention(q, k, v, out, table, meta[0], meta[1], seqs[0], seqs[1], seqs[2], page, d**-0.5, 64)
            counts.append(len(compiled))
    assert counts[-1] == counts[0]
