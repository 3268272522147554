"""The model's shape and numerics, parsed from a Hugging Face ``config.json``.

Both config layouts are accepted: transformers 4 (``rope_theta`` + ``rope_scaling``) and
transformers 5 (``rope_parameters`` holding the theta and the scaling together).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# model_type -> our architecture name; Mistral is Llama-shaped apart from its optional sliding
# window, which we honour by capping the context at the window (within it the two agree).
_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}

_ROPE_TYPES = {"default", "linear", "llama3"}


class UnsupportedModelError(ValueError):
    """The config describes a model the native engine cannot run."""


@dataclass
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # qwen2: q/k/v projections carry a bias
    qk_norm: bool  # qwen3: RMSNorm over each head of q and k before RoPE
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = str(raw.get("model_type", "")).lower()
        arch = _ARCHITECTURES.get(model_type)
        if arch is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported by the native engine "
                f"(supported: {sorted(_ARCHITECTURES)})"
            )
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise UnsupportedModelError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
        theta, scaling = _rope_of(raw)
        if raw.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
        if raw.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        default_bias = arch == "qwen2"
        eos = raw.get("eos_token_id")
        eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([] if eos is None else [int(eos)])
        max_pos = int(raw.get("max_position_embeddings", 2048))
        window = raw.get("sliding_window")
        window_on = raw.get("use_sliding_window", model_type == "mistral")
        if window and window_on and int(window) < max_pos:
            max_pos = int(window)
        bos = raw.get("bos_token_id")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", default_bias)),
            qk_norm=arch == "qwen3",
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; it is not a Hugging Face model folder")
        config = cls.from_dict(json.loads(path.read_text()))
        # generation_config.json often lists more stop ids (e.g. <|im_end|> next to <|endoftext|>).
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
            config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *(int(e) for e in extra)]))
        return config


def _rope_of(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling: dict[str, Any] | None = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
        scaling = dict(scaling) if scaling else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported (supported: {sorted(_ROPE_TYPES)})"
            )
        if rope_type == "default":
            scaling = None
        else:
            scaling["rope_type"] = rope_type
    return theta, scaling
