"""Request-plane throughput and latency: TCP plane, NATS plane, and HTTP SSE as the baseline.

The worker runs in its own process (as in production; here the two share this machine's cores).
Every transport streams the same items — a token-sized dict like an engine output — and the
caller decodes every one:

  * stream items/s, one stream of ``--items`` items;
  * stream items/s, ``--streams`` concurrent streams (sharing one connection on the planes);
  * round trip of a 1-item request (p50/p99 over ``--rtt-requests`` sequential requests);
  * (planes) how long a stop takes to reach the handler while other streams run.

The baseline is the same stream served by uvicorn (a bare ASGI app writing SSE ``data:`` lines)
and read by httpx, measured in the same run. Prints a table and writes JSON to
benchmarks/results/request_plane.json.

    .venv/bin/python benchmarks/request_plane.py            # all three
    .venv/bin/python benchmarks/request_plane.py --planes tcp,sse --items 20000
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ENDPOINT = "bench.worker.generate"


def item(i: int) -> dict[str, Any]:
    """One streamed item, shaped like an engine's per-token output."""
    return {"token_ids": [i % 32000], "finish_reason": None, "index": 0, "cum_log_probs": None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_uvloop() -> str:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    except ImportError:
        return "asyncio"


# --- worker processes ------------------------------------------------------------------------


async def serve_plane(plane: str, kv_root: str, nats_url: str | None) -> None:
    from armature.runtime.context import Context
    from armature.runtime.discovery.factory import create_store
    from armature.runtime.runtime import DistributedRuntime

    stop_marks: dict[str, float] = {}

    async def generate(request: dict[str, Any], context: Context):
        n = request["n"]
        if request.get("until_stopped"):
            # The stop latency probe: the moment the stop reaches this context, in wall time.
            context.add_callback(lambda c: stop_marks.setdefault(c.id(), time.time()))
            i = 0
            while not context.is_stopped():
                yield item(i)
                i += 1
                await asyncio.sleep(0.005)
            yield {"stopped_at": stop_marks.get(context.id())}
            return
        for i in range(n):
            yield item(i)

    runtime = DistributedRuntime(create_store("file", root=kv_root), plane, nats_url=nats_url, grace_period_s=0)
    runtime.install_signal_handlers()
    await runtime.endpoint(ENDPOINT).start_serving(generate)
    print("READY", flush=True)
    await runtime.wait_closed()


def serve_sse(port: int) -> None:
    import uvicorn

    encode = msgspec.json.encode

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        n = msgspec.json.decode(body)["n"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})  # fmt: skip
        for i in range(n):
            await send({"type": "http.response.body", "body": b"data: " + encode(item(i)) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    print("READY", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools",
                access_log=False)  # fmt: skip


# --- callers ------------------------------------------------------------------------------------


class PlaneCaller:
    def __init__(self, plane: str, kv_root: str, nats_url: str | None) -> None:
        from armature.runtime.discovery.factory import create_store
        from armature.runtime.runtime import DistributedRuntime

        self.runtime = DistributedRuntime(create_store("file", root=kv_root), plane, nats_url=nats_url)
        self.client: Any = None

    async def start(self) -> None:
        self.client = await self.runtime.endpoint(ENDPOINT).client()
        await self.client.wait_for_instances(30)

    async def stream(self, n: int) -> int:
        count = 0
        async for _ in await self.client.round_robin({"n": n}):
            count += 1
        return count

    async def stop_latency(self, background_streams: int, items: int) -> float:
        """ms from ``stop()`` to the handler's context seeing it, with other streams running."""
        probe = await self.client.round_robin({"n": 0, "until_stopped": True})
        await probe.__anext__()
        others = [asyncio.ensure_future(self.stream(items)) for _ in range(background_streams)]
        await asyncio.sleep(0.05)
        sent = time.time()
        probe.stop()
        last = None
        async for last in probe:
            pass
        await asyncio.gather(*others)
        assert last is not None and last.get("stopped_at"), "handler did not report the stop"
        return (last["stopped_at"] - sent) * 1e3

    async def close(self) -> None:
        await self.runtime.shutdown(grace_period_s=0)


class SseCaller:
    def __init__(self, port: int) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{port}/generate"
        self.http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256))

    async def start(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.stream(1)
                return
            except Exception:  # noqa: BLE001 - server still starting
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def stream(self, n: int) -> int:
        count = 0
        decode = msgspec.json.decode
        async with self.http.stream("POST", self.url, json={"n": n}) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    decode(line[6:])
                    count += 1
        return count

    async def close(self) -> None:
        await self.http.aclose()


async def measure(caller: Any, args: argparse.Namespace, with_stop: bool) -> dict[str, Any]:
    await caller.start()
    await caller.stream(1000)  # warm-up
    t = time.perf_counter()
    got = await caller.stream(args.items)
    single = got / (time.perf_counter() - t)
    assert got == args.items, f"got {got} of {args.items} items"

    per_stream = max(1, args.items // args.streams)
    t = time.perf_counter()
    counts = await asyncio.gather(*(caller.stream(per_stream) for _ in range(args.streams)))
    concurrent = sum(counts) / (time.perf_counter() - t)
    assert sum(counts) == per_stream * args.streams

    rtts = []
    for _ in range(args.rtt_requests):
        t = time.perf_counter()
        await caller.stream(1)
        rtts.append((time.perf_counter() - t) * 1e3)
    rtts.sort()
    result = {
        "single_stream_items_per_s": single,
        "concurrent_items_per_s": concurrent,
        "rtt_p50_ms": statistics.median(rtts),
        "rtt_p99_ms": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
    }
    if with_stop:
        result["stop_latency_ms"] = await caller.stop_latency(args.streams, per_stream)
    await caller.close()
    return result


def start_worker(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"worker {argv} did not start")
    return proc


def stop_worker(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    loop_name = install_uvloop()
    planes = [p.strip() for p in args.planes.split(",") if p.strip()]
    results: dict[str, Any] = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with tempfile.TemporaryDirectory(prefix="armature-bench-") as tmp:
        nats_proc = None
        nats_url = None
        if "nats" in planes:
            binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
            port = free_port()
            nats_proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            nats_url = f"nats://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        try:
            for plane in planes:
                if plane == "sse":
                    port = free_port()
                    worker = start_worker(["--serve", "sse", "--port", str(port)], env)
                    caller: Any = SseCaller(port)
                else:
                    kv = str(Path(tmp) / f"kv-{plane}")
                    argv = ["--serve", plane, "--kv-root", kv] + (["--nats-url", nats_url] if nats_url else [])
                    worker = start_worker(argv, env)
                    caller = PlaneCaller(plane, kv, nats_url)
                try:
                    results[plane] = asyncio.run(measure(caller, args, with_stop=plane != "sse"))
                finally:
                    stop_worker(worker)
        finally:
            if nats_proc is not None:
                nats_proc.terminate()
                nats_proc.wait(10)
    base = results.get("sse")
    if base:
        for plane, r in results.items():
            r["single_vs_sse"] = r["single_stream_items_per_s"] / base["single_stream_items_per_s"]
            r["concurrent_vs_sse"] = r["concurrent_items_per_s"] / base["concurrent_items_per_s"]
    return {
        "benchmark": "request_plane",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "event_loop": loop_name},  # fmt: skip
        "params": {"items": args.items, "streams": args.streams, "rtt_requests": args.rtt_requests},
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    rows = report["results"]
    print(f"\nrequest plane, {report['params']['items']} items/stream, {report['params']['streams']} concurrent "
          f"streams, {report['machine']['cpus']} CPUs, {report['machine']['event_loop']}")  # fmt: skip
    header = f"{'plane':6} {'1 stream items/s':>17} {'x SSE':>6} {'concurrent items/s':>19} {'x SSE':>6} " \
             f"{'RTT p50 ms':>10} {'RTT p99 ms':>10} {'stop ms':>8}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for plane, r in rows.items():
        stop = f"{r['stop_latency_ms']:.2f}" if "stop_latency_ms" in r else "-"
        print(f"{plane:6} {r['single_stream_items_per_s']:17,.0f} {r.get('single_vs_sse', 0):6.2f} "
              f"{r['concurrent_items_per_s']:19,.0f} {r.get('concurrent_vs_sse', 0):6.2f} "
              f"{r['rtt_p50_ms']:10.3f} {r['rtt_p99_ms']:10.3f} {stop:>8}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--planes", default="tcp,nats,sse")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rtt-requests", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "request_plane.json"))
    parser.add_argument("--serve", choices=("tcp", "nats", "sse"), help=argparse.SUPPRESS)
    parser.add_argument("--kv-root", help=argparse.SUPPRESS)
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "sse":
        serve_sse(args.port)
        return
    if args.serve:
        install_uvloop()
        asyncio.run(serve_plane(args.serve, args.kv_root, args.nats_url))
        return
    report = run_all(args)
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
