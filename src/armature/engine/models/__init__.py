"""Model implementations, by architecture name (ModelConfig.architecture)."""

from __future__ import annotations

from armature.engine.models.llama import LlamaModel

# Qwen2 (q/k/v bias) and Qwen3 (q/k norm) are Llama with flags the config sets.
MODEL_CLASSES: dict[str, type[LlamaModel]] = {"llama": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel}

__all__ = ["MODEL_CLASSES", "LlamaModel"]
