"""Moving whole KV pages between a ``KVPool`` and one contiguous staging tensor.

The staging layout is ``[2 (K, V), layers, pages, page_size, kv_heads, head_dim]``: a page is a
contiguous run of slots in every per-layer buffer, so one ``index_select``/``index_copy_`` per
layer and per K/V moves all of a request's pages, whatever their order in the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from armature.engine.disagg.wire import KvLayout
from armature.engine.kv_pool import KVPool


def layout_of(pool: KVPool) -> KvLayout:
    s = pool.shape
    return KvLayout(
        num_layers=s.num_layers,
        num_kv_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        dtype=str(s.dtype).removeprefix("torch."),
        page_size=pool.page_size,
    )


def staging_shape(layout: KvLayout, num_pages: int) -> tuple[int, ...]:
    return (2, layout.num_layers, num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim)


def _paged(buf: torch.Tensor, page_size: int) -> torch.Tensor:
    return buf.view(buf.shape[0] // page_size, page_size, *buf.shape[1:])


def gather_pages(pool: KVPool, pages: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """A CPU copy of ``pages`` (all layers, K and V) in the staging layout (into ``out`` if given)."""
    layout = layout_of(pool)
    shape = staging_shape(layout, len(pages))
    if out is None:
        out = torch.empty(shape, dtype=pool.shape.dtype, device="cpu")
    elif tuple(out.shape) != shape or out.dtype != pool.shape.dtype:
        raise ValueError(
            f"gather target is {tuple(out.shape)} {out.dtype}, the pages need {shape} {pool.shape.dtype}"
        )
    idx = torch.tensor(list(pages), dtype=torch.int64, device=pool.shape.device)
    on_cpu = pool.shape.device.type == "cpu"
    for kind, buffers in enumerate((pool.k_buffer, pool.v_buffer)):
        for layer, buf in enumerate(buffers):
            src = _paged(buf, pool.page_size)
            if on_cpu:
                torch.index_select(src, 0, idx, out=out[kind, layer])
            else:
                out[kind, layer].copy_(src.index_select(0, idx))
    return out


def scatter_pages(pool: KVPool, pages: Sequence[int], data: torch.Tensor) -> None:
    """Write staged KV (staging layout, any device) into ``pages`` of the pool."""
    layout = layout_of(pool)
    want = staging_shape(layout, len(pages))
    if tuple(data.shape) != want:
        raise ValueError(f"staged KV has shape {tuple(data.shape)}, the pool needs {want}")
    device = pool.shape.device
    idx = torch.tensor(list(pages), dtype=torch.int64, device=device)
    for kind, buffers in enumerate((pool.k_buffer, pool.v_buffer)):
        for layer, buf in enumerate(buffers):
            _paged(buf, pool.page_size).index_copy_(0, idx, data[kind, layer].to(device, non_blocking=True))


def as_staging(raw: torch.Tensor, layout: KvLayout, num_pages: int) -> torch.Tensor:
    """View received bytes (a flat uint8 tensor) as staged KV."""
    dtype = getattr(torch, layout.dtype)
    return raw.view(dtype).view(staging_shape(layout, num_pages))
