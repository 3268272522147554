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
import os
import socket
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Protocol

import torch

from armature.engine.disagg.config import TransferBackend
from armature.engine.disagg.kv_pages import as_staging
from armature.engine.disagg.wire import KvLayout, KvPull, KvReady, WireError, encode_frame, recv_into

_DEV_SHM = "/dev/shm"


def raw_bytes(staged: torch.Tensor) -> memoryview:
    """The staged tensor's bytes, without a copy."""
    return memoryview(staged.reshape(-1).view(torch.uint8).numpy())


@dataclass
class ReceivedKv:
    """KV pages that arrived on the decode side, in the staging layout, until ``release``."""

    data: torch.Tensor
    nbytes: int
    _shm: shared_memory.SharedMemory | None = field(default=None, repr=False)

    def release(self) -> None:
        self.data = torch.empty(0)
        if self._shm is not None:
            shm, self._shm = self._shm, None
            _close_and_unlink(shm)


def _close_and_unlink(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(BufferError):
        shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


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
        await recv_into(loop, sock, memoryview(raw.numpy()))
        return ReceivedKv(as_staging(raw, layout, ready.num_pages), ready.nbytes)

    def discard(self) -> None:
        pass


class _ShmDestination:
    def __init__(self, nbytes: int) -> None:
        # A zero-size segment is refused by the OS; an empty transfer still needs a name.
        shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
        self._shm: shared_memory.SharedMemory | None = shm
        self.shm_name: str | None = shm.name

    async def receive(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, ready: KvReady, layout: KvLayout
    ) -> ReceivedKv:
        shm = self._shm
        if shm is None:
            raise WireError("the shared-memory segment was already released")
        if ready.nbytes > shm.size:
            raise WireError(f"prefill side wrote {ready.nbytes} bytes into a {shm.size}-byte segment")
        raw = torch.frombuffer(shm.buf, dtype=torch.uint8, count=ready.nbytes)
        self._shm = None  # owned by the ReceivedKv from here on
        return ReceivedKv(as_staging(raw, layout, ready.num_pages), ready.nbytes, shm)

    def discard(self) -> None:
        if self._shm is not None:
            shm, self._shm = self._shm, None
            _close_and_unlink(shm)


def open_destination(backend: TransferBackend, nbytes: int) -> KvDestination:
    if backend is TransferBackend.SHM:
        return _ShmDestination(nbytes)
    return _TcpDestination()


# --- the prefill side --------------------------------------------------------------------------


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
        shm.buf[: len(payload)] = payload
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
