"""Convert a llama.cpp GGUF file into a Hugging Face folder the engine (and transformers) can load.

GGUF stores quantized tensors under llama.cpp names, and Llama-arch q/k rows permuted for its
interleaved RoPE; the tokenizer is metadata rather than a ``tokenizer.json``. We dequantize every
tensor to float32 (once — the result is cached by the loader), rename it, undo the permutation, and
rebuild a byte-level BPE ``tokenizer.json`` with the ``tokenizers`` package.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GGUF general.architecture -> HF model_type / class.
_HF_ARCH: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp derives from the config at conversion time; the HF side recomputes them.
_SKIPPED = {"rope_freqs.weight"}

# Pre-tokenizer splits by tokenizer.ggml.pre. GPT-2's regex is what ByteLevel(use_regex=True) does.
_GPT2 = "gpt2"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, str] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    # StarCoder-family vocabularies (SmolLM, SmolLM2) split every digit, then GPT-2's regex.
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


class GGUFConversionError(ValueError):
    """The GGUF file describes something we cannot turn into a HF folder."""


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's rows from [half0, half1] to interleaved pairs;
    # this is the inverse of its reshape(n_head, 2, d/2, ...).swapaxes(1, 2).
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config_of(reader: gguf.GGUFReader) -> dict[str, Any]:
    arch = str(_field(reader, "general.architecture"))
    if arch not in _HF_ARCH:
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported (supported: {sorted(_HF_ARCH)})"
        )
    model_type, cls = _HF_ARCH[arch]

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // heads)))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(key("vocab_size", len(tokens)))
    names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scale_type = key("rope.scaling.type")
    if scale_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scale_type not in (None, "none"):
        raise GGUFConversionError(f"GGUF rope scaling {scale_type!r} is not supported")
    return config


def convert_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], progress: Callable[[Any], Any] = iter
) -> dict[str, torch.Tensor]:
    permute = config["model_type"] == "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    for t in progress(reader.tensors):
        if t.name in _SKIPPED:
            continue
        name = _hf_name(t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # GGUF lists dims innermost-first; dequantize already returns the numpy (row-major) shape.
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if permute and name.endswith("self_attn.q_proj.weight"):
            w = _unpermute(w, heads)
        elif permute and name.endswith("self_attn.k_proj.weight"):
            w = _unpermute(w, kv_heads)
        elif permute and name.endswith(("self_attn.q_proj.bias", "self_attn.k_proj.bias")):
            raise GGUFConversionError("permuted q/k biases in a Llama-arch GGUF are not supported")
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    return out


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFConversionError(f"unknown GGUF tensor {name!r}")


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _PRE_TOKENIZERS.get(str(_field(reader, "tokenizer.ggml.pre", "default")))
    if pre is None:
        raise GGUFConversionError(
            f"GGUF pre-tokenizer {_field(reader, 'tokenizer.ggml.pre')!r} is not supported "
            f"(supported: {sorted(_PRE_TOKENIZERS)})"
        )
    if pre == _GPT2:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "digits+gpt2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pre), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_TYPE_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _TOKEN_TYPE_USER_DEFINED
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def tokenizer_config_of(reader: gguf.GGUFReader, max_length: int) -> dict[str, Any]:
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}")
        return None if idx is None else tokens[int(idx)]

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = str(template)
    return {k: v for k, v in cfg.items() if v is not None}


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: Callable[[Any], Any] = iter
) -> None:
    """Write config.json, model.safetensors and the tokenizer files of ``gguf_path`` into ``out_dir``."""
    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config_of(reader)
    tensors = convert_tensors(reader, config, progress)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    tok_cfg = tokenizer_config_of(reader, config["max_position_embeddings"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    if "chat_template" in tok_cfg:
        # transformers 5 prefers a standalone template file; keep both so either reader finds it.
        (out_dir / "chat_template.jinja").write_text(tok_cfg["chat_template"])
