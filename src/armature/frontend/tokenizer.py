"""A model's tokenizer as the frontend needs it: ``tokenizers`` plus tokenizer_config.json.

Loads ``tokenizer.json`` with the Rust ``tokenizers`` library (fast to import, no torch) and
reads the chat template and special tokens from ``tokenizer_config.json`` /
``chat_template.jinja`` / ``special_tokens_map.json`` the way transformers would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from armature.frontend.chat_template import ChatTemplate

_SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerLoadError(RuntimeError):
    """The tokenizer folder is missing or unreadable."""


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _pick_template(raw: Any, name: str = "default") -> str | None:
    # tokenizer_config.json's chat_template is a string, or a list of {"name","template"} where
    # "default" is the one apply_chat_template uses without tools ("tool_use" with tools).
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        by_name = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        return by_name.get(name) or by_name.get("default")
    return None


@dataclass
class ModelTokenizer:
    tokenizer: Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template_source: str | None = None
    tool_template_source: str | None = None
    vocab_size: int = 0
    _templates: dict[str, ChatTemplate] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, path: str | Path, chat_template_override: str | None = None) -> ModelTokenizer:
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerLoadError(f"no tokenizer.json in {folder}")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise TokenizerLoadError(f"cannot load {tok_file}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name))
            if text is None:
                text = _token_text(special_map.get(name))
            if text is not None:
                special[name] = text
        default_tpl = _pick_template(config.get("chat_template"))
        tool_tpl = _pick_template(config.get("chat_template"), "tool_use")
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            default_tpl = jinja_file.read_text(encoding="utf-8")
            tool_tpl = default_tpl
        if chat_template_override is not None:
            default_tpl = tool_tpl = chat_template_override
        return cls(
            tokenizer=tokenizer,
            special_tokens=special,
            chat_template_source=default_tpl,
            tool_template_source=tool_tpl,
            vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        )

    def chat_template(self, with_tools: bool = False) -> ChatTemplate | None:
        source = self.tool_template_source if with_tools else self.chat_template_source
        if source is None:
            return None
        tpl = self._templates.get(source)
        if tpl is None:
            tpl = ChatTemplate(source, self.special_tokens)
            self._templates[source] = tpl
        return tpl

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode() holds the GIL for the whole prompt (~7 ms for 4k tokens), freezing the event
        # loop while a worker thread tokenizes; encode_batch releases it and gives the same ids.
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
