"""``--http-processes N``: N frontend processes on one port, one ``/metrics`` for all of them.

One Python process streams on one core. Past that (a busy frontend host streams tens of
thousands of SSE events a second) the frontend runs as N copies of itself: the first process
starts the others with the same flags, every one listens on the port with ``SO_REUSEPORT`` (the
kernel spreads new connections over them), and each runs its own discovery watch, routers and
request-plane connections. Only the metrics need the others: each process answers on a Unix
socket in a private folder with its own page, and ``GET /metrics`` on any of them merges all
the pages, so a scrape sees the whole frontend whichever process the connection lands on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from armature.frontend.http_server import HttpServer

log = logging.getLogger("armature.frontend")

# Set in the processes the first one starts: which one this is, and the folder of metric sockets.
INDEX_ENV = "ARMATURE_FRONTEND_PROCESS_INDEX"
DIR_ENV = "ARMATURE_FRONTEND_PROCESS_DIR"
_PEER_TIMEOUT_S = 2.0
_PR_SET_PDEATHSIG = 1

# Merged by the largest value, not the sum: every process holds the same copy of these (each
# router indexes every worker's KV events), so summing would count one fact N times.
_SAME_IN_EVERY_PROCESS = ("_worker_cached_blocks", "_kv_events_applied_total", "_kv_event_gaps_total")


def process_index(env: Mapping[str, str] | None = None) -> int:
    """0 in the process a user started; 1..N-1 in the ones it started."""
    raw = (os.environ if env is None else env).get(INDEX_ENV)
    return int(raw) if raw and raw.isdigit() else 0


class MetricsPeers:
    """This process's metrics socket, and the merged page of every process's metrics."""

    def __init__(self, folder: Path, index: int, count: int, render: Callable[[], bytes]) -> None:
        self.folder = folder
        self.index = index
        self.count = count
        self._render = render
        self._server: asyncio.AbstractServer | None = None

    def _path(self, index: int) -> str:
        return str(self.folder / f"{index}.sock")

    async def start(self) -> None:
        async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(self._render())
                await writer.drain()
            finally:
                writer.close()

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(self.index))
        self._server = await asyncio.start_unix_server(answer, self._path(self.index))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(self.index))

    async def _read(self, index: int) -> bytes | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self._path(index)), _PEER_TIMEOUT_S)
        except (OSError, TimeoutError):
            return None  # not started yet, or gone: its requests are not in this page
        try:
            return await asyncio.wait_for(reader.read(), _PEER_TIMEOUT_S)
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()

    async def render(self) -> bytes:
        others = [i for i in range(self.count) if i != self.index]
        pages = [self._render(), *await asyncio.gather(*(self._read(i) for i in others))]
        return merge_pages([p for p in pages if p is not None])


def merge_pages(pages: Sequence[bytes]) -> bytes:
    """Prometheus text pages of identical processes as one page.

    Counters, histograms and gauges add up (requests, in-flight requests, each router's active
    blocks); a few series every process holds a copy of take the largest value instead, and a
    series' ``_created`` time is the earliest.
    """
    order: list[str] = []
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for page in pages:
        for fam in text_string_to_metric_families(page.decode()):
            entry = families.get(fam.name)
            if entry is None:
                entry = families[fam.name] = (fam.type, fam.documentation, {})
                order.append(fam.name)
            samples = entry[2]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in samples:
                    samples[key] = s.value
                elif s.name.endswith("_created"):  # when the series began: the earliest process's
                    samples[key] = min(samples[key], s.value)
                elif s.name.endswith(_SAME_IN_EVERY_PROCESS):
                    samples[key] = max(samples[key], s.value)
                else:
                    samples[key] += s.value
    out: list[str] = []
    for name in order:
        kind, doc, samples = families[name]
        head = f"{name}_total" if kind == "counter" else name  # as prometheus_client writes it
        out.append(f"# HELP {head} {_escape_help(doc)}")
        out.append(f"# TYPE {head} {kind}")
        for (sample, labels), value in samples.items():
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            out.append(f"{sample}{{{label_text}}} {floatToGoString(value)}" if labels else f"{sample} {floatToGoString(value)}")
    return ("\n".join(out) + "\n").encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class SiblingProcesses:
    """The processes the first frontend process starts: same flags, same port, same metrics folder."""

    def __init__(self, count: int, argv: Sequence[str]) -> None:
        self.count = count
        self._argv = list(argv)
        self.folder = Path(tempfile.mkdtemp(prefix="armature-frontend-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._signalled: set[int] = set()

    def start(self) -> None:
        for index in range(1, self.count):
            env = dict(os.environ, **{INDEX_ENV: str(index), DIR_ENV: str(self.folder)})
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", "armature.frontend", *self._argv], env=env)
            )

    def exited(self) -> list[tuple[int, int]]:
        """(index, exit code) of the processes that have stopped."""
        return [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]

    async def watch(self, on_exit: Callable[[int, int], None]) -> None:
        """Call ``on_exit(index, code)`` once for the first of them that stops on its own."""
        while True:
            gone = self.exited()
            if gone:
                on_exit(*gone[0])
                return
            await asyncio.sleep(0.5)

    def terminate(self) -> None:
        """SIGTERM the ones still running: each drains its own requests, as this one does."""
        for p in self.procs:
            # Once: a second SIGTERM could land after a process has put the default handler
            # back at the end of its shutdown, and kill it mid-cleanup.
            if p.poll() is None and p.pid not in self._signalled:
                self._signalled.add(p.pid)
                p.send_signal(signal.SIGTERM)

    async def stop(self, grace_s: float) -> list[int]:
        """SIGTERM them, wait up to ``grace_s`` (+2 s), SIGKILL what is left; their exit codes."""
        self.terminate()
        deadline = asyncio.get_running_loop().time() + grace_s + 2.0
        while any(p.poll() is None for p in self.procs) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                log.warning("frontend process %d did not stop within %.0f s: killing it", p.pid, grace_s + 2.0)
                p.kill()
                p.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        return [int(p.returncode) for p in self.procs]


class FrontendProcesses:
    """This process's part in ``--http-processes``: the first starts, watches and stops the others;
    every one serves its metrics to them and merges theirs into its ``/metrics``."""

    def __init__(self, count: int, argv: Sequence[str], render: Callable[[], bytes]) -> None:
        self.index = process_index()
        self.first = self.index == 0
        self.siblings = SiblingProcesses(count, argv) if self.first else None
        folder = self.siblings.folder if self.siblings is not None else Path(os.environ[DIR_ENV])
        self.peers = MetricsPeers(folder, self.index, count, render)
        self._watch: asyncio.Task[None] | None = None

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        # Ctrl-C reaches every process of the terminal's group: the first one alone answers it
        # and tells the others (one SIGTERM each), so none is signalled twice.
        return (signal.SIGTERM, signal.SIGINT) if self.first else (signal.SIGTERM,)

    async def start(self, server: HttpServer) -> None:
        """Once ``server`` listens: the metrics socket, then (first process) the others."""
        if not self.first:
            die_with_parent()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        await self.peers.start()
        if self.siblings is not None:
            self.siblings.start()
            self._watch = asyncio.get_running_loop().create_task(self._supervise(server, self.siblings))

    async def _supervise(self, server: HttpServer, siblings: SiblingProcesses) -> None:
        """Stop the others when this process is told to stop, and all of it when one of them dies."""
        stop = asyncio.ensure_future(server.stop_requested())
        gone = asyncio.ensure_future(siblings.watch(lambda i, code: log.error(
            "frontend process %d exited with %d: stopping the frontend", i, code)))  # fmt: skip
        try:
            await asyncio.wait((stop, gone), return_when=asyncio.FIRST_COMPLETED)
            # A frontend that lost a process serves with less than it was asked to: stop all of
            # it so a supervisor restarts the whole. Told to stop: the others drain alongside.
            server.request_stop()
            siblings.terminate()
        finally:
            stop.cancel()
            gone.cancel()

    async def stop(self, grace_s: float) -> bool:
        """After this process drained: the others stopped too; whether every one exited 0."""
        if self._watch is not None:
            self._watch.cancel()
        codes = await self.siblings.stop(grace_s) if self.siblings is not None else []
        await self.peers.close()
        return not any(codes)
