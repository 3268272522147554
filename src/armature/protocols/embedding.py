"""Embedding requests between the frontend and an embedding worker (``--embedding-worker``).

The frontend tokenizes every input, so the worker sees token ids only, as it does for
generation. Vectors travel as raw little-endian float32: a quarter of the size of msgpack
floats, and exactly the bytes OpenAI's ``encoding_format: "base64"`` carries.
"""

from __future__ import annotations

import sys
from array import array

import msgspec


class EmbeddingRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    token_ids: list[list[int]]  # one id list per input, in the client's order
    dimensions: int | None = None  # must equal the model's width when given


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    embeddings: list[bytes]  # float32 little-endian, one vector per input, in order
    prompt_tokens: int


def pack_vector(values: list[float]) -> bytes:
    """One embedding as it travels: little-endian float32."""
    vec = array("f", values)
    if sys.byteorder == "big":
        vec.byteswap()
    return vec.tobytes()


def unpack_vector(raw: bytes) -> list[float]:
    vec = array("f")
    vec.frombytes(raw)
    if sys.byteorder == "big":
        vec.byteswap()
    return vec.tolist()
