"""Incremental detokenization: token ids in, text deltas out, correct across multi-byte chars.

``tokenizers``' ``DecodeStream`` holds back bytes until they form whole UTF-8 characters (an emoji
split over four byte-level tokens comes out once, whole) and handles SentencePiece leading spaces
by decoding with context. One instance per generated sequence.
"""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# A few prompt tokens give the decoder the context it needs for the first generated token
# (SentencePiece strips a leading space at the start of a sequence but not mid-sequence).
_PROMPT_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    __slots__ = ("_tokenizer", "_stream")

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else None
        if context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            # A prompt ending mid-character (token-id prompts can): DecodeStream would emit that
            # unfinished tail, prompt text included, as the first token's output.
            context = None
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        text = self._stream.step(self._tokenizer, token_id)
        return text if text is not None else ""


def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's printable stand-ins for the 256 byte values (the ByteLevel pre-tokenizer alphabet).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTextCache:
    """Each token's own bytes and text, for logprobs (``token`` / ``bytes`` fields).

    A token can hold part of a UTF-8 character, so its bytes come from the vocabulary entry
    (byte-level alphabet or ``<0xHH>`` byte fallback), not from decoding it alone.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self._byte_level = _byte_level_decoder() if "ByteLevel" in kinds else None

    def raw(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._compute(token_id)
            self._bytes[token_id] = cached
        return cached

    def _compute(self, token_id: int) -> bytes:
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.raw(token_id).decode("utf-8", errors="replace")

    def bytes(self, token_id: int) -> list[int]:
        return list(self.raw(token_id))
