"""A small HTTP/1.1 + SSE client on asyncio streams, cheap enough to share cores with the server.

One streaming OpenAI request per call: the response is de-chunked, split into SSE events and
each event decoded with msgspec; arrival times are stamped as bytes come in. Connections are
kept alive in a small pool, or opened per request (``new_connection``), which is what most
latency-sensitive comparisons want (see docs/bench.md). Only ``http://`` URLs; TLS goes through
``ssl`` when the URL says ``https://``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: msgspec.Raw | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode

REJECTION_STATUSES = frozenset({429, 503})


@dataclass(slots=True)
class RequestResult:
    """What one request did, as the client saw it."""

    ok: bool
    start_s: float  # perf_counter at send
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # usage.completion_tokens when reported, else content chunks
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def rejected(self) -> bool:
        return not self.ok and self.status in REJECTION_STATUSES


@dataclass(frozen=True, slots=True)
class Target:
    scheme: str
    host: str
    port: int
    base_path: str  # "/v1" of http://host:port/v1 (no trailing slash)

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url {url!r} must be an http:// or https:// URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = parts.path.rstrip("/")
        if not path.endswith("/v1"):
            path = f"{path}/v1"
        return cls(parts.scheme, parts.hostname, port, path)


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpError(Exception):
    pass


class StreamingClient:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        new_connection: bool = False,
        timeout_s: float = 600.0,
    ) -> None:
        self.target = Target.parse(url)
        self.api_key = api_key
        self.new_connection = new_connection
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._ssl = ssl.create_default_context() if self.target.scheme == "https" else None

    async def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()

    async def _connect(self) -> _Conn:
        if not self.new_connection:
            while self._idle:
                c = self._idle.pop()
                if not c.writer.is_closing() and not c.reader.at_eof():
                    return c
                c.close()
        r, w = await asyncio.open_connection(self.target.host, self.target.port, ssl=self._ssl, limit=2**22)
        return _Conn(r, w)

    def _request_bytes(self, path: str, body: bytes) -> bytes:
        t = self.target
        host = t.host if t.port in (80, 443) else f"{t.host}:{t.port}"
        head = [
            f"POST {t.base_path}{path} HTTP/1.1",
            f"Host: {host}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            "Connection: close" if self.new_connection else "Connection: keep-alive",
        ]
        if self.api_key:
            head.append(f"Authorization: Bearer {self.api_key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def get(self, path: str) -> tuple[int, bytes]:
        """A plain GET (``/models``), on its own connection."""
        t = self.target
        r, w = await asyncio.open_connection(t.host, t.port, ssl=self._ssl)
        try:
            w.write(f"GET {t.base_path}{path} HTTP/1.1\r\nHost: {t.host}\r\nConnection: close\r\n\r\n".encode())
            status, headers = await _read_head(r)
            body = await _read_body(r, headers)
            return status, body
        finally:
            w.close()

    async def stream(self, path: str, payload: dict[str, object], keep_text: bool = False) -> RequestResult:
        """POST ``payload`` (``stream`` true) and follow its SSE stream to the end."""
        started = time.perf_counter()
        result = RequestResult(ok=False, start_s=started)
        try:
            await asyncio.wait_for(self._stream(path, _encode(payload), result, keep_text), self.timeout_s)
        except TimeoutError:
            result.error = f"timed out after {self.timeout_s} s"
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        if result.e2e_s == 0.0:
            result.e2e_s = time.perf_counter() - started
        return result

    async def _stream(self, path: str, body: bytes, result: RequestResult, keep_text: bool) -> None:
        conn = await self._connect()
        reusable = False
        try:
            conn.writer.write(self._request_bytes(path, body))
            status, headers = await _read_head(conn.reader)
            result.status = status
            if status != 200:
                raw = await _read_body(conn.reader, headers)
                result.error = f"HTTP {status}: {raw[:300].decode(errors='replace')}"
                reusable = headers.get("connection") != "close" and not self.new_connection
                return
            reusable = await self._read_events(conn.reader, headers, result, keep_text)
            reusable = reusable and headers.get("connection") != "close" and not self.new_connection
        finally:
            if reusable:
                self._idle.append(conn)
            else:
                conn.close()

    async def _read_events(
        self, reader: asyncio.StreamReader, headers: dict[str, str], result: RequestResult, keep_text: bool
    ) -> bool:
        """Consume the SSE body; True when the connection can be reused."""
        chunked = "chunked" in headers.get("transfer-encoding", "")
        length = int(headers["content-length"]) if "content-length" in headers else None
        buf = b""
        last: float | None = None
        chunks = 0
        texts: list[str] = []
        done = False
        while True:
            if chunked:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                data = data[:-2]
            elif length is not None:
                if length <= 0:
                    break
                data = await reader.read(min(length, 65536))
                if not data:
                    raise HttpError("connection closed mid-body")
                length -= len(data)
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            buf += data
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                event, buf = buf[:end], buf[end + 2 :]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    chunk = _decode_chunk(payload)
                    if chunk.error is not None:
                        result.error = f"in-band error: {bytes(chunk.error)[:300].decode(errors='replace')}"
                        continue
                    for ch in chunk.choices:
                        piece = ch.text if ch.delta is None else (ch.delta.content or ch.delta.reasoning_content)
                        if piece:
                            chunks += 1
                            if last is None:
                                result.ttft_s = now - result.start_s
                            else:
                                result.itls_s.append(now - last)
                            last = now
                            if keep_text:
                                texts.append(piece)
                        if ch.finish_reason is not None:
                            result.finish_reason = ch.finish_reason
                    if chunk.usage is not None:
                        u = chunk.usage
                        result.prompt_tokens = u.prompt_tokens
                        result.output_tokens = u.completion_tokens
                        if u.prompt_tokens_details is not None:
                            result.cached_tokens = u.prompt_tokens_details.cached_tokens
        result.e2e_s = time.perf_counter() - result.start_s
        if not result.output_tokens:
            result.output_tokens = chunks
        result.text = "".join(texts)
        if result.error is None:
            if result.finish_reason is None and not done:
                result.error = "the stream ended without a finish reason"
            else:
                result.ok = True
        return chunked or length is not None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"not an HTTP response: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower() if k.strip().lower() != "content-type" else v.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if "chunked" in headers.get("transfer-encoding", ""):
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return out
            out += (await reader.readexactly(size + 2))[:-2]
    return await reader.read()
