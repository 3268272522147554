"""Frame encoding and the stream splitter: any chunking, oversize skipping, bad bytes."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from armature.protocols.version import PROTOCOL_VERSION
from armature.runtime.request_plane.codec import (
    FrameKind,
    FrameReader,
    FrameTooLarge,
    ProtocolViolation,
    RequestHead,
    VersionMismatch,
    append_frame,
    append_item,
    decode_request_body,
    encode_request_body,
    frame_bytes,
    parse_frame,
)


def collect(limit: int = 1 << 20) -> tuple[FrameReader, list[tuple[FrameKind, int, bytes]], list[tuple[int, int]]]:
    frames: list[tuple[FrameKind, int, bytes]] = []
    oversize: list[tuple[int, int]] = []
    reader = FrameReader(
        lambda k, s, b: frames.append((k, s, bytes(b))), lambda k, s, n: oversize.append((s, n)), limit
    )
    return reader, frames, oversize


@given(
    items=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=20),
    cuts=st.lists(st.integers(1, 50), max_size=200),
)
def test_frames_survive_any_chunking(items: list[tuple[int, bytes]], cuts: list[int]) -> None:
    wire = bytearray()
    for sid, payload in items:
        append_item(wire, sid, payload)
    reader, frames, _ = collect()
    data, pos = bytes(wire), 0
    for cut in cuts:
        reader.feed(data[pos : pos + cut])
        pos += cut
    reader.feed(data[pos:])
    assert [(s, msgspec.msgpack.decode(b)) for _, s, b in frames] == items
    assert all(k == FrameKind.DATA for k, _, _ in frames)


def test_oversized_frame_is_skipped_and_reported_then_reading_goes_on() -> None:
    wire = bytearray()
    append_item(wire, 1, "small")
    append_frame(wire, FrameKind.DATA, 2, b"\x00" * 5000)  # over the reader's limit
    append_item(wire, 3, "after")
    reader, frames, oversize = collect(limit=1000)
    for i in range(0, len(wire), 700):
        reader.feed(bytes(wire[i : i + 700]))
    assert oversize == [(2, 5000)]
    assert [(s, msgspec.msgpack.decode(b)) for _, s, b in frames] == [(1, "small"), (3, "after")]


def test_encoder_refuses_an_item_over_the_limit_and_leaves_the_buffer_intact() -> None:
    buf = bytearray()
    append_item(buf, 1, "ok")
    before = bytes(buf)
    with pytest.raises(FrameTooLarge, match="exceeds"):
        append_item(buf, 2, "x" * 2000, limit=1000)
    assert bytes(buf) == before


def test_garbage_and_other_versions_are_rejected_clearly() -> None:
    reader, _, _ = collect()
    with pytest.raises(ProtocolViolation, match="not a request-plane frame"):
        reader.feed(b"GET / HTTP/1.1\r\n\r\n")
    frame = bytearray(frame_bytes(FrameKind.END, 9))
    struct.pack_into(">H", frame, 4, PROTOCOL_VERSION + 3)
    reader, _, _ = collect()
    with pytest.raises(VersionMismatch) as err:
        reader.feed(bytes(frame))
    assert err.value.stream_id == 9 and f"version {PROTOCOL_VERSION + 3}" in str(err.value)
    with pytest.raises(VersionMismatch):
        parse_frame(bytes(frame))


def test_request_body_round_trip() -> None:
    head = RequestHead("ns.c.e", 0x1234, "req", "t" * 32, "s" * 16, 64)
    body = encode_request_body(head, msgspec.msgpack.encode({"a": [1, 2]}))
    got_head, payload = decode_request_body(memoryview(body))
    assert got_head == head and msgspec.msgpack.decode(payload) == {"a": [1, 2]}
    kind, sid, view = parse_frame(frame_bytes(FrameKind.REQUEST, 5, body))
    assert (kind, sid, bytes(view)) == (FrameKind.REQUEST, 5, body)


def test_an_unencodable_item_leaves_no_half_frame() -> None:
    buf = bytearray()
    append_item(buf, 1, "ok")
    before = bytes(buf)
    with pytest.raises(TypeError):
        append_item(buf, 2, object())
    assert bytes(buf) == before
