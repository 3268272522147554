"""Armature: distributed LLM inference serving built around SGLang-style workers."""

from __future__ import annotations

__version__ = "0.1.0"
