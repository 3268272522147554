"""The frontend's own HTTP/1.1 server, spoken to over raw sockets and httpx: framing, keep-alive,
pipelining, 100-continue, errors, HEAD, TLS and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from armature.frontend.http_server import HttpServer, tls_context
from integration.frontend.stack import MODEL, ServedStack

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def _addr(stack: ServedStack) -> tuple[str, int]:
    host, port = stack.base_url.removeprefix("http://").split(":")
    return host, int(port)


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    """One response: status line, headers, and the body (Content-Length or chunked, de-chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), 30)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        body = b""
    return lines[0].encode(), headers, body


def _chat_request(max_tokens: int, extra_headers: str = "") -> bytes:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
         "ignore_eos": True, "stream": True}
    ).encode()  # fmt: skip
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra_headers + "\r\n").encode() + body


async def test_stream_is_chunked_one_token_per_event_and_the_connection_is_reused(stack: ServedStack) -> None:
    reader, writer = await asyncio.open_connection(*_addr(stack))
    try:
        writer.write(_chat_request(max_tokens=5))
        status, headers, body = await _read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert headers["content-type"].startswith("text/event-stream")
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        # The role chunk (empty content), then one event per generated token, the last with the finish reason.
        assert contents[0] == ""
        assert len(contents) - 1 == 5
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # Pipelined: two requests in one write are answered in order on the same connection.
        writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await _read_response(reader)
        second = await _read_response(reader)
        assert json.loads(first[2]) == {"status": "live"}
        assert [m["id"] for m in json.loads(second[2])["data"]] == [MODEL]
    finally:
        writer.close()


async def test_connection_close_is_honoured(stack: ServedStack) -> None:
    reader, writer = await asyncio.open_connection(*_addr(stack))
    try:
        writer.write(_chat_request(max_tokens=2, extra_headers="Connection: close\r\n"))
        status, headers, body = await _read_response(reader)
        assert status == b"HTTP/1.1 200 OK" and headers["connection"] == "close"
        assert body.endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server hung up
    finally:
        writer.close()


async def test_expect_100_continue_then_the_answer(stack: ServedStack) -> None:
    reader, writer = await asyncio.open_connection(*_addr(stack))
    try:
        req = _chat_request(max_tokens=2, extra_headers="Expect: 100-continue\r\n")
        head, _, body = req.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(body)
        status, _, sse = await _read_response(reader)
        assert status == b"HTTP/1.1 200 OK" and sse.endswith(b"data: [DONE]\n\n")
    finally:
        writer.close()


async def test_unknown_route_wrong_method_head_and_garbage(stack: ServedStack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        r = await http.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
        r = await http.get(CHAT)
        assert r.status_code == 405 and "POST" in r.headers["allow"]
        assert r.json()["error"]["message"] == "Method Not Allowed"
        r = await http.head("/health")
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
        r = await http.get("/health?verbose=1")  # the query string does not change the route
        assert r.status_code == 200
    reader, writer = await asyncio.open_connection(*_addr(stack))
    try:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status.startswith(b"HTTP/1.1 400") and headers["connection"] == "close"
    finally:
        writer.close()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_serves_streams(stack: ServedStack, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = HttpServer(stack.frontend, "127.0.0.1", 0, ssl_context=tls_context(str(cert), str(key)))
    await server.start()
    task = asyncio.ensure_future(server.serve(install_signal_handlers=False))
    try:
        url = f"https://127.0.0.1:{server.bound_port}"
        async with httpx.AsyncClient(base_url=url, verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as http:
            assert (await http.get("/health")).status_code == 200
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            async with http.stream("POST", CHAT, json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) == 1 + 3 + 1
    finally:
        server.request_stop()
        await asyncio.wait_for(task, 10)


async def test_graceful_shutdown_finishes_running_streams_and_refuses_new_connections(stack: ServedStack) -> None:
    server = HttpServer(stack.frontend, "127.0.0.1", 0, graceful_timeout_s=30)
    await server.start()
    task = asyncio.ensure_future(server.serve(install_signal_handlers=False))
    port = server.bound_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_chat_request(max_tokens=40))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # the stream has started
        assert head.startswith(b"HTTP/1.1 200")
        server.request_stop()
        await asyncio.sleep(0.05)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        rest = await asyncio.wait_for(reader.read(), 30)  # all of it, then the server closes
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        await asyncio.wait_for(task, 10)
    finally:
        writer.close()


async def test_a_reader_that_falls_behind_still_gets_the_whole_stream_in_order(stack: ServedStack) -> None:
    """The server's writes back up behind a reader that stops for a while: the stream pauses
    (asyncio's pause_writing) and resumes, and every event still arrives once, in order."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:
        whole = (await http.post(CHAT, json=body)).json()["choices"][0]["message"]["content"]
    assert stack.http is not None
    before = set(stack.http.connections)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    client.connect(_addr(stack))
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(200):
            if set(stack.http.connections) - before:
                break
            await asyncio.sleep(0.01)
        (conn,) = set(stack.http.connections) - before
        assert conn.transport is not None
        # Small buffers on the server's side of this connection, so a few events fill them.
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn.transport.set_write_buffer_limits(high=2048)
        payload = json.dumps({**body, "stream": True}).encode()
        client.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)  # fmt: skip
        paused = False
        for _ in range(300):  # nothing reads the socket: the server's side fills up
            await asyncio.sleep(0.01)
            paused = paused or conn.paused
        assert paused, "the connection never backed up"
        client.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=client)
        status, _, raw = await _read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        events = [e for e in raw.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == whole
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        if writer is not None:
            writer.close()
        else:
            client.close()


async def test_events_that_come_faster_than_the_write_interval_ride_together(stack: ServedStack) -> None:
    """One token per event always; how many socket writes carry them is the server's pacing. With
    an interval longer than the whole stream, the first event goes at once and the rest in one
    write with [DONE]."""
    assert stack.http is not None
    saved = stack.http.stream_write_interval_s
    stack.http.stream_write_interval_s = 30.0
    client = socket.create_connection(_addr(stack))
    try:
        client.sendall(_chat_request(max_tokens=40, extra_headers="Connection: close\r\n"))
        client.settimeout(20)
        reads: list[bytes] = []
        while chunk := await asyncio.to_thread(client.recv, 1 << 20):
            reads.append(chunk)
        raw = b"".join(reads)
        assert raw.endswith(b"0\r\n\r\n")
        assert len(reads) <= 4, f"{len(reads)} separate arrivals: the events were not paced"
        body = raw.split(b"\r\n\r\n", 1)[1]
        events = [e for e in body.decode().split("\n\n") if e.strip()]
        contents = [json.loads(e[e.index("data: ") + 6 :])["choices"][0]["delta"].get("content")
                    for e in events if "[DONE]" not in e and '"choices":[{' in e]  # fmt: skip
        assert len(contents) == 1 + 40  # the role chunk, then one event per token
    finally:
        stack.http.stream_write_interval_s = saved
        client.close()
