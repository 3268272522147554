"""Messages of the bootstrap connection: length-prefixed msgpack frames, then raw KV bytes.

One connection per room. The decode side opens it and sends a ``KvPull`` (which room, its KV
layout, how many tokens, the pages it reserved, and for ``shm`` the segment to write into).
The prefill side answers once, when the prompt's KV is staged: a ``KvReady`` (first token, sizes)
followed, for ``tcp``, by exactly ``nbytes`` of KV; or a ``KvFailed`` with a reason. Frames carry
the protocol version so mismatched builds fail with a clear message, not a decode error.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec

PROTOCOL_VERSION = 1
# Control frames only (KV bytes never travel in a frame); prompt logprobs can make one large.
MAX_FRAME_BYTES = 64 << 20
_LEN = struct.Struct(">I")


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What both sides must agree on for the bytes to mean the same KV."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32"
    page_size: int

    def page_bytes(self) -> int:
        import torch

        elem = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem


class KvPull(msgspec.Struct, tag="pull", kw_only=True):
    version: int
    room: int
    backend: str
    layout: KvLayout
    num_tokens: int
    dst_pages: list[int]
    shm_name: str | None = None


class KvReady(msgspec.Struct, tag="ready", kw_only=True):
    version: int
    room: int
    num_tokens: int
    num_pages: int
    nbytes: int
    first_token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    cached_tokens: int = 0
    # Prompt logprobs, when the request asked for them (the prefill side computed them).
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    # Wall clock (time.time()) when the prefill engine began staging the KV: the decode side
    # measures the transfer from here to the moment the pages are in its pool.
    staged_at: float = 0.0


class KvFailed(msgspec.Struct, tag="failed", kw_only=True):
    version: int
    room: int
    message: str


Frame = KvPull | KvReady | KvFailed
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


class WireError(ConnectionError):
    """The peer sent something this side cannot read, or closed the connection early."""


def encode_frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _LEN.pack(len(body)) + body


async def read_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> Frame:
    head = await read_exact(loop, sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME_BYTES:
        raise WireError(f"bootstrap frame of {n} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    body = await read_exact(loop, sock, n)
    try:
        frame = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"unreadable bootstrap frame: {exc}") from exc
    if frame.version != PROTOCOL_VERSION:
        raise WireError(
            f"bootstrap protocol version {frame.version} from the peer, this side speaks {PROTOCOL_VERSION}: "
            "run the same Armature version on prefill and decode workers"
        )
    return frame


async def read_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    await recv_into(loop, sock, memoryview(buf))
    return bytes(buf)


async def recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``; ``WireError`` if the peer closes first."""
    got = 0
    total = len(view)
    while got < total:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise WireError(f"the peer closed the connection after {got} of {total} bytes")
        got += n
