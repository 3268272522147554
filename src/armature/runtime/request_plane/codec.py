"""Request-plane frames: a fixed binary header, then a msgpack body.

    u32 length (of everything after this field) | u16 protocol version | u8 kind | u32 stream id | body

The header is binary and fixed forever, so a reader always knows the peer's protocol version,
which stream a frame belongs to and how long it is before decoding any msgpack. That gives a
clear error on a version mismatch, and lets a reader skip an oversized frame and fail only its
stream instead of the whole connection.

Bodies: REQUEST = u16 head length | ``RequestHead`` msgpack | payload msgpack; DATA = one
response item as msgpack (no wrapper); ERROR = ``ErrorBody``; CREDIT = an int; the others empty.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import msgspec

from armature.protocols.version import PROTOCOL_VERSION

HEADER = struct.Struct(">IHBI")
HEADER_SIZE = HEADER.size  # 11
_LEN = struct.Struct(">I")
_U16 = struct.Struct(">H")
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class FrameKind(IntEnum):
    REQUEST = 1
    DATA = 2
    END = 3
    ERROR = 4
    STOP = 5
    KILL = 6
    CREDIT = 7  # the caller consumed n items: the handler may send n more (back-pressure)
    ACK = 8  # the handler accepted the stream (ends the caller's first-response timer)


_KNOWN_KINDS = frozenset(int(k) for k in FrameKind)
_HEADER_SPACE = bytes(HEADER_SIZE)
_DATA = int(FrameKind.DATA)


class RequestHead(msgspec.Struct, array_like=True):
    endpoint: str  # "ns.component.endpoint"
    instance_id: int  # the instance the caller meant; a reused port must not serve a stranger
    request_id: str
    trace_id: str
    span_id: str  # the caller's span: the handler's parent span
    window: int  # how many DATA frames the handler may send before it needs CREDIT


class ErrorBody(msgspec.Struct, array_like=True):
    kind: str
    message: str
    migratable: bool


class FrameTooLarge(ValueError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds the request plane's limit of {limit} bytes")
        self.size = size
        self.limit = limit


_encoder = msgspec.msgpack.Encoder()
_head_decoder = msgspec.msgpack.Decoder(RequestHead)
_error_decoder = msgspec.msgpack.Decoder(ErrorBody)
_int_decoder = msgspec.msgpack.Decoder(int)


def append_frame(buf: bytearray, kind: FrameKind, stream_id: int, body: bytes = b"") -> None:
    buf += HEADER.pack(HEADER_SIZE - 4 + len(body), PROTOCOL_VERSION, kind, stream_id)
    if body:
        buf += body


def append_item(
    buf: bytearray, stream_id: int, item: Any, limit: int = MAX_MESSAGE_BYTES, encoder: msgspec.msgpack.Encoder = _encoder
) -> int:
    """Encode ``item`` as a DATA frame straight into ``buf``; returns the body size.

    Encoding in place avoids one bytes object per item; an oversized item is cut back out of
    ``buf`` and raised as ``FrameTooLarge``.
    """
    start = len(buf)
    buf += _HEADER_SPACE
    try:
        encoder.encode_into(item, buf, -1)
    except BaseException:
        del buf[start:]  # leave no half frame behind for the other streams on this connection
        raise
    size = len(buf) - start - HEADER_SIZE
    if size > limit:
        del buf[start:]
        raise FrameTooLarge(size, limit)
    HEADER.pack_into(buf, start, HEADER_SIZE - 4 + size, PROTOCOL_VERSION, _DATA, stream_id)
    return size


def encode_request_body(head: RequestHead, payload: bytes) -> bytes:
    head_bytes = _encoder.encode(head)
    return _U16.pack(len(head_bytes)) + head_bytes + payload


def decode_request_body(body: memoryview | bytes) -> tuple[RequestHead, memoryview | bytes]:
    (head_len,) = _U16.unpack_from(body, 0)
    head = _head_decoder.decode(body[2 : 2 + head_len])
    return head, body[2 + head_len :]


def encode_error(kind: str, message: str, migratable: bool) -> bytes:
    return _encoder.encode(ErrorBody(kind, message, migratable))


def decode_error(body: memoryview | bytes) -> ErrorBody:
    return _error_decoder.decode(body)


def encode_int(n: int) -> bytes:
    return _encoder.encode(n)


def decode_int(body: memoryview | bytes) -> int:
    return _int_decoder.decode(body)


def frame_bytes(kind: FrameKind, stream_id: int, body: bytes = b"") -> bytes:
    buf = bytearray()
    append_frame(buf, kind, stream_id, body)
    return bytes(buf)


class ProtocolViolation(ValueError):
    """Bytes that are not a frame of ours: the connection cannot be trusted any more."""


class VersionMismatch(ProtocolViolation):
    def __init__(self, peer_version: int, stream_id: int) -> None:
        super().__init__(
            f"peer speaks request-plane protocol version {peer_version}, this process speaks "
            f"version {PROTOCOL_VERSION}: upgrade both sides to the same Armature release"
        )
        self.peer_version = peer_version
        self.stream_id = stream_id


def parse_frame(data: bytes | memoryview) -> tuple[FrameKind, int, memoryview]:
    """Decode one whole frame (NATS carries exactly one per message)."""
    if len(data) < HEADER_SIZE:
        raise ProtocolViolation(f"frame of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    length, version, kind, stream_id = HEADER.unpack_from(data, 0)
    if kind not in _KNOWN_KINDS or length != len(data) - 4:
        raise ProtocolViolation(f"not a request-plane frame (kind byte {kind}, length {length})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version, stream_id)
    return FrameKind(kind), stream_id, memoryview(data)[HEADER_SIZE:]


FrameHandler = Callable[[FrameKind, int, memoryview], None]
OversizeHandler = Callable[[FrameKind, int, int], None]


class FrameReader:
    """Splits a byte stream into frames, calling ``on_frame(kind, stream_id, body)``.

    ``body`` is a view into immutable bytes, valid as long as the callee keeps it. A frame
    longer than ``limit`` is skipped and reported to ``on_oversize`` (its stream fails, the
    connection lives on). Anything that is not a frame raises ``ProtocolViolation``.
    """

    def __init__(self, on_frame: FrameHandler, on_oversize: OversizeHandler, limit: int = MAX_MESSAGE_BYTES):
        self._on_frame = on_frame
        self._on_oversize = on_oversize
        self._limit = limit
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._need = 0  # bytes the pending tail needs before it holds a whole frame
        self._skip = 0  # bytes of an oversized frame still to drop

    def feed(self, data: bytes) -> None:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        if self._pending:
            self._pending.append(data)
            self._pending_len += len(data)
            if self._pending_len < self._need:
                return
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        view = memoryview(data)
        end = len(data)
        off = 0
        limit = self._limit
        on_frame = self._on_frame
        unpack = HEADER.unpack_from
        while end - off >= HEADER_SIZE:
            length, version, kind, stream_id = unpack(data, off)
            if version != PROTOCOL_VERSION or kind not in _KNOWN_KINDS or length < HEADER_SIZE - 4:
                if kind not in _KNOWN_KINDS or length < HEADER_SIZE - 4:
                    raise ProtocolViolation(f"not a request-plane frame (kind byte {kind}, length {length})")
                raise VersionMismatch(version, stream_id)
            body_len = length - (HEADER_SIZE - 4)
            if body_len > limit:
                self._on_oversize(FrameKind(kind), stream_id, body_len)
                available = end - off - HEADER_SIZE
                if available >= body_len:
                    off += HEADER_SIZE + body_len
                    continue
                self._skip = body_len - available
                return
            frame_end = off + 4 + length
            if frame_end > end:
                break
            # ``kind`` stays a plain int here: building an IntEnum per frame costs more than the rest.
            on_frame(kind, stream_id, view[off + HEADER_SIZE : frame_end])  # type: ignore[arg-type]
            off = frame_end
        if off < end:
            tail = data[off:]
            self._pending = [tail]
            self._pending_len = len(tail)
            if len(tail) >= HEADER_SIZE:
                (length,) = _LEN.unpack_from(tail, 0)
                self._need = 4 + length
            else:
                self._need = HEADER_SIZE
