"""Loading models: HF folders (single and sharded), the converted SmolLM2 GGUF, and bad paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from armature.engine.forward_batch import ForwardBatch, ForwardMode
from armature.engine.config import ModelConfig, UnsupportedModelError
from armature.engine.loader import ModelNotFoundError, default_model_gguf, resolve_model_path
from armature.engine.model_runner import ModelRunner

TEXTS = [
    "Hello, world!",
    "The year 2026 had 365 days; π ≈ 3.14159.",
    "  leading spaces, trailing tabs\t\t\nand a new line",
    "émojis 🎉🚀 and CJK 漢字かな",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nHi<|im_end|>",
]


def test_smollm2_folder_is_a_complete_hf_model(smollm2_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (smollm2_path / name).is_file(), name
    cfg = ModelConfig.from_folder(smollm2_path)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    assert cfg.bos_token_id == 1 and 2 in cfg.eos_token_ids


def test_converted_tokenizer_round_trips_text_and_keeps_special_tokens_whole(smollm2_path: Path) -> None:
    tok = Tokenizer.from_file(str(smollm2_path / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert tok.encode("<|im_end|>", add_special_tokens=False).ids == [2]
    # SmolLM2's vocabulary splits numbers into single digits.
    digits = tok.encode("12345", add_special_tokens=False).tokens
    assert digits == ["1", "2", "3", "4", "5"]


def test_converted_tokenizer_loads_in_transformers_and_renders_the_chat_template(smollm2_path: Path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    for t in TEXTS:
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t


def test_converted_smollm2_gives_the_same_logits_in_transformers_and_the_engine(smollm2_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    ids = tok.encode(text, add_special_tokens=False)
    runner = ModelRunner(str(smollm2_path), max_total_tokens=256)
    pool = runner.kv_pool
    slots = pool.slots_of(pool.alloc(-(-len(ids) // pool.page_size)), len(ids))
    n = len(ids)
    batch = ForwardBatch(ForwardMode.EXTEND, torch.tensor(ids), torch.arange(n), slots, [n], [0],
                         [slots], [True])
    got = runner.forward(batch)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
    assert tok.decode(got[-1].argmax().item()).strip() == "France"


def test_second_resolve_is_a_cache_hit(smollm2_path: Path) -> None:
    before = (smollm2_path / "model.safetensors").stat().st_mtime_ns
    again = resolve_model_path(str(default_model_gguf()))
    assert again == smollm2_path
    assert resolve_model_path(None) == smollm2_path
    assert (smollm2_path / "model.safetensors").stat().st_mtime_ns == before


def test_sharded_safetensors_folder_loads_like_a_single_file(tmp_path: Path, tiny_qwen2_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2_path, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tiny_qwen2_path / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    one = ModelRunner(str(tiny_qwen2_path), max_total_tokens=64)
    many = ModelRunner(str(sharded), max_total_tokens=64)
    for a, b in zip(one.model.layers, many.model.layers):
        assert torch.equal(a.qkv, b.qkv) and torch.equal(a.gate_up, b.gate_up)
    assert torch.equal(one.model.lm_head, many.model.lm_head)


def test_kv_pool_is_sized_from_max_total_tokens_or_memory(tiny_llama_path: Path) -> None:
    runner = ModelRunner(str(tiny_llama_path), page_size=16, max_total_tokens=1000)
    assert runner.kv_pool.total_pages == 63  # ceil(1000 / 16)
    by_memory = ModelRunner(str(tiny_llama_path), page_size=32, mem_fraction_static=0.001)
    assert by_memory.kv_pool.total_pages > 0 and by_memory.kv_pool.page_size == 32
    default = ModelRunner(str(tiny_llama_path))
    assert 0 < default.kv_pool.total_pages * 16 <= 1 << 18  # a CPU default: modest, never millions
    capped = ModelRunner(str(tiny_llama_path), max_total_tokens=64, max_context_length=100)
    assert capped.context_length == 100


def test_a_sequence_longer_than_the_context_length_is_refused(tiny_llama_path: Path) -> None:
    runner = ModelRunner(str(tiny_llama_path), max_total_tokens=64, max_context_length=20)
    pool = runner.kv_pool
    slots = pool.slots_of(pool.alloc(2), 21)
    batch = ForwardBatch(
        ForwardMode.EXTEND, torch.arange(21), torch.arange(21), slots, [21], [0], [slots], [False]
    )
    with pytest.raises(ValueError, match="exceeds the context length 20"):
        runner.forward(batch)


def test_a_file_that_is_not_gguf_is_rejected_clearly(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model_path(str(f))


def test_a_hub_id_is_rejected_with_a_no_download_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # so the id cannot accidentally name a local folder
    with pytest.raises(ModelNotFoundError, match="does not download weights"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_missing_path_and_a_folder_without_config_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no file or folder"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_unsupported_architectures_and_dtypes_are_rejected(tmp_path: Path, tiny_llama_path: Path) -> None:
    raw = json.loads((tiny_llama_path / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        ModelConfig.from_dict({**raw, "model_type": "gpt_neox"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
        ModelConfig.from_dict({**raw, "rope_parameters": yarn})
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelRunner(str(tiny_llama_path), dtype="int3", max_total_tokens=64)


def test_transformers_4_config_layout_is_parsed(tiny_llama_path: Path) -> None:
    raw = json.loads((tiny_llama_path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    old = {**raw, "rope_theta": params.pop("rope_theta"), "rope_scaling": params}
    cfg, new = ModelConfig.from_dict(old), ModelConfig.from_folder(tiny_llama_path)
    assert cfg.rope_theta == new.rope_theta and cfg.rope_scaling == new.rope_scaling
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"


def test_mistral_sliding_window_caps_the_context_and_matches_transformers_within_it(
    tmp_path: Path, smollm2_path: Path
) -> None:
    from fixtures.models import write_tiny_model

    path = write_tiny_model(tmp_path / "mistral", "mistral", smollm2_path)
    runner = ModelRunner(str(path), max_total_tokens=256)
    assert runner.model_config.architecture == "llama" and runner.context_length == 96
    ids = list(range(100, 196))
    pool = runner.kv_pool
    slots = pool.slots_of(pool.alloc(6), 96)
    batch = ForwardBatch(
        ForwardMode.EXTEND, torch.tensor(ids), torch.arange(96), slots, [96], [0], [slots], [True]
    )
    got = runner.forward(batch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
