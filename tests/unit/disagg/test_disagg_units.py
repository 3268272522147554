"""Pure pieces of disaggregation: page staging, the bootstrap wire format, the config."""

from __future__ import annotations

import asyncio
import socket

import msgspec
import pytest
import torch

from armature.engine.disagg import DisaggConfig, DisaggMode, TransferBackend
from armature.engine.disagg.kv_pages import as_staging, gather_pages, layout_of, scatter_pages
from armature.engine.disagg.transfer import raw_bytes
from armature.engine.disagg.wire import (
    PROTOCOL_VERSION,
    KvFailed,
    KvPull,
    WireError,
    encode_frame,
    read_frame,
)
from armature.engine.kv_pool import KVPool, KVShape


def pool(pages: int = 8, page_size: int = 4) -> KVPool:
    return KVPool(KVShape(3, 2, 8, torch.float32, torch.device("cpu")), pages, page_size)


def test_pages_round_trip_between_pools_through_bytes() -> None:
    src, dst = pool(), pool()
    gen = torch.Generator().manual_seed(0)
    for buf in (*src.k_buffer, *src.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=gen))
    staged = gather_pages(src, [5, 1, 6])
    # As the tcp backend sees it: bytes on the wire, then viewed back as staged pages.
    raw = torch.frombuffer(bytearray(raw_bytes(staged)), dtype=torch.uint8)
    received = as_staging(raw, layout_of(dst), 3)
    scatter_pages(dst, [0, 7, 2], received)
    ps = src.page_size
    for layer in range(3):
        for s_page, d_page in ((5, 0), (1, 7), (6, 2)):
            for s_buf, d_buf in ((src.k_buffer, dst.k_buffer), (src.v_buffer, dst.v_buffer)):
                assert torch.equal(s_buf[layer][s_page * ps : (s_page + 1) * ps], d_buf[layer][d_page * ps : (d_page + 1) * ps])
    # Pages nobody wrote stay untouched.
    assert not dst.k_buffer[0][ps : 2 * ps].any()
    assert layout_of(src).page_bytes() * 3 == staged.numel() * staged.element_size()


def test_scatter_refuses_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        scatter_pages(pool(), [0, 1], gather_pages(pool(), [0]))


async def _exchange(payload: bytes) -> object:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(a, payload)
        a.shutdown(socket.SHUT_WR)
        return await read_frame(loop, b)
    finally:
        a.close()
        b.close()


async def test_frames_round_trip_and_refuse_other_versions() -> None:
    pull = KvPull(version=PROTOCOL_VERSION, room=7, backend="shm", layout=layout_of(pool()), num_tokens=9,
                  dst_pages=[3, 4, 5], shm_name="seg")  # fmt: skip
    assert await _exchange(encode_frame(pull)) == pull
    with pytest.raises(WireError, match="protocol version 99"):
        await _exchange(encode_frame(KvFailed(version=99, room=1, message="x")))
    with pytest.raises(WireError, match="closed the connection"):
        await _exchange(encode_frame(pull)[:-3])
    with pytest.raises(WireError, match="unreadable"):
        body = msgspec.msgpack.encode({"type": "nonsense"})
        await _exchange(len(body).to_bytes(4, "big") + body)


def test_config_validates() -> None:
    cfg = DisaggConfig(mode="decode", transfer_backend="shm")  # type: ignore[arg-type]
    assert cfg.mode is DisaggMode.DECODE and cfg.transfer_backend is TransferBackend.SHM
    with pytest.raises(ValueError):
        DisaggConfig(mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeouts"):
        DisaggConfig(mode=DisaggMode.PREFILL, bootstrap_timeout_s=0)
