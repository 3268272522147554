"""The prefill engine's bootstrap server: decode sides connect here, by room, to pull KV.

Rooms meet in any order: the prefill request may reach the engine before or after the decode
side connects (the frontend sends both at once). A room lives from whichever comes first until
its KV is delivered or it fails. Nothing outlives the bootstrap timeout unattended: a room whose
decode side never connects has its prefill request aborted and its staged KV dropped; a decode
side that connects for a room no prefill request ever opens is told so. A decode side that
disconnects before its KV is sent (it was cancelled) aborts the prefill request it was waiting
for, so neither side keeps pages for a request nobody wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from armature.engine.disagg.config import TransferBackend
from armature.engine.disagg.loop_thread import LoopThread
from armature.engine.disagg.transfer import send_kv
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

log = logging.getLogger(__name__)

_FIRST_FRAME_TIMEOUT_S = 10.0
_BACKLOG = 256


@dataclass
class StagedKv:
    """A finished prefill's KV pages and its first token.

    ``data`` holds the pages in the staging layout, unless they were written straight into the
    decode side's shared-memory segment ``in_segment`` (then ``data`` is None).
    """

    rid: str  # the prefill request, held by its engine until the room is done
    data: torch.Tensor | None
    nbytes: int
    num_tokens: int
    num_pages: int
    first_token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    cached_tokens: int
    staged_at: float
    in_segment: str | None = None
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(eq=False)
class _Room:
    room: int
    deadline: float  # monotonic: dropped if no decode side is attached by then
    rid: str | None = None
    staged: StagedKv | None = None
    failed: str | None = None
    attached: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class BootstrapStats:
    rooms_served: int = 0
    rooms_failed: int = 0
    rooms_expired: int = 0
    bytes_sent: int = 0
    direct_writes: int = 0  # shm rooms whose pages went straight from the pool into the segment


class BootstrapServer:
    """Runs on its own loop thread; the engine's step loop calls the ``*_threadsafe`` methods."""

    def __init__(
        self,
        layout: KvLayout,
        abort_request: Callable[[str, str], None],
        delivered: Callable[[str], None],
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 300.0,
    ) -> None:
        self.layout = layout
        self.timeout_s = timeout_s
        self.stats = BootstrapStats()
        # Both run on this loop thread and only enqueue work for the engine's step loop.
        self._abort_request = abort_request
        self._delivered = delivered
        self._rooms: dict[int, _Room] = {}
        # room -> the shm segment its waiting decode side reads from; read by the step loop
        # (single dict operations, atomic under the GIL) to write the pages there directly.
        self._shm_targets: dict[int, str] = {}
        self._conns: set[asyncio.Task[None]] = set()
        self._thread = LoopThread("disagg-bootstrap")
        self._sock = socket.create_server((host, port), family=_family(host), backlog=_BACKLOG)
        self._sock.setblocking(False)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._accepting = self._thread.submit(self._accept_loop())
        self._sweeping = self._thread.submit(self._sweep_loop())
        log.info("bootstrap server listening on %s:%d", host, self.port)

    # --- from the engine's step loop -------------------------------------------------------

    def open_room_threadsafe(self, room: int, rid: str) -> None:
        self._thread.call_soon(self._open_room, room, rid)

    def stage_threadsafe(self, room: int, staged: StagedKv) -> None:
        self._thread.call_soon(self._stage, room, staged)

    def fail_threadsafe(self, room: int, message: str) -> None:
        self._thread.call_soon(self._fail, room, message)

    def shm_target(self, room: int) -> str | None:
        """Thread-safe: the segment a connected shm decode side waits on for ``room``, if any."""
        return self._shm_targets.get(room)

    def close(self) -> None:
        self._thread.stop(self._shutdown)

    @property
    def open_rooms(self) -> int:
        """Rooms holding or awaiting something; failed rooms kept only to answer a late decode
        side at once (they hold nothing) are not counted."""
        return sum(1 for r in list(self._rooms.values()) if r.failed is None)

    # --- room state (loop thread) ------------------------------------------------------------

    def _room(self, room: int) -> _Room:
        r = self._rooms.get(room)
        if r is None:
            r = _Room(room, time.monotonic() + self.timeout_s)
            self._rooms[room] = r
        return r

    def _open_room(self, room: int, rid: str) -> None:
        r = self._room(room)
        if r.rid is not None and r.rid != rid:
            # Two prefill requests claim one room: the later one cannot be paired; fail it alone.
            log.error("bootstrap room %d already belongs to request %s; aborting %s", room, r.rid, rid)
            self._abort_request(rid, f"bootstrap room {room} already belongs to another prefill request")
            return
        r.rid = rid

    def _stage(self, room: int, staged: StagedKv) -> None:
        r = self._rooms.get(room)
        if r is None or r.failed is not None:
            # Expired or cancelled meanwhile: drop the staged copy, end the held request.
            self._abort_request(staged.rid, f"bootstrap room {room} was closed before its KV was ready")
            return
        r.staged = staged
        r.settled.set()

    def _fail(self, room: int, message: str) -> None:
        r = self._rooms.get(room)
        if r is None or r.failed is not None:
            return
        if r.settled.is_set() and r.staged is None:
            return  # its KV is on its way already
        r.staged = None  # staged but not taken yet: nobody will take it now
        r.failed = message
        r.settled.set()
        self.stats.rooms_failed += 1

    def _drop(self, r: _Room) -> None:
        if self._rooms.get(r.room) is r:
            del self._rooms[r.room]
            self._shm_targets.pop(r.room, None)
        r.staged = None

    async def _sweep_loop(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for r in list(self._rooms.values()):
                if r.attached or now < r.deadline:
                    continue
                if not r.settled.is_set() or r.staged is not None:
                    self.stats.rooms_expired += 1
                    log.warning(
                        "bootstrap room %d: no decode side connected within %.0fs; dropping it and its "
                        "prefill request %s",
                        r.room,
                        self.timeout_s,
                        r.rid,
                    )
                    if r.rid is not None:
                        reason = (
                            f"no decode side connected to bootstrap room {r.room} within {self.timeout_s:.0f}s"
                        )
                        self._abort_request(r.rid, reason)
                self._drop(r)

    # --- connections (loop thread) -----------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        room: _Room | None = None
        try:
            pull = await asyncio.wait_for(read_frame(loop, conn), _FIRST_FRAME_TIMEOUT_S)
            if not isinstance(pull, KvPull):
                raise WireError(f"expected a pull request, got {type(pull).__name__}")
            problem = self._check(pull)
            if problem is not None:
                await self._send_failed(loop, conn, pull.room, problem)
                return
            room = self._room(pull.room)
            if room.attached:
                room = None
                await self._send_failed(loop, conn, pull.room, f"room {pull.room} already has a decode side")
                return
            room.attached = True
            if pull.backend == TransferBackend.SHM.value and pull.shm_name:
                self._shm_targets[pull.room] = pull.shm_name
            if not await self._wait_settled(loop, conn, room):
                return
            await self._deliver(loop, conn, pull, room)
        except (OSError, WireError, asyncio.TimeoutError) as exc:
            log.warning("bootstrap connection for room %s failed: %s", room.room if room else "?", exc)
            if room is not None and room.rid is not None and room.failed is None:
                self._abort_request(room.rid, f"the decode side's connection failed: {exc}")
        finally:
            if room is not None:
                self._drop(room)
            conn.close()

    def _check(self, pull: KvPull) -> str | None:
        if pull.layout != self.layout:
            return (
                f"KV layout mismatch: decode side has {pull.layout}, prefill side has {self.layout}; "
                "prefill and decode workers must serve the same model with the same dtype and page size"
            )
        if pull.backend not in {b.value for b in TransferBackend}:
            return f"unknown transfer backend {pull.backend!r}"
        need = -(-pull.num_tokens // self.layout.page_size)
        if len(pull.dst_pages) != need:
            return (
                f"{pull.num_tokens} tokens need {need} pages, the decode side reserved {len(pull.dst_pages)}"
            )
        return None

    async def _wait_settled(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, room: _Room) -> bool:
        """Wait for the room's KV (or failure) while watching the decode side; False if it left."""
        settled = asyncio.ensure_future(room.settled.wait())
        gone = asyncio.ensure_future(loop.sock_recv(conn, 1))
        try:
            while True:
                # Until the prefill request arrives the room may still expire; after that the
                # decode side's own waiting timeout bounds the wait.
                left = None if room.rid is not None else max(0.0, room.deadline - time.monotonic())
                wait_s = 1.0 if left is None else min(left, 1.0)
                done, _ = await asyncio.wait(
                    {settled, gone}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
                )
                if settled in done:
                    return True
                if gone in done:
                    # The decode side closed (or sent bytes it should not): it no longer wants this KV.
                    log.info("bootstrap room %d: decode side left before the KV was ready", room.room)
                    if room.rid is not None:
                        self._abort_request(room.rid, "the decode side went away before the KV was ready")
                    return False
                if room.rid is None and time.monotonic() >= room.deadline:
                    room.failed = (
                        f"no prefill request for room {room.room} reached this prefill worker within "
                        f"{self.timeout_s:.0f}s"
                    )
                    room.settled.set()
                    self.stats.rooms_expired += 1
                    return True
        finally:
            settled.cancel()
            gone.cancel()

    async def _deliver(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, pull: KvPull, room: _Room
    ) -> None:
        staged = room.staged
        if staged is None:
            await self._send_failed(loop, conn, pull.room, room.failed or "the prefill request failed")
            return
        room.staged = None
        if staged.num_tokens != pull.num_tokens:
            message = (
                f"the prefill request had {staged.num_tokens} prompt tokens, "
                f"the decode request {pull.num_tokens}"
            )
            self._abort_request(staged.rid, message)
            await self._send_failed(loop, conn, pull.room, message)
            return
        ready = KvReady(
            version=PROTOCOL_VERSION,
            room=pull.room,
            num_tokens=staged.num_tokens,
            num_pages=staged.num_pages,
            nbytes=staged.nbytes,
            first_token=staged.first_token,
            logprob=staged.logprob,
            top_logprobs=staged.top_logprobs,
            cached_tokens=staged.cached_tokens,
            staged_at=staged.staged_at,
            input_logprobs=staged.input_logprobs,
            input_top_logprobs=staged.input_top_logprobs,
        )
        if staged.in_segment is not None:
            if staged.in_segment != pull.shm_name:
                await self._send_failed(loop, conn, pull.room, "the KV went to another shared-memory segment")
                return
            await loop.sock_sendall(conn, encode_frame(ready))  # the pages are already there
            self.stats.direct_writes += 1
        else:
            assert staged.data is not None
            await send_kv(loop, conn, pull, ready, staged.data)
        self.stats.rooms_served += 1
        self._delivered(staged.rid)
        self.stats.bytes_sent += ready.nbytes

    async def _send_failed(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, room: int, message: str
    ) -> None:
        frame = KvFailed(version=PROTOCOL_VERSION, room=room, message=message)
        with contextlib.suppress(OSError):
            await loop.sock_sendall(conn, encode_frame(frame))

    async def _shutdown(self) -> None:
        self._accepting.cancel()
        self._sweeping.cancel()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        self._sock.close()
        self._rooms.clear()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
