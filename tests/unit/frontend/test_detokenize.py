from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from armature.frontend.detokenize import IncrementalDetokenizer, TokenTextCache

EOS = "<eos>"

TEXTS = ["hello 😀 world", "你好, world 🇫🇷!", "ünïcödé ...", "a" * 5 + "🧑‍🚀" + "end"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decode_never_splits_a_character(byte_tok: Tokenizer, text: str) -> None:
    tok = byte_tok
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split())  # multi-byte chars really span tokens here
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.step(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_emoji_comes_out_whole_in_one_piece(byte_tok: Tokenizer) -> None:
    tok = byte_tok
    ids = tok.encode("x😀").ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.step(i) for i in ids]
    assert "😀" in pieces  # the four byte tokens yield '' until the last completes it
    assert pieces.count("") == 3


def test_special_tokens_are_skipped_when_asked(byte_tok: Tokenizer) -> None:
    tok = byte_tok
    eos = tok.token_to_id(EOS)
    ids = tok.encode("hello").ids + [eos]
    assert "".join(IncrementalDetokenizer(tok).step(i) for i in ids) == "hello"
    assert "".join(IncrementalDetokenizer(tok, skip_special_tokens=False).step(i) for i in ids) == "hello" + EOS


def test_prompt_context_does_not_leak_into_output(byte_tok: Tokenizer) -> None:
    tok = byte_tok
    prompt = tok.encode("hello world").ids
    out = tok.encode(" the end").ids
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(detok.step(i) for i in out) == " the end"


def test_token_bytes_reassemble_partial_characters(byte_tok: Tokenizer) -> None:
    tok = byte_tok
    ids = tok.encode("é😀").ids
    cache = TokenTextCache(tok)
    raw = b"".join(bytes(cache.bytes(i)) for i in ids)
    assert raw == "é😀".encode()
    assert cache.text(tok.encode("hello").ids[0]) == "hello"


def test_a_prompt_ending_mid_character_does_not_leak_into_output(byte_tok: Tokenizer) -> None:
    # "é" is two bytes, two tokens here: a token-id prompt may stop after the first one.
    prompt = byte_tok.encode("hello wé").ids[:-1]
    assert byte_tok.decode(prompt).endswith("\ufffd")
    out = byte_tok.encode(" world").ids
    detok = IncrementalDetokenizer(byte_tok, prompt)
    assert "".join(detok.step(t) for t in out) == " world"
