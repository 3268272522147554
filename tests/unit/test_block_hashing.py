from __future__ import annotations

import struct

import xxhash
from hypothesis import given
from hypothesis import strategies as st

from armature.protocols.hashing import (
    XXH3_SEED,
    chain_sequence_hashes,
    compute_local_block_hashes,
    compute_sequence_block_hashes,
    lora_seed,
)


def test_local_hash_is_xxh3_of_le_u32_tokens() -> None:
    tokens = [1, 2, 3, 4, 70000, 6, 7, 8]
    want = [
        xxhash.xxh3_64_intdigest(struct.pack("<4I", *tokens[:4]), seed=1337),
        xxhash.xxh3_64_intdigest(struct.pack("<4I", *tokens[4:]), seed=1337),
    ]
    assert compute_local_block_hashes(tokens, 4) == want


def test_partial_trailing_block_is_ignored() -> None:
    assert len(compute_local_block_hashes(list(range(10)), 4)) == 2
    assert compute_local_block_hashes([1, 2, 3], 4) == []


def test_sequence_hash_chains_previous() -> None:
    local = [11, 22, 33]
    seq = chain_sequence_hashes(local)
    assert seq[0] == 11
    assert seq[1] == xxhash.xxh3_64_intdigest(struct.pack("<QQ", 11, 22), seed=XXH3_SEED)
    assert seq[2] == xxhash.xxh3_64_intdigest(struct.pack("<QQ", seq[1], 33), seed=XXH3_SEED)


def test_lora_changes_every_hash() -> None:
    tokens = list(range(32))
    assert lora_seed(None) == XXH3_SEED
    base = compute_local_block_hashes(tokens, 16)
    lora = compute_local_block_hashes(tokens, 16, lora_name="adapter-a")
    assert all(a != b for a, b in zip(base, lora))


@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 16))
def test_sequence_hashes_of_a_prefix_are_a_prefix(tokens: list[int], block: int) -> None:
    full = compute_sequence_block_hashes(tokens, block)
    cut = len(tokens) // 2
    assert compute_sequence_block_hashes(tokens[:cut], block) == full[: cut // block]
