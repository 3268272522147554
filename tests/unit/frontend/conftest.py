"""Frontend unit-test fixtures: a byte-level BPE tokenizer trained in-process (multi-byte
characters span several tokens) and a model folder holding it."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<eos>"


def byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    # ASCII-only corpus: emoji and CJK stay split into their single bytes.
    tok.train_from_iterator(["hello world the stop STOP sequence end ###"] * 20, trainer)
    return tok


@pytest.fixture(scope="session")
def byte_tok() -> Tokenizer:
    return byte_level_tokenizer()
