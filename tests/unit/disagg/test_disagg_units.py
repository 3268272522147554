"""Pure pieces of disaggregation: page staging, the bootstrap wire format, the config."""

from __future__ import annotations

import asyncio
import os
import socket

import msgspec
import pytest
import torch

from armature.engine.disagg import DisaggConfig, DisaggMode, TransferBackend
from armature.engine.disagg.kv_pages import as_staging, gather_pages, layout_of, scatter_pages
from armature.engine.disagg.transfer import SegmentPool, gather_into_segment, open_destination, raw_bytes
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
                want = s_buf[layer][s_page * ps : (s_page + 1) * ps]
                assert torch.equal(want, d_buf[layer][d_page * ps : (d_page + 1) * ps])
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


def test_segments_are_reused_only_after_a_completed_transfer() -> None:
    segments = SegmentPool()
    try:
        seg = segments.acquire(1000)
        segments.give_back(seg)
        again = segments.acquire(800)  # fits (not more than twice the need): reused
        assert again.name == seg.name
        assert segments.acquire(5000).name != seg.name
        # A destination whose transfer was cut short is unlinked, never handed out again.
        dest = open_destination(TransferBackend.SHM, 1000, segments)
        name = dest.shm_name
        assert name is not None and os.path.exists(f"/dev/shm/{name.lstrip('/')}")
        dest.discard()
        assert not os.path.exists(f"/dev/shm/{name.lstrip('/')}")
        segments.give_back(again)
    finally:
        segments.close()
    assert not os.path.exists(f"/dev/shm/{seg.name.lstrip('/')}")


def test_pages_written_straight_into_a_segment() -> None:
    src = pool()
    for i, buf in enumerate((*src.k_buffer, *src.v_buffer)):
        buf.copy_(torch.arange(buf.numel(), dtype=torch.float32).view(buf.shape) + i)
    segments = SegmentPool()
    try:
        seg = segments.acquire(3 * layout_of(src).page_bytes())
        written = gather_into_segment(src, [2, 0, 7], seg.name)
        raw = torch.frombuffer(seg.buf, dtype=torch.uint8, count=written)
        assert torch.equal(as_staging(raw, layout_of(src), 3), gather_pages(src, [2, 0, 7]))
        del raw
        with pytest.raises(OSError):
            gather_into_segment(src, list(range(8)), seg.name)  # more pages than the segment holds
        segments.give_back(seg)
    finally:
        segments.close()
