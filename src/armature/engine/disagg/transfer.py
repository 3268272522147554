"""KV transfer backends: how staged KV pages get from the prefill side into the decode side.

``tcp``: the bytes follow the ``KvReady`` frame on the bootstrap connection — works across hosts.
``shm``: the decode side creates a ``multiprocessing.shared_memory`` segment sized for its
reserved pages and names it in its ``KvPull``; the prefill side writes the pages into it and
then sends ``KvReady`` — the bytes never cross a socket (one host only). Either way the decode
side ends up with the pages in the staging layout (``kv_pages``) and copies them into its pool
on its own step loop, so a cancelled transfer never writes into pages that were freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Protocol

import torch

from armature.engine.disagg.config import TransferBackend
from armature.engine.disagg.kv_pages import as_staging, gather_pages, layout_of
from armature.engine.disagg.wire import KvLayout, KvPull, KvReady, WireError, encode_frame, recv_into
from armature.engine.kv_pool import KVPool

_DEV_SHM = "/dev/shm"


def raw_bytes(staged: torch.Tensor) -> memoryview:
    """The staged tensor's bytes, without a copy."""
    # ndarray.data, not memoryview(ndarray): the same view, and typed as one (numpy's stubs
    # declare ndarray a buffer only from Python 3.12).
    return staged.reshape(-1).view(torch.uint8).numpy().data


@dataclass
class ReceivedKv:
    """KV pages that arrived on the decode side, in the staging layout, until ``release``."""

    data: torch.Tensor
    nbytes: int
    _on_release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        self.data = torch.empty(0)
        if self._on_release is not None:
            done, self._on_release = self._on_release, None
            done()


def _close_and_unlink(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):
        shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


class SegmentPool:
    """The decode side's shared-memory segments, kept for reuse.

    A fresh segment costs the kernel a page allocation and zero-fill per 4 KiB on first touch
    (on both sides); reusing one that already holds its pages makes the transfer two plain
    copies. A segment goes back to the pool only after its transfer completed (the prefill side
    writes before it answers, never after), so no late write can land in a reused segment; one
    whose transfer was cut short is unlinked instead.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._free: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
        need = max(nbytes, 1)  # the OS refuses an empty segment; an empty transfer still needs a name
        with self._lock:
            fits = [s for s in self._free if need <= s.size <= 2 * need]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
        return shared_memory.SharedMemory(create=True, size=need)

    def give_back(self, seg: shared_memory.SharedMemory) -> None:
        with self._lock:
            if self._closed:
                _close_and_unlink(seg)
                return
            self._free.append(seg)
            # Oldest first out, until the pool fits its budget.
            while sum(s.size for s in self._free) > self.max_bytes:
                _close_and_unlink(self._free.pop(0))

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
            self._closed = True
        for seg in free:
            _close_and_unlink(seg)


class KvDestination(Protocol):
    """The decode side's end of one transfer."""

    shm_name: str | None

    async def receive(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: KvReady, layout: KvLayout
    ) -> ReceivedKv: ...

    def discard(self) -> None:
        """Free what ``open_destination`` took, when no ``ReceivedKv`` took it over."""
        ...


class _TcpDestination:
    shm_name: str | None = None

    async def receive(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: KvReady, layout: KvLayout
    ) -> ReceivedKv:
        raw = torch.empty(ready.nbytes, dtype=torch.uint8)
        await recv_into(loop, sock, raw.numpy().data)
        return ReceivedKv(as_staging(raw, layout, ready.num_pages), ready.nbytes)

    def discard(self) -> None:
        pass


class _ShmDestination:
    def __init__(self, pool: SegmentPool, nbytes: int) -> None:
        self._pool = pool
        self._shm: shared_memory.SharedMemory | None = pool.acquire(nbytes)
        self.shm_name: str | None = self._shm.name

    async def receive(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: KvReady, layout: KvLayout
    ) -> ReceivedKv:
        shm = self._shm
        if shm is None:
            raise WireError("the shared-memory segment was already released")
        if ready.nbytes > shm.size:
            raise WireError(f"prefill side wrote {ready.nbytes} bytes into a {shm.size}-byte segment")
        raw = torch.frombuffer(shm.buf, dtype=torch.uint8, count=ready.nbytes)
        self._shm = None  # owned by the ReceivedKv from here on; the writes are over
        staged = as_staging(raw, layout, ready.num_pages)
        return ReceivedKv(staged, ready.nbytes, lambda: self._pool.give_back(shm))

    def discard(self) -> None:
        if self._shm is not None:
            shm, self._shm = self._shm, None
            # The prefill side may still be writing into it: never reuse it.
            _close_and_unlink(shm)


def open_destination(
    backend: TransferBackend, nbytes: int, segments: SegmentPool | None = None
) -> KvDestination:
    if backend is TransferBackend.SHM:
        return _ShmDestination(segments or SegmentPool(0), nbytes)
    return _TcpDestination()


# --- the prefill side --------------------------------------------------------------------------


def gather_into_segment(pool: KVPool, pages: Sequence[int], name: str) -> int:
    """Copy ``pages`` straight from the pool into the decode side's segment ``name``.

    The one-copy path of the shm backend, taken when the decode side is already waiting: no
    staging tensor, no second copy. Raises ``OSError`` when the segment is gone or too small
    (the caller then stages as usual). Returns the bytes written.
    """
    layout = layout_of(pool)
    nbytes = len(pages) * layout.page_bytes()
    with open(os.path.join(_DEV_SHM, name.lstrip("/")), "r+b") as f:
        if os.fstat(f.fileno()).st_size < nbytes:
            raise OSError(f"segment {name!r} holds fewer than {nbytes} bytes")
        mm = mmap.mmap(f.fileno(), max(nbytes, 1))
    try:
        _gather_to(pool, pages, mm, nbytes)
    finally:
        mm.close()  # the tensors over it died with _gather_to's frame
    return nbytes


def _gather_to(pool: KVPool, pages: Sequence[int], buf: mmap.mmap, nbytes: int) -> None:
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)
    gather_pages(pool, pages, out=as_staging(raw, layout_of(pool), len(pages)))


def _write_shm(name: str, payload: memoryview) -> None:
    path = os.path.join(_DEV_SHM, name.lstrip("/"))
    if os.path.isdir(_DEV_SHM):
        # A plain write into the tmpfs file: one kernel copy, and no resource-tracker entry
        # on this side (the decode side created the segment and is the one to unlink it).
        with open(path, "r+b", buffering=0) as f:
            written = 0
            while written < len(payload):
                written += f.write(payload[written:])
        return
    shm = shared_memory.SharedMemory(name=name)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        buf = shm.buf
        assert buf is not None  # None only after close()
        buf[: len(payload)] = payload
    finally:
        shm.close()


async def send_kv(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, pull: KvPull, ready: KvReady, staged: torch.Tensor
) -> None:
    """Deliver staged KV the way ``pull`` asked for it, then (or with it) the ``KvReady`` frame."""
    payload = raw_bytes(staged)
    if pull.backend == TransferBackend.SHM.value:
        if not pull.shm_name:
            raise WireError("an shm transfer needs the decode side's segment name")
        try:
            await asyncio.to_thread(_write_shm, pull.shm_name, payload)
        except OSError as exc:
            raise WireError(
                f"cannot write into shared-memory segment {pull.shm_name!r} ({exc}); the shm backend needs "
                "prefill and decode workers on one host — use --disaggregation-transfer-backend tcp "
                "across hosts"
            ) from exc
        await loop.sock_sendall(sock, encode_frame(ready))
        return
    await loop.sock_sendall(sock, encode_frame(ready))
    await loop.sock_sendall(sock, payload)
