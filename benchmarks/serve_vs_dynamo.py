"""End-to-end serving: Armature's frontend + mocker worker vs NVIDIA Dynamo 1.6.1's, same run, same load.

Each system runs as two processes (an OpenAI frontend and a mocker worker found through file
discovery, TCP request plane, ZMQ event plane, loopback only). One load generator drives both:
streaming chat completions, ``max_tokens`` 32, a NEW TCP connection per request
(``Connection: close``), at concurrency 1, 16 and 64, ``--requests`` requests per level. Both
mockers run at ``--speedup-ratio 10`` and send one token per SSE chunk.

The client is a raw asyncio ``Protocol`` (no HTTP library): it de-chunks the response, splits SSE
events and decodes each one with msgspec, stamping the arrival time in ``data_received``. It
shares the machine's cores with the systems under test, so it is kept cheap, and it is the same
client for both. The two systems are measured alternately (per level and round) so that a change
in the machine's background load hits both.

Measured per system and level: req/s (requests / wall time of the level), TTFT (request start,
connect included, to the first non-empty content chunk; mean and p50/p99), ITL (gaps between
content chunks; mean, p99), tokens per request. Prints a table and writes JSON to
benchmarks/results/serve_vs_dynamo.json.

    .venv/bin/python benchmarks/serve_vs_dynamo.py                        # builds nothing; needs
    /work/shared/anchors/dynamo-venv.sh /work/dynamo-venv                  # ... Dynamo's venv first
    .venv/bin/python benchmarks/serve_vs_dynamo.py --concurrency 1,16,64 --requests 200 --rounds 3
    .venv/bin/python benchmarks/serve_vs_dynamo.py --systems armature    # Armature alone
    .venv/bin/python benchmarks/serve_vs_dynamo.py --rounds 3 --floor     # and the do-nothing floor

``--floor`` adds ``serving_floor.py`` in one process and in two: a frontend and worker that do no
work on the same simulated engine, the bound any implementation meets on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL_NAME = "smollm2-mock"
PROMPT = "Write a short poem about the sea, the wind and a small boat far from home."


# --- the load generator -------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


_chunk_decoder = msgspec.json.Decoder(_Chunk)


@dataclass
class RequestTiming:
    ok: bool
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None


class SseClient(asyncio.Protocol):
    """One streaming request on its own connection; ``done`` resolves to its ``RequestTiming``."""

    def __init__(self, request: bytes, started: float, done: asyncio.Future[RequestTiming]) -> None:
        self._request = request
        self._started = started
        self._done = done
        self._buf = bytearray()
        self._headers_done = False
        self._chunk_left = -1  # -1: expecting a chunk-size line
        self._body = bytearray()
        self._transport: asyncio.Transport | None = None
        self._first: float | None = None
        self._last: float | None = None
        self._itls: list[float] = []
        self._tokens = 0
        self._finish: str | None = None
        self._last_event = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment] # uvloop's is not an asyncio.Transport subclass
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self._buf
        buf += data
        if not self._headers_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
                self._fail(f"HTTP status line {head.splitlines()[0]!r}: {bytes(buf[:300])!r}")
                return
            if b"transfer-encoding: chunked" not in head:
                self._fail("expected a chunked streaming response")
                return
            self._headers_done = True
        # De-chunk into _body, then split SSE events off _body (the last events and the final
        # zero-size chunk often arrive in one read).
        ended = False
        while True:
            if self._chunk_left < 0:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    ended = True
                    break
                self._chunk_left = size
            if len(buf) < self._chunk_left + 2:
                break
            self._body += buf[: self._chunk_left]
            del buf[: self._chunk_left + 2]
            self._chunk_left = -1
        body = self._body
        while True:
            end = body.find(b"\n\n")
            if end < 0:
                if ended:
                    self._finish_request(now)
                return
            event = bytes(body[:end])
            del body[: end + 2]
            if not event.startswith(b"data: "):
                continue
            payload = event[6:]
            self._last_event = payload
            if payload == b"[DONE]":
                self._finish_request(now)
                return
            try:
                chunk = _chunk_decoder.decode(payload)
            except msgspec.DecodeError:
                self._fail(f"not a chat chunk: {payload[:300]!r}")
                return
            for choice in chunk.choices:
                if choice.finish_reason is not None:
                    self._finish = choice.finish_reason
                if choice.delta is not None and choice.delta.content:
                    self._tokens += 1
                    if self._first is None:
                        self._first = now
                    elif self._last is not None:
                        self._itls.append(now - self._last)
                    self._last = now

    def _finish_request(self, now: float) -> None:
        if self._done.done():
            return
        if self._first is None:
            self._fail(f"the stream ended without any content; last event {self._last_event[:200]!r}")
            return
        self._done.set_result(
            RequestTiming(True, self._first - self._started, self._itls, self._tokens, now - self._started, self._finish)
        )
        if self._transport is not None:
            self._transport.close()

    def _fail(self, why: str) -> None:
        if not self._done.done():
            self._done.set_result(RequestTiming(False, error=why))
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._fail(f"connection lost before [DONE]: {exc}")


def chat_request(host: str, port: int, model: str, max_tokens: int) -> bytes:
    body = msgspec.json.encode(
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": True,
            "max_tokens": max_tokens,
        }
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def one_request(host: str, port: int, request: bytes, timeout_s: float) -> RequestTiming:
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    done: asyncio.Future[RequestTiming] = loop.create_future()
    try:
        transport, _ = await loop.create_connection(lambda: SseClient(request, started, done), host, port)
    except OSError as exc:
        return RequestTiming(False, error=f"connect: {exc}")
    try:
        return await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        return RequestTiming(False, error=f"no [DONE] within {timeout_s} s")
    finally:
        transport.close()


@dataclass
class LevelResult:
    system: str
    concurrency: int
    round: int
    requests: int
    ok: int
    wall_s: float
    req_per_s: float
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_mean_ms: float
    itl_p99_ms: float
    tokens_per_request: float
    finish_reasons: dict[str, int]
    errors: list[str]
    # CPU milliseconds per completed request, per process of the system and for the load generator.
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run_level(
    system: System, model: str, concurrency: int, n: int, max_tokens: int, rnd: int
) -> LevelResult:
    host, port = "127.0.0.1", system.port
    request = chat_request(host, port, model, max_tokens)
    cpu0, client0 = system.cpu_s(), time.process_time()
    next_index = 0
    results: list[RequestTiming] = []

    async def user() -> None:
        nonlocal next_index
        while next_index < n:
            next_index += 1
            results.append(await one_request(host, port, request, 60.0))

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu1, client1 = system.cpu_s(), time.process_time()
    good = [r for r in results if r.ok]
    per = max(1, len(good))
    cpu = {role: (cpu1[role] - cpu0[role]) * 1e3 / per for role in cpu0}
    cpu["client"] = (client1 - client0) * 1e3 / per
    ttfts = [r.ttft_s * 1e3 for r in good]
    itls = [x * 1e3 for r in good for x in r.itls_s]
    finishes: dict[str, int] = {}
    for r in good:
        finishes[str(r.finish_reason)] = finishes.get(str(r.finish_reason), 0) + 1
    errors = sorted({r.error or "" for r in results if not r.ok})
    return LevelResult(
        system=system.name,
        concurrency=concurrency,
        round=rnd,
        requests=n,
        ok=len(good),
        wall_s=wall,
        req_per_s=len(good) / wall,
        ttft_mean_ms=statistics.fmean(ttfts) if ttfts else float("nan"),
        ttft_p50_ms=_pct(ttfts, 0.5),
        ttft_p99_ms=_pct(ttfts, 0.99),
        itl_mean_ms=statistics.fmean(itls) if itls else float("nan"),
        itl_p99_ms=_pct(itls, 0.99),
        tokens_per_request=statistics.fmean([r.tokens for r in good]) if good else 0.0,
        finish_reasons=finishes,
        errors=errors[:5],
        cpu_ms_per_request=cpu,
    )


# --- the systems under test ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class System:
    """A frontend process and a mocker process, started and stopped together."""

    def __init__(self, name: str, frontend: list[str], mocker: list[str], env: dict[str, str], port: int, logdir: Path):
        self.name = name
        self.port = port
        self._cmds = {"frontend": frontend, "mocker": mocker} if mocker else {"frontend": frontend}
        self._env = env
        self._logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for role, cmd in self._cmds.items():
            log = (self._logdir / f"{self.name}-{role}.log").open("wb")
            self.procs[role] = subprocess.Popen(cmd, env=self._env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def pids(self) -> dict[str, int]:
        return {role: p.pid for role, p in self.procs.items()}

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system, all threads) each process has used so far."""
        return {role: process_cpu_s(p.pid) for role, p in self.procs.items()}

    async def wait_ready(self, model: str, timeout_s: float) -> float:
        """Seconds until ``/v1/models`` lists the model."""
        started = time.perf_counter()
        deadline = started + timeout_s
        while time.perf_counter() < deadline:
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.name} {role} exited with {p.returncode}; see {self._logdir}")
            with contextlib.suppress(OSError, ValueError):
                if model in await http_get("127.0.0.1", self.port, "/v1/models"):
                    return time.perf_counter() - started
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.name} did not serve {model} within {timeout_s} s; see {self._logdir}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def process_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and of the processes it started (``--http-processes``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    # utime and stime are fields 14 and 15 of stat(5); the split starts at field 3.
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children.update(int(c) for c in (task / "children").read_text().split())
    return own + sum(process_cpu_s(c) for c in children)


async def http_get(host: str, port: int, path: str) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return (await asyncio.wait_for(reader.read(), 2.0)).decode(errors="replace")
    finally:
        writer.close()


def loopback_env(kv_var: str, kv_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "ARMATURE_"))}
    env.update(
        {
            kv_var: str(kv_dir),
            "HF_HUB_OFFLINE": "1",
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1",
            "DYN_SYSTEM_HOST": "127.0.0.1",
            "DYN_LOG": "warn",
        }
    )
    return env


def armature_system(
    model_dir: Path, speedup: float, tmp: Path, python: str, src: Path, name: str = "armature", http_processes: int = 1
) -> System:
    port = free_port()
    kv = tmp / f"{name}-kv"
    kv.mkdir()
    plane = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    frontend = [python, "-m", "armature.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                "--log-level", "warning", "--http-processes", str(http_processes), *plane]  # fmt: skip
    mocker = [python, "-m", "armature.mocker", "--model-path", str(model_dir), "--model-name", MODEL_NAME,
              "--speedup-ratio", str(speedup), "--log-level", "warning", *plane]  # fmt: skip
    env = loopback_env("ARMATURE_FILE_KV", kv)
    env["PYTHONPATH"] = str(src)
    return System(name, frontend, mocker, env, port, tmp)


def dynamo_system(venv: Path, model_dir: Path, speedup: float, tmp: Path) -> System:
    port = free_port()
    kv = tmp / "dynamo-kv"
    kv.mkdir()
    python = str(venv / "bin" / "python")
    plane = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    frontend = [python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port), *plane]
    mocker = [python, "-m", "dynamo.mocker", "--model-path", str(model_dir), "--model-name", MODEL_NAME,
              "--speedup-ratio", str(speedup), *plane]  # fmt: skip
    return System("dynamo", frontend, mocker, loopback_env("DYN_FILE_KV", kv), port, tmp)


def floor_systems(python: str, tmp: Path, prompt_tokens: int, speedup: float) -> list[System]:
    """``serving_floor.py`` in one process and in two (frontend + worker over loopback TCP)."""
    script = str(Path(__file__).resolve().parent / "serving_floor.py")
    timing = ["--model", MODEL_NAME, "--prompt-tokens", str(prompt_tokens), "--speedup", str(speedup)]
    env = dict(os.environ)
    one_port, two_port, worker_port = free_port(), free_port(), free_port()
    one = System("floor-1p", [python, script, "frontend", "--port", str(one_port), *timing], [], env, one_port, tmp)
    two = System(
        "floor-2p",
        [python, script, "frontend", "--port", str(two_port), "--worker-port", str(worker_port), *timing],
        [python, script, "worker", "--port", str(worker_port), *timing],
        env,
        two_port,
        tmp,
    )
    return [one, two]


async def prompt_token_ids(model_dir: Path, max_tokens: int) -> list[int]:
    """The benchmark's chat prompt through the frontend's own template and tokenizer."""
    from armature.frontend.openai import chat_request_decoder
    from armature.frontend.preprocess import Preprocessor
    from armature.frontend.tokenizer import ModelTokenizer
    from armature.protocols.model_card import ModelCard

    tok = ModelTokenizer.from_dir(model_dir)
    card = ModelCard(name=MODEL_NAME, model_types=[], tokenizer_path=str(model_dir), context_length=8192,
                     kv_cache_block_size=64)  # fmt: skip
    body = chat_request("127.0.0.1", 0, MODEL_NAME, max_tokens).split(b"\r\n\r\n", 1)[1]
    return list((await Preprocessor(card, tok).chat(chat_request_decoder.decode(body))).choices[0].prompt.token_ids)


# --- reporting ----------------------------------------------------------------------------------


def summarize(results: list[LevelResult], systems: list[str], levels: list[int]) -> dict[int, dict[str, dict[str, float]]]:
    """Per level and system: the median over rounds of req/s, TTFT and ITL."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for c in levels:
        out[c] = {}
        for s in systems:
            rs = [r for r in results if r.system == s and r.concurrency == c]
            if not rs:
                continue
            out[c][s] = {
                "req_per_s": statistics.median(r.req_per_s for r in rs),
                "ttft_mean_ms": statistics.median(r.ttft_mean_ms for r in rs),
                "ttft_p99_ms": statistics.median(r.ttft_p99_ms for r in rs),
                "itl_mean_ms": statistics.median(r.itl_mean_ms for r in rs),
                "tokens_per_request": statistics.median(r.tokens_per_request for r in rs),
                **{
                    f"cpu_ms_per_request_{role}": statistics.median(r.cpu_ms_per_request[role] for r in rs)
                    for role in rs[0].cpu_ms_per_request
                },
                "ok": min(r.ok for r in rs),
                "requests": rs[0].requests,
            }
    return out


def print_table(summary: dict[int, dict[str, dict[str, float]]]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    print(
        f"\n{'conc':>4} {'system':<9} {'ok':>7} {'req/s':>8} {'TTFT ms':>8} {'p99':>7} {'ITL ms':>7} {'tok/req':>7}"
        f" {'CPU ms/req: frontend':>20} {'worker':>6} {'client':>6}"
    )
    for c, per in summary.items():
        for s, m in per.items():
            print(
                f"{c:>4} {s:<9} {int(m['ok']):>3}/{int(m['requests']):<3} {m['req_per_s']:>8.1f} "
                f"{m['ttft_mean_ms']:>8.2f} {m['ttft_p99_ms']:>7.2f} {m['itl_mean_ms']:>7.2f} {m['tokens_per_request']:>7.1f}"
                f" {m['cpu_ms_per_request_frontend']:>20.2f} {m.get('cpu_ms_per_request_mocker', 0.0):>6.2f}"
                f" {m['cpu_ms_per_request_client']:>6.2f}"
            )
        if "armature" in per and "dynamo" in per:
            rr = per["armature"]["req_per_s"] / per["dynamo"]["req_per_s"]
            tr = per["armature"]["ttft_mean_ms"] / per["dynamo"]["ttft_mean_ms"]
            ratios[f"req_per_s_ratio_c{c}"] = rr
            ratios[f"ttft_ratio_c{c}"] = tr
            print(f"{c:>4} {'ratio':<9} {'':>7} {rr:>7.2f}x {tr:>7.2f}x")
        for floor in ("floor-1p", "floor-2p"):
            if floor in per and "dynamo" in per:
                rr = per[floor]["req_per_s"] / per["dynamo"]["req_per_s"]
                tr = per[floor]["ttft_mean_ms"] / per["dynamo"]["ttft_mean_ms"]
                key = floor.replace("-", "_")
                ratios[f"req_per_s_ratio_{key}_c{c}"] = rr
                ratios[f"ttft_ratio_{key}_c{c}"] = tr
                print(f"{c:>4} {floor + '/dyn':<9} {'':>7} {rr:>7.2f}x {tr:>7.2f}x")
    return ratios


def verdict(ratios: dict[str, float], levels: list[int]) -> list[str]:
    lines = []
    for c in levels:
        if c >= 16 and f"req_per_s_ratio_c{c}" in ratios:
            r = ratios[f"req_per_s_ratio_c{c}"]
            lines.append(f"req/s at concurrency {c}: {r:.2f}x Dynamo (target >= 1.2x) {'PASS' if r >= 1.2 else 'MISS'}")
    if "ttft_ratio_c1" in ratios:
        r = ratios["ttft_ratio_c1"]
        lines.append(f"TTFT at concurrency 1: {r:.2f}x Dynamo (target <= 0.8x) {'PASS' if r <= 0.8 else 'MISS'}")
    for floor, what in (("floor_1p", "one process"), ("floor_2p", "frontend + worker")):
        for c in levels:
            if c >= 16 and f"req_per_s_ratio_{floor}_c{c}" in ratios:
                r = ratios[f"req_per_s_ratio_{floor}_c{c}"]
                lines.append(f"floor ({what} doing no work): req/s at concurrency {c} {r:.2f}x Dynamo")
        if f"ttft_ratio_{floor}_c1" in ratios:
            r = ratios[f"ttft_ratio_{floor}_c1"]
            lines.append(f"floor ({what} doing no work): TTFT at concurrency 1 {r:.2f}x Dynamo")
    return lines


# --- the floor: Armature's mocker engine alone ---------------------------------------------------


async def engine_floor(model_dir: Path, speedup: float, levels: list[int], n: int, max_tokens: int) -> list[dict[str, float]]:
    """The same load straight into ``MockerEngine.generate_stream`` (no HTTP, no request plane).

    The prompt is the benchmark's chat prompt through the frontend's own template and tokenizer,
    so the simulated prefill and decode steps are the ones the end-to-end run pays. What the
    engine alone cannot beat, no frontend can.
    """
    from armature.engine.api import GenerateRequest, SamplingParams
    from armature.engine.server_args import ServerArgs
    from armature.mocker import MockerArgs, MockerEngine

    prompt = await prompt_token_ids(model_dir, max_tokens)
    engine = MockerEngine(ServerArgs(model_path=str(model_dir), skip_tokenizer_init=True), MockerArgs(speedup_ratio=speedup))
    out: list[dict[str, float]] = []
    try:
        for c in levels:
            started = 0
            ttfts: list[float] = []
            itls: list[float] = []

            async def user() -> None:
                nonlocal started
                while started < n:
                    started += 1
                    rid = f"floor-{c}-{started}"
                    t0 = time.perf_counter()
                    last: float | None = None
                    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
                    async for _ in engine.generate_stream(GenerateRequest(rid=rid, input_ids=list(prompt), sampling=params)):
                        now = time.perf_counter()
                        if last is None:
                            ttfts.append(now - t0)
                        else:
                            itls.append(now - last)
                        last = now

            t = time.perf_counter()
            await asyncio.gather(*(user() for _ in range(c)))
            wall = time.perf_counter() - t
            out.append({"concurrency": c, "req_per_s": n / wall, "ttft_mean_ms": statistics.fmean(ttfts) * 1e3,
                        "itl_mean_ms": statistics.fmean(itls) * 1e3, "prompt_tokens": len(prompt)})  # fmt: skip
    finally:
        await engine.shutdown()
    return out


# --- main ---------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> int:
    from armature.engine.loader import resolve_model_path

    model_dir = Path(args.model_path) if args.model_path else resolve_model_path(None)
    levels = [int(x) for x in args.concurrency.split(",")]
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="serve-vs-dynamo-"))
    systems: list[System] = []
    for name in names:
        if name == "armature":
            systems.append(
                armature_system(model_dir, args.speedup, tmp, args.python, Path(args.armature_src),
                                http_processes=args.http_processes)  # fmt: skip
            )
        elif name == "candidate":  # Armature from another source tree, measured beside this one
            if not args.candidate_src:
                print("--systems candidate needs --candidate-src")
                return 2
            systems.append(
                armature_system(model_dir, args.speedup, tmp, args.python, Path(args.candidate_src), "candidate",
                                args.candidate_http_processes or args.http_processes)  # fmt: skip
            )
        elif name == "dynamo":
            venv = Path(args.dynamo_venv)
            if not (venv / "bin" / "python").exists():
                print(f"no Dynamo venv at {venv}; build it with /work/shared/anchors/dynamo-venv.sh {venv}")
                return 2
            systems.append(dynamo_system(venv, model_dir, args.speedup, tmp))
        else:
            print(f"unknown system {name!r} (armature, dynamo, candidate)")
            return 2
    if args.floor:
        prompt_len = len(await prompt_token_ids(model_dir, args.max_tokens))
        systems.extend(floor_systems(args.python, tmp, prompt_len, args.speedup))
        names.extend(s.name for s in systems[-2:])
    results: list[LevelResult] = []
    load_before = os.getloadavg()
    try:
        for s in systems:
            s.start()
        for s in systems:
            ready = await s.wait_ready(MODEL_NAME, args.start_timeout)
            print(f"{s.name}: serving after {ready:.1f} s (pids {s.pids()}, port {s.port})", flush=True)
        for s in systems:  # warm-up: imports, JIT-free but lazy paths, connection pools to the worker
            await run_level(s, MODEL_NAME, 4, args.warmup, args.max_tokens, -1)
        if args.pause_for_profiler:
            print(f"warm; pids {[s.pids() for s in systems]}; waiting {args.pause_for_profiler} s", flush=True)
            await asyncio.sleep(args.pause_for_profiler)
        for rnd in range(args.rounds):
            for c in levels:
                # Alternate who goes first so a drift in background load does not favour one system.
                order = systems if (rnd + c) % 2 == 0 else list(reversed(systems))
                for s in order:
                    r = await run_level(s, MODEL_NAME, c, args.requests, args.max_tokens, rnd)
                    results.append(r)
                    print(
                        f"round {rnd} c={c:<3} {s.name:<9} {r.ok}/{r.requests} ok  {r.req_per_s:7.1f} req/s  "
                        f"TTFT {r.ttft_mean_ms:6.2f} ms  ITL {r.itl_mean_ms:5.2f} ms  {r.tokens_per_request:.1f} tok/req  "
                        f"CPU ms/req " + " ".join(f"{k} {v:.2f}" for k, v in r.cpu_ms_per_request.items())
                        + (f"  errors: {r.errors}" if r.errors else ""),
                        flush=True,
                    )
    finally:
        for s in systems:
            s.stop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    floor: list[dict[str, float]] = []
    if args.engine_floor:
        # Its own process: torch and the engine's thread stay out of the load generator.
        cmd = [args.python, str(Path(__file__).resolve()), "--engine-floor-only", "--concurrency", args.concurrency,
               "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--speedup", str(args.speedup),
               "--model-path", str(model_dir)]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(args.armature_src))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            print(f"engine floor failed:\n{done.stderr[-2000:]}")
        else:
            floor = json.loads(done.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    summary = summarize(results, names, levels)
    ratios = print_table(summary)
    for f in floor:
        print(
            f"{int(f['concurrency']):>4} {'mocker only':<11} {f['req_per_s']:>14.1f} {f['ttft_mean_ms']:>8.2f} {'':>7} "
            f"{f['itl_mean_ms']:>7.2f}   (Armature's MockerEngine alone, in-process, {int(f['prompt_tokens'])}-token prompt)"
        )
    lines = verdict(ratios, levels)
    for line in lines:
        print(line)
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "serve_vs_dynamo",
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
                "load_average_before": load_before,
                "load_average_after": load_after,
                "config": {
                    "concurrency": levels,
                    "requests": args.requests,
                    "max_tokens": args.max_tokens,
                    "speedup_ratio": args.speedup,
                    "rounds": args.rounds,
                    "new_connection_per_request": True,
                    "model_dir": str(model_dir),
                },
                "summary": {str(c): v for c, v in summary.items()},
                "armature_mocker_engine_alone": floor,
                "ratios": ratios,
                "verdict": lines,
                "runs": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0 if all(r.ok == r.requests for r in results) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="armature,dynamo")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--speedup", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1, help="repeat every level; the table shows medians")
    p.add_argument("--warmup", type=int, default=20, help="requests per system before measuring")
    p.add_argument("--model-path", default=None, help="HF folder (default: the converted SmolLM2 cache)")
    p.add_argument("--dynamo-venv", default="/work/dynamo-venv")
    p.add_argument("--python", default=sys.executable, help="Python that runs Armature's processes")
    p.add_argument("--armature-src", default=str(ROOT / "src"), help="source tree Armature runs from")
    p.add_argument("--candidate-src", default=None, help="with --systems armature,candidate: A/B a change")
    p.add_argument("--http-processes", type=int, default=1, help="Armature's frontend --http-processes")
    p.add_argument("--candidate-http-processes", type=int, default=0,
                   help="the candidate's --http-processes (default: --http-processes)")
    p.add_argument("--start-timeout", type=float, default=90.0)
    p.add_argument("--pause-for-profiler", type=float, default=0.0, help="seconds to wait after warm-up")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--engine-floor", action="store_true",
                   help="also drive Armature's MockerEngine alone (no HTTP, no request plane) with the same load")
    p.add_argument("--engine-floor-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor", action="store_true",
                   help="also time serving_floor.py: the same load on a frontend and worker that do no work")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_vs_dynamo.json"))
    args = p.parse_args()
    if args.engine_floor_only:
        from armature.engine.loader import resolve_model_path

        model_dir = Path(args.model_path) if args.model_path else resolve_model_path(None)
        levels = [int(x) for x in args.concurrency.split(",")]
        floor = asyncio.run(engine_floor(model_dir, args.speedup, levels, args.requests, args.max_tokens))
        print(json.dumps(floor))
        return 0
    try:
        import uvloop

        return uvloop.run(bench(args))
    except ImportError:
        return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
