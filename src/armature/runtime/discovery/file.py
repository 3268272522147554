"""Discovery in a shared folder: one file per key, leases kept alive by touching a file.

Layout under the root::

    keys/<percent-encoded key>    msgpack {value, lease}; written to tmp/ then renamed in
    leases/<lease id hex>         msgpack {ttl_s, pid}; its mtime is the last keep-alive
    tmp/                          half-written files (never read)

A holder touches its lease file every ``ttl/3``. Every process polls the folder: a lease file
whose mtime is older than its TTL belongs to a dead (or frozen) holder, so the poller deletes
that lease's keys and then the lease file, and watchers (in every process) see the DELETEs on
their next poll. Polling runs every 0.25 s: a watcher hears of a change within a quarter second,
and a folder of a few hundred keys costs a few hundred ``stat`` calls per poll, negligible on a
local disk. A holder that finds its lease file gone (it stalled longer than the TTL) takes a new
lease and writes its keys again.

Clocks: expiry compares file mtimes with this machine's clock, so processes sharing the folder
over a network file system need clocks in sync to well under the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

import msgspec

from armature.runtime.discovery.base import (
    DEFAULT_LEASE_TTL_S,
    DiscoveryError,
    KeyValueStore,
    WatchEvent,
    WatchEventKind,
)

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.25
_MAX_NAME_BYTES = 255


class _KeyRecord(msgspec.Struct, array_like=True):
    value: bytes
    lease: int  # 0: no lease


class _LeaseRecord(msgspec.Struct, array_like=True):
    ttl_s: float
    pid: int


_key_encoder = msgspec.msgpack.Encoder()
_key_decoder = msgspec.msgpack.Decoder(_KeyRecord)
_lease_decoder = msgspec.msgpack.Decoder(_LeaseRecord)


@dataclass
class _Lease:
    ttl_s: float
    file_id: int  # the lease file's id; changes if the lease is lost and re-taken
    keys: dict[str, bytes] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


@dataclass
class _Seen:
    sig: tuple[int, int, int]  # (inode, mtime_ns, size): a rename always changes the inode
    key: str
    record: _KeyRecord


class _Watcher:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()


def _key_filename(key: str) -> str:
    name = quote(key, safe="")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise ValueError(f"discovery key too long for the file backend ({len(name)} bytes encoded): {key!r}")
    return name


class FileStore(KeyValueStore):
    """``KeyValueStore`` in a folder shared by the processes of one machine (or an NFS mount)."""

    def __init__(self, root: str | os.PathLike[str], *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")
        self.root = Path(root)
        self._keys_dir = self.root / "keys"
        self._leases_dir = self.root / "leases"
        self._tmp_dir = self.root / "tmp"
        self._poll_interval_s = poll_interval_s
        self._leases: dict[int, _Lease] = {}
        self._seen: dict[str, _Seen] = {}  # filename -> last state the watchers were told
        self._watchers: set[_Watcher] = set()
        self._scan_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise DiscoveryError("store is closed")
        if self._poller is not None:
            return
        try:
            for d in (self._keys_dir, self._leases_dir, self._tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiscoveryError(f"cannot use {self.root} for file discovery: {exc}") from exc
        self._seen = self._read_all()
        self._poller = asyncio.create_task(self._poll_loop(), name="file-discovery-poller")

    async def close(self, revoke: bool = True) -> None:
        """Close; ``revoke=False`` leaves the leases to expire on their TTL, as a crash would."""
        if self._closed:
            return
        self._closed = True
        tasks = [lease.task for lease in self._leases.values() if lease.task is not None]
        if self._poller is not None:
            tasks.append(self._poller)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if revoke:
            for lease in self._leases.values():
                self._drop_lease_files(lease.file_id, lease.keys)
        self._leases.clear()
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)

    # -- leases ---------------------------------------------------------------------------
    async def grant_lease(self, ttl_s: float = DEFAULT_LEASE_TTL_S) -> int:
        self._check_open()
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        handle = self._new_lease_file(ttl_s)
        lease = _Lease(ttl_s=ttl_s, file_id=handle)
        lease.task = asyncio.create_task(self._keep_alive(handle, lease), name=f"file-lease-{handle:x}")
        self._leases[handle] = lease
        return handle

    async def revoke_lease(self, lease_id: int) -> None:
        self._check_open()
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise DiscoveryError(f"lease {lease_id:x} was not granted by this store (or was revoked)")
        if lease.task is not None:
            lease.task.cancel()
        self._drop_lease_files(lease.file_id, lease.keys)
        self._wake.set()

    def _new_lease_file(self, ttl_s: float) -> int:
        while True:
            file_id = secrets.randbits(62) + 1
            path = self._leases_dir / f"{file_id:x}"
            if not path.exists():
                break
        self._write_atomic(path, _key_encoder.encode(_LeaseRecord(ttl_s=ttl_s, pid=os.getpid())))
        return file_id

    async def _keep_alive(self, handle: int, lease: _Lease) -> None:
        while True:
            await asyncio.sleep(lease.ttl_s / 3)
            try:
                os.utime(self._leases_dir / f"{lease.file_id:x}")
            except FileNotFoundError:
                # Another process reaped the lease: we stalled past the TTL. We are alive, so
                # come back under a fresh lease file (fresh, so a reaper still holding the old
                # id cannot delete the keys we write now).
                old = lease.file_id
                lease.file_id = self._new_lease_file(lease.ttl_s)
                for key, value in lease.keys.items():
                    self._write_key(key, value, lease.file_id)
                log.warning(
                    "file discovery: lease %x expired while alive; re-registered %d key(s) on lease %x",
                    old, len(lease.keys), lease.file_id,
                )  # fmt: skip
                self._wake.set()
            except OSError as exc:
                log.warning("file discovery: cannot touch lease %x: %s", lease.file_id, exc)

    def _drop_lease_files(self, file_id: int, keys: dict[str, bytes]) -> None:
        for key in keys:
            self._unlink_if_lease(self._keys_dir / _key_filename(key), file_id)
        with contextlib.suppress(FileNotFoundError):
            (self._leases_dir / f"{file_id:x}").unlink()

    # -- keys -----------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        self._check_open()
        if not key:
            raise ValueError("discovery key must not be empty")
        file_lease = 0
        lease = None
        if lease_id is not None:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise DiscoveryError(f"lease {lease_id:x} was not granted by this store (or was revoked)")
            file_lease = lease.file_id
        self._write_key(key, bytes(value), file_lease)
        self._forget(key)
        if lease is not None:
            lease.keys[key] = bytes(value)
        self._wake.set()

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        record = self._read_key(self._keys_dir / _key_filename(key))
        if record is None or not self._lease_alive(record.lease):
            return None
        return record.value

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        return {
            seen.key: seen.record.value
            for seen in self._read_all().values()
            if seen.key.startswith(prefix) and self._lease_alive(seen.record.lease)
        }

    async def delete(self, key: str) -> None:
        self._check_open()
        self._forget(key)
        with contextlib.suppress(FileNotFoundError):
            (self._keys_dir / _key_filename(key)).unlink()
        self._wake.set()

    def _forget(self, key: str) -> None:
        for lease in self._leases.values():
            lease.keys.pop(key, None)

    # -- watches --------------------------------------------------------------------------
    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        self._check_open()
        if self._poller is None:
            raise DiscoveryError("store not started: call start() first")
        return self._watch(prefix)

    async def _watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        watcher = _Watcher(prefix)
        async with self._scan_lock:
            await self._scan_locked()
            snapshot = sorted((s.key, s.record.value) for s in self._seen.values() if s.key.startswith(prefix))
            self._watchers.add(watcher)
        try:
            for key, value in snapshot:
                yield WatchEvent(WatchEventKind.PUT, key, value)
            while True:
                event = await watcher.queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._watchers.discard(watcher)

    async def _poll_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands
            # as the wake-up fires, and close() would wait on this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with self._scan_lock:
                    await self._scan_locked()
            except OSError as exc:
                log.warning("file discovery: scan of %s failed: %s", self.root, exc)

    async def _scan_locked(self) -> None:
        """Reap expired leases, then tell watchers what changed since the last scan."""
        self._reap_expired()
        current = self._read_all()
        events: list[WatchEvent] = []
        for name in sorted(self._seen.keys() - current.keys()):
            events.append(WatchEvent(WatchEventKind.DELETE, self._seen[name].key, None))
        for name, seen in sorted(current.items()):
            old = self._seen.get(name)
            if old is None or old.sig != seen.sig:
                if old is not None and old.record.value == seen.record.value:
                    continue  # re-written with the same value (a lease change): nothing to tell
                events.append(WatchEvent(WatchEventKind.PUT, seen.key, seen.record.value))
        self._seen = current
        for event in events:
            for watcher in self._watchers:
                if event.key.startswith(watcher.prefix):
                    watcher.queue.put_nowait(event)

    def _reap_expired(self) -> None:
        now = time.time()
        expired: set[int] = set()
        live: set[int] = set()
        for entry in _scandir(self._leases_dir):
            try:
                file_id = int(entry.name, 16)
                lease_record = _lease_decoder.decode(Path(entry.path).read_bytes())
                mtime = entry.stat().st_mtime
            except (ValueError, msgspec.DecodeError, FileNotFoundError):
                continue
            (expired if mtime + lease_record.ttl_s < now else live).add(file_id)
        for file_id in expired:
            log.info("file discovery: lease %x expired; removing its keys", file_id)
        for entry in _scandir(self._keys_dir):
            record = self._read_key(Path(entry.path))
            if record is None or record.lease == 0 or record.lease in live:
                continue
            if record.lease in expired:
                self._unlink_if_lease(Path(entry.path), record.lease)
            elif not (self._leases_dir / f"{record.lease:x}").exists():
                # The lease file is gone (a reaper died midway): an orphan. Checked now, not
                # from the listing above, because a holder writes its lease file before its keys.
                self._unlink_if_lease(Path(entry.path), record.lease)
        for file_id in expired:
            with contextlib.suppress(FileNotFoundError):
                (self._leases_dir / f"{file_id:x}").unlink()

    # -- files ----------------------------------------------------------------------------
    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = self._tmp_dir / f"{path.name[:200]}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise DiscoveryError(f"file discovery: cannot write {path}: {exc}") from exc

    def _write_key(self, key: str, value: bytes, file_lease: int) -> None:
        path = self._keys_dir / _key_filename(key)
        self._write_atomic(path, _key_encoder.encode(_KeyRecord(value=value, lease=file_lease)))

    def _unlink_if_lease(self, path: Path, file_lease: int) -> None:
        record = self._read_key(path)
        if record is not None and record.lease == file_lease:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @staticmethod
    def _read_key(path: Path) -> _KeyRecord | None:
        try:
            return _key_decoder.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except msgspec.DecodeError:
            log.warning("file discovery: ignoring unreadable key file %s", path)
            return None

    def _lease_alive(self, file_lease: int) -> bool:
        if file_lease == 0:
            return True
        path = self._leases_dir / f"{file_lease:x}"
        try:
            mtime = path.stat().st_mtime
            record = _lease_decoder.decode(path.read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return False
        return mtime + record.ttl_s >= time.time()

    def _read_all(self) -> dict[str, _Seen]:
        out: dict[str, _Seen] = {}
        for entry in _scandir(self._keys_dir):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            record = self._read_key(Path(entry.path))
            if record is None:
                continue
            out[entry.name] = _Seen((st.st_ino, st.st_mtime_ns, st.st_size), unquote(entry.name), record)
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise DiscoveryError("store is closed")


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_file()]
    except FileNotFoundError:
        return []
