"""Attention backends: the interface (base.py) and its implementations."""

from __future__ import annotations

from armature.engine.attention.base import AttentionBackend
from armature.engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "TorchAttentionBackend"]
