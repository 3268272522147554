"""KV block hashing: part of the wire contract between engines, the mocker and the router.

XXH3-64 with seed 1337 over the little-endian u32 token ids of each *full* page (a trailing
partial page is ignored). Sequence hashes chain the local hashes so that a block's identity
includes everything before it: ``seq[0] = local[0]``,
``seq[i] = xxh3(le64(seq[i-1]) || le64(local[i]))``. A LoRA name mixes into the seed so that
adapters never share blocks with the base model.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from itertools import repeat

import numpy as np
import xxhash

XXH3_SEED = 1337
_MASK64 = (1 << 64) - 1
_PAIR = struct.Struct("<QQ")


def lora_seed(lora_name: str | None) -> int:
    if not lora_name:
        return XXH3_SEED
    return (XXH3_SEED + xxhash.xxh3_64_intdigest(lora_name.encode(), seed=XXH3_SEED)) & _MASK64


def _le_u32(tokens: Sequence[int]) -> bytes:
    buf = array("I", tokens)
    if buf.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit on this platform")
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian hosts
        buf.byteswap()
    return buf.tobytes()


def compute_local_block_hashes(
    tokens: Sequence[int], block_size: int, lora_name: str | None = None
) -> list[int]:
    """Hash each full block of ``tokens`` on its own (no chaining)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    seed = lora_seed(lora_name)
    full = len(tokens) // block_size
    if full == 0:
        return []
    # This runs per routed request (256 blocks at 4k tokens): numpy splits the buffer into
    # per-block byte strings in C, and map() keeps the per-block hashing loop out of Python.
    blocks = np.frombuffer(_le_u32(tokens), dtype=f"V{4 * block_size}", count=full).tolist()
    return list(map(xxhash.xxh3_64_intdigest, blocks, repeat(seed)))


def chain_sequence_hashes(local_hashes: Sequence[int], parent: int | None = None) -> list[int]:
    """Turn local block hashes into sequence hashes, optionally continuing from ``parent``."""
    out: list[int] = []
    prev = parent
    digest = xxhash.xxh3_64_intdigest
    for h in local_hashes:
        prev = h if prev is None else digest(_PAIR.pack(prev, h), XXH3_SEED)
        out.append(prev)
    return out


def compute_sequence_block_hashes(
    tokens: Sequence[int], block_size: int, lora_name: str | None = None
) -> list[int]:
    """Sequence hashes of every full block of ``tokens``."""
    return chain_sequence_hashes(compute_local_block_hashes(tokens, block_size, lora_name))
