"""The attention interface the model layers call; one implementation per kernel family.

A backend is told the batch once per forward (``prepare``) so any index tensors, masks or kernel
plans are built once and reused by every layer; ``forward`` then writes the new tokens' K/V into
the paged pool and attends. The CPU/torch backend lives in ``torch_backend.py``; GPU backends
(Triton, flex attention, CUDA graphs) implement the same two methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from armature.engine.forward_batch import ForwardBatch
from armature.engine.kv_pool import KVPool


class AttentionBackend(ABC):
    # True: reads ForwardBatch.page_table (kv_indices may be empty); False: reads kv_indices.
    uses_page_table = False

    def __init__(
        self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int, scale: float
    ) -> None:
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build whatever per-batch state the layers share (called once per forward)."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Store ``k``/``v`` (``[T, kv_heads, head_dim]``) at the batch's ``out_cache_loc`` in
        layer ``layer`` of the pool, then attend ``q`` (``[T, heads, head_dim]``) causally over each
        sequence's context. Returns ``[T, heads * head_dim]``."""
