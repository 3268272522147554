"""The least any frontend + worker can take over the simulated engine: a floor for serve_vs_dynamo.

A serving system on the mocker answers a streaming chat request in (client and kernel) +
(frontend work) + (hops to and from the worker) + (the simulated engine's time) + (worker work).
This module is a system that does none of the work: an HTTP server that reads the request without
parsing its JSON, and either runs the simulated engine itself (``one-process``) or forwards a
4-byte frame over one persistent loopback TCP connection to a worker process that runs it and
answers with 4-byte token frames (``two-process``: Armature's and Dynamo's topology). Chunks are
pre-built bytes. The engine is the mocker's clock and nothing else: continuous batching priced
by the same timing model, slept on a timerfd to the microsecond.

It shares what a real system cannot avoid: the client, a connection per request, the event
loop's wake-ups, loopback TCP, the hops between processes, the simulated time, and the two cores.
Its TTFT and req/s bound what any frontend + worker pair can reach on this machine.

    python benchmarks/serving_floor.py frontend --port P [--worker-port W] --prompt-tokens N
    python benchmarks/serving_floor.py worker --port W --prompt-tokens N

``serve_vs_dynamo.py --floor`` starts both variants beside the systems it compares.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from armature.mocker.deadline import DeadlineTimer  # noqa: E402
from armature.mocker.timing import PolynomialTiming  # noqa: E402

_FOLLOW_ON_S = 0.002  # as Armature's mocker: a step starting this late still follows on

TOKENS = 32
_REQ = struct.Struct("<I")  # stream id
_TOK = struct.Struct("<HH")  # stream id (low 16 bits), token index


def _chunk(model: str, i: int) -> bytes:
    body = (
        b'{"id":"chatcmpl-floor","object":"chat.completion.chunk","created":0,"model":"'
        + model.encode()
        + b'","choices":[{"index":0,"delta":{"content":" tok'
        + str(i).encode()
        + b'"},"finish_reason":'
        + (b'"length"' if i == TOKENS - 1 else b"null")
        + b"}]}"
    )
    event = b"data: " + body + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


class _Stream:
    __slots__ = ("emit", "sent")

    def __init__(self, emit: Callable[[int], None]) -> None:
        self.emit = emit  # called with the index of each token as the engine produces it
        self.sent = 0


class BatchEngine:
    """The simulated engine with nothing but its clock: continuous batching on the mocker's model.

    Each step prefills every request that arrived since the last one and decodes every running
    one; it lasts the timing model's ``prefill_ms(new tokens) + decode_ms(KV load)`` divided by
    the speedup, and follows on from the previous step's end when the engine stayed busy, never
    starting before its newest request arrived (as Armature's mocker does). A request's first token comes out of its prefill step. No pages, no
    scheduler, no sampling: only the time.
    """

    def __init__(self, prompt_tokens: int, speedup: float, block_size: int = 64, total_blocks: int = 16384) -> None:
        self.timing = PolynomialTiming()
        self.prompt_tokens = prompt_tokens
        self.speedup = speedup
        self.block_size = block_size
        self.total_blocks = total_blocks
        self.waiting: list[_Stream] = []
        self.running: list[_Stream] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.not_before = 0.0  # when the newest request arrived: no forward starts before it

    def submit(self, emit: Callable[[int], None]) -> None:
        self.waiting.append(_Stream(emit))
        self.not_before = time.perf_counter()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def _blocks(self, req: _Stream) -> int:
        return -(-(self.prompt_tokens + req.sent) // self.block_size)

    async def _loop(self) -> None:
        timer = DeadlineTimer.create(asyncio.get_running_loop())
        deadline = 0.0
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            new, self.waiting = self.waiting, []
            batch = self.running + new
            load = sum(self._blocks(r) for r in batch) / self.total_blocks
            ms = self.timing.step_ms(len(new) * self.prompt_tokens, bool(self.running), load)
            now = time.perf_counter()
            start = max(deadline, self.not_before) if now - deadline <= _FOLLOW_ON_S else now
            deadline = start + ms / 1e3 / self.speedup
            if timer is not None:
                await timer.sleep_until(deadline)
            else:
                await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
            running = []
            for req in batch:
                req.emit(req.sent)
                req.sent += 1
                if req.sent < TOKENS:
                    running.append(req)
            self.running = running


class FloorHttp(asyncio.Protocol):
    def __init__(self, server: FloorFrontend) -> None:
        self.s = server
        self.buf = bytearray()
        self.t: asyncio.Transport | None = None
        self.sid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        if len(self.buf) < end + 4 + length:
            return
        assert self.t is not None
        if head.startswith(b"get /v1/models"):
            body = b'{"object":"list","data":[{"id":"%s","object":"model"}]}' % self.s.model.encode()
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
            self.t.close()
            return
        self.t.write(self.s.head)
        self.s.start(self)

    def emit(self, i: int) -> None:
        if self.t is None or self.t.is_closing():
            return
        if i == TOKENS - 1:
            self.t.write(self.s.chunks[i] + self.s.tail)
            self.t.close()
        else:
            self.t.write(self.s.chunks[i])

    def connection_lost(self, exc: Exception | None) -> None:
        self.t = None


class FloorFrontend:
    def __init__(self, model: str, engine: BatchEngine | None, worker_port: int | None) -> None:
        self.model = model
        self.head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")  # fmt: skip
        self.chunks = [_chunk(model, i) for i in range(TOKENS)]
        self.tail = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        self.engine = engine
        self.worker_port = worker_port
        self.streams: dict[int, FloorHttp] = {}
        self.next_sid = 0
        self.wt: asyncio.Transport | None = None
        self.wbuf = bytearray()

    def start(self, conn: FloorHttp) -> None:
        if self.engine is not None:
            self.engine.submit(conn.emit)
            return
        self.next_sid = (self.next_sid + 1) & 0xFFFF
        conn.sid = self.next_sid
        self.streams[conn.sid] = conn
        assert self.wt is not None
        self.wt.write(_REQ.pack(conn.sid))

    def from_worker(self, data: bytes) -> None:
        self.wbuf += data
        n = len(self.wbuf) // _TOK.size * _TOK.size
        for sid, i in _TOK.iter_unpack(bytes(self.wbuf[:n])):
            conn = self.streams.get(sid)
            if conn is not None:
                conn.emit(i)
                if i == TOKENS - 1:
                    del self.streams[sid]
        del self.wbuf[:n]


class _WorkerLink(asyncio.Protocol):
    def __init__(self, fe: FloorFrontend) -> None:
        self.fe = fe

    def data_received(self, data: bytes) -> None:
        self.fe.from_worker(data)


class FloorWorker(asyncio.Protocol):
    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.buf = bytearray()
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = len(self.buf) // _REQ.size * _REQ.size
        for (sid,) in _REQ.iter_unpack(bytes(self.buf[:n])):
            self.engine.submit(lambda i, sid=sid: self._send(sid, i))
        del self.buf[:n]

    def _send(self, sid: int, i: int) -> None:
        if self.t is not None and not self.t.is_closing():
            self.t.write(_TOK.pack(sid, i))


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    engine = BatchEngine(args.prompt_tokens, args.speedup)
    if args.role == "worker":
        server = await loop.create_server(lambda: FloorWorker(engine), "127.0.0.1", args.port)
    else:
        fe = FloorFrontend(args.model, None if args.worker_port else engine, args.worker_port)
        if args.worker_port:
            for _ in range(200):  # the worker may still be starting
                try:
                    fe.wt, _ = await loop.create_connection(lambda: _WorkerLink(fe), "127.0.0.1", args.worker_port)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            else:
                raise SystemExit(f"no floor worker on port {args.worker_port}")
        server = await loop.create_server(lambda: FloorHttp(fe), "127.0.0.1", args.port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["frontend", "worker"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--worker-port", type=int, default=0, help="frontend: forward to this worker (two processes)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--prompt-tokens", type=int, required=True, help="prompt length the simulated prefill is priced on")
    p.add_argument("--speedup", type=float, default=10.0, help="the mocker's --speedup-ratio")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
