"""Converting the SmolLM2 GGUF from scratch into an empty cache folder (about ten seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from armature.engine.loader import cache_root, default_model_gguf, resolve_model_path

pytestmark = pytest.mark.slow


def test_first_resolve_converts_into_the_cache_and_the_second_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_path: Path
) -> None:
    monkeypatch.setenv("ARMATURE_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path / "models"
    folder = resolve_model_path(str(default_model_gguf()))
    assert folder.parent == tmp_path / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    # Only the finished folder remains: the conversion wrote into a temp sibling and renamed it.
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]
    # Deterministic: a fresh conversion writes the same tensors as the shared cache's copy.
    with safe_open(str(folder / "model.safetensors"), "pt") as a, safe_open(
        str(smollm2_path / "model.safetensors"), "pt"
    ) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        name = "model.layers.7.self_attn.q_proj.weight"
        assert a.get_tensor(name).equal(b.get_tensor(name))
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (folder / f).read_bytes() == (smollm2_path / f).read_bytes()

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    # A cache entry missing one of its files (an interrupted copy, a user's rm) is not trusted.
    (folder / "tokenizer.json").unlink()
    assert resolve_model_path(None) == folder
    assert (folder / "tokenizer.json").read_bytes() == (smollm2_path / "tokenizer.json").read_bytes()
