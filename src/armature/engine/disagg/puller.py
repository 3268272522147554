"""The decode engine's side of a transfer: connect to the room's bootstrap server, pull the KV.

Each pull runs as a task on the puller's own loop thread. Its outcome — the received pages and
the prefill's first token, or why it failed — is handed to ``on_done``, which the engine runs on
its step loop. A cancelled pull closes its connection (the prefill side then aborts the prefill
request) and frees its shared-memory segment; it never reports.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from armature.engine.disagg.config import DisaggConfig
from armature.engine.disagg.loop_thread import LoopThread
from armature.engine.disagg.transfer import KvDestination, ReceivedKv, SegmentPool, open_destination
from armature.engine.disagg.wire import (
    PROTOCOL_VERSION,
    KvFailed,
    KvLayout,
    KvPull,
    KvReady,
    WireError,
    encode_frame,
    read_frame,
)
from armature.protocols.llm import BootstrapInfo

log = logging.getLogger(__name__)


@dataclass
class PullJob:
    rid: str
    bootstrap: BootstrapInfo
    num_tokens: int
    pages: list[int]


@dataclass
class PullResult:
    rid: str
    ready: KvReady | None = None
    kv: ReceivedKv | None = None
    error: str | None = None
    wire_s: float = 0.0  # from KvReady to the last byte (tcp) / to the mapping (shm)

    @property
    def ok(self) -> bool:
        return self.error is None


class KvPuller:
    def __init__(self, config: DisaggConfig, layout: KvLayout, on_done: Callable[[PullResult], None]) -> None:
        self.config = config
        self.layout = layout
        self._on_done = on_done
        self._thread = LoopThread("disagg-puller")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.segments = SegmentPool()

    def start_threadsafe(self, job: PullJob) -> None:
        self._thread.call_soon(self._start, job)

    def cancel_threadsafe(self, rid: str) -> None:
        self._thread.call_soon(self._cancel, rid)

    def close(self) -> None:
        self._thread.stop(self._cancel_all)
        self.segments.close()

    # --- loop thread ---------------------------------------------------------------------

    def _start(self, job: PullJob) -> None:
        task = asyncio.ensure_future(self._pull(job))
        self._tasks[job.rid] = task

        def forget(t: asyncio.Task[None]) -> None:
            if self._tasks.get(job.rid) is t:
                del self._tasks[job.rid]

        task.add_done_callback(forget)

    def _cancel(self, rid: str) -> None:
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pull(self, job: PullJob) -> None:
        loop = asyncio.get_running_loop()
        boot = job.bootstrap
        address = f"{boot.bootstrap_host}:{boot.bootstrap_port}"
        where = f"prefill bootstrap server {address} (room {boot.bootstrap_room})"
        dest: KvDestination | None = None
        kv: ReceivedKv | None = None
        sock: socket.socket | None = None
        try:
            nbytes = len(job.pages) * self.layout.page_bytes()
            dest = open_destination(self.config.transfer_backend, nbytes, self.segments)
            infos = await loop.getaddrinfo(boot.bootstrap_host, boot.bootstrap_port, type=socket.SOCK_STREAM)
            family, _, proto, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, addr), self.config.bootstrap_timeout_s)
            pull = KvPull(
                version=PROTOCOL_VERSION,
                room=boot.bootstrap_room,
                backend=self.config.transfer_backend.value,
                layout=self.layout,
                num_tokens=job.num_tokens,
                dst_pages=job.pages,
                shm_name=dest.shm_name,
            )
            await loop.sock_sendall(sock, encode_frame(pull))
            frame = await asyncio.wait_for(read_frame(loop, sock), self.config.waiting_timeout_s)
            if isinstance(frame, KvFailed):
                self._report(PullResult(job.rid, error=f"{where} reported: {frame.message}"))
                return
            if not isinstance(frame, KvReady) or frame.room != boot.bootstrap_room:
                raise WireError(f"unexpected answer {type(frame).__name__} from the bootstrap server")
            if frame.num_pages != len(job.pages) or frame.nbytes != nbytes:
                raise WireError(
                    f"the prefill side sends {frame.num_pages} pages / {frame.nbytes} bytes, "
                    f"{len(job.pages)} pages / {nbytes} bytes were reserved"
                )
            began = time.perf_counter()
            kv = await dest.receive(loop, sock, frame, self.layout)
            result = PullResult(job.rid, ready=frame, kv=kv, wire_s=time.perf_counter() - began)
            kv = None  # handed over
            self._report(result)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self._report(PullResult(job.rid, error=f"timed out waiting for {where}"))
        except (OSError, WireError) as exc:
            self._report(PullResult(job.rid, error=f"lost {where}: {exc}"))
        finally:
            if sock is not None:
                sock.close()
            if kv is not None:
                kv.release()
            if dest is not None:
                dest.discard()

    def _report(self, result: PullResult) -> None:
        try:
            self._on_done(result)
        except Exception:  # the engine is gone: nobody takes the pages, free them here
            log.debug("pull result for %s had no taker", result.rid, exc_info=True)
            if result.kv is not None:
                result.kv.release()
