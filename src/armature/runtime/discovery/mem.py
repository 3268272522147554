"""In-process discovery: one shared store per process, with real lease TTLs.

Every ``MemoryStore`` in a process shares one ``MemoryState``, so a frontend and a worker
embedded in one process (``armature serve``) see each other's keys. Leases expire exactly as in
etcd: each store keeps its own leases alive from a background task, and any started store reaps
leases whose deadline has passed, deleting their keys and telling every watcher.

The state is guarded by a thread lock and watchers are fed through their own event loop
(``call_soon_threadsafe``), because stores on different loops or threads may share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from armature.runtime.discovery.base import (
    DEFAULT_LEASE_TTL_S,
    DiscoveryError,
    KeyValueStore,
    WatchEvent,
    WatchEventKind,
)

log = logging.getLogger(__name__)

# How often a store looks for expired leases; small against any sensible TTL (>= 1 s).
REAP_INTERVAL_S = 0.1


@dataclass
class _Lease:
    ttl_s: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass
class _Entry:
    value: bytes
    lease_id: int | None


_CLOSED = object()  # sentinel that ends a watcher's iterator


class _Watcher:
    """One watch_prefix iterator: a queue fed from whichever thread changes the state."""

    def __init__(self, prefix: str, loop: asyncio.AbstractEventLoop) -> None:
        self.prefix = prefix
        self.loop = loop
        # Unbounded on purpose: discovery changes are few, and dropping one would leave a
        # watcher with a wrong view of the cluster.
        self.queue: asyncio.Queue[WatchEvent | object] = asyncio.Queue()

    def deliver(self, item: WatchEvent | object) -> bool:
        """Hand ``item`` to the watcher's loop; False when that loop is gone."""
        if self.loop.is_closed():
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.queue.put_nowait(item)
        else:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # loop closed between the check and the call
                return False
        return True


class MemoryState:
    """The data every ``MemoryStore`` of a process shares."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._leases: dict[int, _Lease] = {}
        self._watchers: list[_Watcher] = []

    # -- leases ---------------------------------------------------------------------------
    def grant(self, ttl_s: float) -> int:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        with self._lock:
            while True:
                lease_id = secrets.randbits(62) + 1
                if lease_id not in self._leases:
                    break
            self._leases[lease_id] = _Lease(ttl_s=ttl_s, deadline=time.monotonic() + ttl_s)
        return lease_id

    def restore(self, lease_id: int, ttl_s: float, entries: dict[str, bytes]) -> None:
        """Bring back an expired lease under its old id with its holder's keys."""
        with self._lock:
            self._leases[lease_id] = _Lease(ttl_s=ttl_s, deadline=time.monotonic() + ttl_s)
        for key, value in entries.items():
            self.put(key, value, lease_id)

    def keep_alive(self, lease_id: int) -> bool:
        """Push the lease's deadline out by its TTL; False if it has already gone."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            lease.deadline = time.monotonic() + lease.ttl_s
            return True

    def revoke(self, lease_id: int) -> None:
        with self._lock:
            events = self._drop_lease_locked(lease_id)
        self._publish(events)

    def reap_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [lid for lid, lease in self._leases.items() if lease.deadline <= now]
            events: list[WatchEvent] = []
            for lease_id in expired:
                events.extend(self._drop_lease_locked(lease_id))
        if expired:
            log.debug("mem discovery: %d lease(s) expired", len(expired))
        self._publish(events)

    def _drop_lease_locked(self, lease_id: int) -> list[WatchEvent]:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return []
        events = []
        for key in sorted(lease.keys):
            entry = self._entries.get(key)
            if entry is not None and entry.lease_id == lease_id:
                del self._entries[key]
                events.append(WatchEvent(WatchEventKind.DELETE, key, None))
        return events

    # -- keys -----------------------------------------------------------------------------
    def put(self, key: str, value: bytes, lease_id: int | None) -> None:
        with self._lock:
            if lease_id is not None:
                lease = self._leases.get(lease_id)
                if lease is None:
                    raise DiscoveryError(f"lease {lease_id:x} does not exist (expired or revoked)")
                lease.keys.add(key)
            old = self._entries.get(key)
            if old is not None and old.lease_id is not None and old.lease_id != lease_id:
                old_lease = self._leases.get(old.lease_id)
                if old_lease is not None:
                    old_lease.keys.discard(key)
            self._entries[key] = _Entry(value=bytes(value), lease_id=lease_id)
        self._publish([WatchEvent(WatchEventKind.PUT, key, bytes(value))])

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            return {k: e.value for k, e in self._entries.items() if k.startswith(prefix)}

    def delete(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            if entry.lease_id is not None and entry.lease_id in self._leases:
                self._leases[entry.lease_id].keys.discard(key)
        self._publish([WatchEvent(WatchEventKind.DELETE, key, None)])

    # -- watchers -------------------------------------------------------------------------
    def add_watcher(self, watcher: _Watcher) -> list[WatchEvent]:
        """Register ``watcher`` and return the snapshot it starts from, atomically."""
        with self._lock:
            snapshot = [
                WatchEvent(WatchEventKind.PUT, k, e.value)
                for k, e in sorted(self._entries.items())
                if k.startswith(watcher.prefix)
            ]
            self._watchers.append(watcher)
        return snapshot

    def remove_watcher(self, watcher: _Watcher) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._watchers.remove(watcher)

    def _publish(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        with self._lock:
            watchers = list(self._watchers)
        dead = []
        for watcher in watchers:
            for event in events:
                if event.key.startswith(watcher.prefix) and not watcher.deliver(event):
                    dead.append(watcher)
                    break
        for watcher in dead:
            self.remove_watcher(watcher)


_PROCESS_STATE = MemoryState()


def process_state() -> MemoryState:
    """The one in-process state every default ``MemoryStore`` uses."""
    return _PROCESS_STATE


class MemoryStore(KeyValueStore):
    """A ``KeyValueStore`` over the process's shared in-memory state."""

    def __init__(self, state: MemoryState | None = None) -> None:
        self._state = state if state is not None else process_state()
        self._started = False
        self._closed = False
        self._own_leases: dict[int, asyncio.Task[None]] = {}
        # What this store put on each of its leases, to put back if a lease is lost.
        self._leased_keys: dict[int, dict[str, bytes]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._watchers: set[_Watcher] = set()

    async def start(self) -> None:
        if self._closed:
            raise DiscoveryError("store is closed")
        if self._started:
            return
        self._started = True
        self._reaper = asyncio.create_task(self._reap_loop(), name="mem-discovery-reaper")

    async def close(self, revoke: bool = True) -> None:
        """Close; ``revoke=False`` leaves the leases to expire on their TTL, as a crash would."""
        if self._closed:
            return
        self._closed = True
        for lease_id, task in list(self._own_leases.items()):
            task.cancel()
            if revoke:
                self._state.revoke(lease_id)
        for task in self._own_leases.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._own_leases.clear()
        self._leased_keys.clear()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for watcher in list(self._watchers):
            self._state.remove_watcher(watcher)
            watcher.deliver(_CLOSED)
        self._watchers.clear()

    async def grant_lease(self, ttl_s: float = DEFAULT_LEASE_TTL_S) -> int:
        self._check_open()
        lease_id = self._state.grant(ttl_s)
        self._leased_keys[lease_id] = {}
        self._own_leases[lease_id] = asyncio.create_task(
            self._keep_alive(lease_id, ttl_s), name=f"mem-lease-{lease_id:x}"
        )
        return lease_id

    async def revoke_lease(self, lease_id: int) -> None:
        self._check_open()
        task = self._own_leases.pop(lease_id, None)
        if task is not None:
            task.cancel()
        self._leased_keys.pop(lease_id, None)
        self._state.revoke(lease_id)

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        self._check_open()
        _check_key(key)
        self._state.put(key, value, lease_id)
        self._forget(key)
        if lease_id is not None and lease_id in self._leased_keys:
            self._leased_keys[lease_id][key] = bytes(value)

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        return self._state.get(key)

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        return self._state.get_prefix(prefix)

    async def delete(self, key: str) -> None:
        self._check_open()
        self._forget(key)
        self._state.delete(key)

    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        self._check_open()
        return self._watch(prefix)

    async def _watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        watcher = _Watcher(prefix, asyncio.get_running_loop())
        self._watchers.add(watcher)
        try:
            for event in self._state.add_watcher(watcher):
                yield event
            while True:
                item = await watcher.queue.get()
                if item is _CLOSED:
                    return
                assert isinstance(item, WatchEvent)
                yield item
        finally:
            self._state.remove_watcher(watcher)
            self._watchers.discard(watcher)

    def _forget(self, key: str) -> None:
        for keys in self._leased_keys.values():
            keys.pop(key, None)

    async def _keep_alive(self, lease_id: int, ttl_s: float) -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            if not self._state.keep_alive(lease_id):
                # Only an event-loop stall longer than the TTL gets here. Watchers have seen the
                # DELETEs; the holder is alive, so it comes back, as after an etcd reconnect.
                log.warning("mem discovery: lease %x expired while its holder was alive; re-putting", lease_id)
                self._state.restore(lease_id, ttl_s, dict(self._leased_keys.get(lease_id, {})))

    async def _reap_loop(self) -> None:
        while True:
            self._state.reap_expired()
            await asyncio.sleep(REAP_INTERVAL_S)

    def _check_open(self) -> None:
        if self._closed:
            raise DiscoveryError("store is closed")


def _check_key(key: str) -> None:
    if not key:
        raise ValueError("discovery key must not be empty")
