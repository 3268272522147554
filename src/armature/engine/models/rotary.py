"""Rotary position embeddings (HF "rotate half" layout), with linear and llama3 frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # Same arithmetic as transformers (int64 arange cast to float) so logits match it bit for bit.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {kind!r}")


class RotaryEmbedding:
    """cos/sin tables for every position up to ``max_positions``, looked up once per forward."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        inv = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        cos, sin = freqs.cos(), freqs.sin()
        # Stored as [pos, 2, half] so a rotation is x*cos + swap_halves(x)*sin with the sign of
        # the first half folded into the table: three ops per call instead of eight.
        self.cos = torch.stack([cos, cos], dim=1).to(dtype=dtype, device=device)
        self.sin = torch.stack([-sin, sin], dim=1).to(dtype=dtype, device=device)
        self.max_positions = max_positions

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin shaped ``[T, 1, 2, head_dim / 2]`` to broadcast over heads."""
        cos = self.cos.index_select(0, positions).unsqueeze(1)
        return cos, self.sin.index_select(0, positions).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by its positions' angles (HF's rotate-half layout)."""
    t, h, d = x.shape
    halves = x.view(t, h, 2, d // 2)
    return torch.addcmul(halves * cos, halves.flip(2), sin).view(t, h, d)
