"""Paged KV pool: per-layer K and V buffers addressed by token slot, allocated by page.

Slot ``s`` lives in page ``s // page_size``; a sequence owns whole pages, so its slots for
positions ``[i*page_size, (i+1)*page_size)`` are one page's contiguous slots. Keeping the buffers
slot-addressed (not ``[page, offset]``) lets the attention code gather a sequence's context
with one index tensor.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def pages_for_budget(shape: KVShape, page_size: int, budget_bytes: int) -> int:
    return max(0, budget_bytes // (shape.bytes_per_token() * page_size))


class KVPool:
    def __init__(self, shape: KVShape, num_pages: int, page_size: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        self.shape = shape
        self.page_size = page_size
        self.num_pages = num_pages
        # One page past the allocatable ones takes the writes of padding rows (a CUDA graph
        # replayed for a batch larger than the live one), so they never touch a live page.
        self.scratch_page = num_pages
        slots = (num_pages + 1) * page_size
        kv = (slots, shape.num_kv_heads, shape.head_dim)
        self._backing: mmap.mmap | None = None
        if shape.device.type == "cpu":
            buffers = self._lazy_zero_cpu_buffers(kv, 2 * shape.num_layers)
        else:
            buffers = [torch.zeros(kv, dtype=shape.dtype, device=shape.device) for _ in range(2 * shape.num_layers)]
        self.k_buffer = buffers[: shape.num_layers]
        self.v_buffer = buffers[shape.num_layers :]
        # LIFO free list: recently freed pages are reused first (warm in cache on the CPU).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    def _lazy_zero_cpu_buffers(self, kv: tuple[int, int, int], count: int) -> list[torch.Tensor]:
        # torch.zeros writes every byte up front: gigabytes of KV cost seconds at start-up. Anonymous
        # mmap memory is zero too, but the kernel only materialises a page when it is first touched.
        elem = torch.empty((), dtype=self.shape.dtype).element_size()
        per = kv[0] * kv[1] * kv[2]
        self._backing = mmap.mmap(-1, per * elem * count)
        flat = torch.frombuffer(self._backing, dtype=torch.uint8).view(self.shape.dtype)
        return [flat[i * per : (i + 1) * per].view(kv) for i in range(count)]

    @property
    def total_pages(self) -> int:
        return self.num_pages

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} KV pages, {len(self._free)} free")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        return taken

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def slots_of(self, pages: list[int], num_tokens: int) -> torch.Tensor:
        """Slots of the first ``num_tokens`` positions of a sequence that owns ``pages``."""
        if num_tokens > len(pages) * self.page_size:
            raise ValueError(f"{num_tokens} tokens do not fit in {len(pages)} pages")
        ps = self.page_size
        base = torch.tensor(pages, dtype=torch.int64).repeat_interleave(ps) * ps
        offs = torch.arange(ps, dtype=torch.int64).repeat(len(pages))
        return (base + offs)[:num_tokens]

    def new_token_slots(self, pages: list[int], start: int, end: int) -> list[int]:
        """Slots of positions ``[start, end)`` of a sequence that owns ``pages``."""
        ps = self.page_size
        return [pages[j // ps] * ps + j % ps for j in range(start, end)]

    def page_bytes(self) -> int:
        return self.shape.bytes_per_token() * self.page_size
