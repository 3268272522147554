"""etcd v3 discovery over gRPC (etcd3aio's KV and lease services on our own channel).

Survives losing etcd. The lease id a caller holds is a stable handle; behind it sits the current
etcd lease. When etcd comes back without the lease (it was wiped, or the outage outlived the
TTL), the keep-alive grants a new lease and re-puts every key this process put on the handle.
Watches do not trust etcd revisions across a reconnect (a wiped etcd restarts them at 1): each
reconnect re-reads the prefix, reports the difference from what the watcher last saw as
DELETEs and PUTs, and then watches from the snapshot's revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import EtcdError, prefix_range_end

# etcd3aio keeps its generated stubs in a private module; the version is pinned in pyproject.
from etcd3aio._protobuf import LeaseKeepAliveRequest, LeaseStub, WatchCreateRequest, WatchRequest, WatchStub
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from armature.runtime.discovery.base import (
    DEFAULT_LEASE_TTL_S,
    DiscoveryError,
    KeyValueStore,
    WatchEvent,
    WatchEventKind,
)

log = logging.getLogger(__name__)

_EVENT_PUT = 0  # mvccpb.Event.EventType
_RECONNECT_BACKOFF_S = (0.1, 2.0)  # first delay, cap


@dataclass
class _Lease:
    ttl_s: int
    etcd_id: int
    keys: dict[str, bytes] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    # Set when a new etcd lease was granted but not every key is back on it yet.
    reput_pending: bool = False


def grpc_target(endpoints: Sequence[str]) -> str:
    """A gRPC target for etcd endpoints given as URLs (``http://host:port``) or ``host:port``."""
    hostports = []
    for raw in endpoints:
        ep = raw.strip()
        if not ep:
            continue
        if "://" in ep:
            parts = urlsplit(ep)
            if parts.scheme not in ("http", "grpc"):
                raise ValueError(f"etcd endpoint {raw!r}: only plain http is supported (no TLS)")
            ep = parts.netloc
        if ep.rsplit(":", 1)[-1].isdigit() is False:
            ep = f"{ep}:2379"
        hostports.append(ep)
    if not hostports:
        raise ValueError("no etcd endpoint given")
    if len(hostports) == 1:
        return hostports[0]  # the dns resolver handles names and [v6] literals
    # Several endpoints: gRPC's static list needs addresses, so resolve names ourselves.
    addrs = []
    for hp in hostports:
        host, port = hp.rsplit(":", 1)
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), socket.AF_INET)[0][4][0])
        addrs.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    scheme = "ipv6" if all(a.startswith("[") for a in addrs) else "ipv4"
    return f"{scheme}:{','.join(addrs)}"


def _diff(old: dict[str, bytes], new: dict[str, bytes]) -> list[WatchEvent]:
    events = [WatchEvent(WatchEventKind.DELETE, k, None) for k in sorted(old.keys() - new.keys())]
    events += [WatchEvent(WatchEventKind.PUT, k, v) for k, v in sorted(new.items()) if old.get(k) != v]
    return events


class EtcdStore(KeyValueStore):
    """``KeyValueStore`` on an etcd v3 cluster."""

    def __init__(
        self,
        endpoints: Sequence[str] = ("http://127.0.0.1:2379",),
        *,
        op_timeout_s: float = 5.0,
    ) -> None:
        self._target = grpc_target(endpoints)
        self._endpoints = list(endpoints)
        self._op_timeout_s = op_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._lease_stub: LeaseStub | None = None
        self._watch_stub: WatchStub | None = None
        self._leases: dict[int, _Lease] = {}
        self._watch_calls: set[grpc.aio.StreamStreamCall] = set()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise DiscoveryError("store is closed")
        if self._channel is not None:
            return
        self._channel = grpc.aio.insecure_channel(
            self._target,
            options=[
                # Reconnect within a second or two of etcd coming back, not gRPC's 2-minute cap.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 5000),
                ("grpc.keepalive_timeout_ms", 3000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.lb_policy_name", "round_robin"),
            ],
        )
        self._kv = KVService(self._channel, max_attempts=2)
        self._lease = LeaseService(self._channel, max_attempts=2)
        self._lease_stub = LeaseStub(self._channel)
        self._watch_stub = WatchStub(self._channel)
        try:
            await self._kv.get("v1/", limit=1, keys_only=True, timeout=self._op_timeout_s)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            await self._channel.close()
            self._channel = None
            raise DiscoveryError(f"etcd at {', '.join(self._endpoints)} is not reachable: {exc}") from exc

    async def close(self, revoke: bool = True) -> None:
        """Close; ``revoke=False`` leaves the leases to expire on their TTL, as a crash would."""
        if self._closed:
            return
        self._closed = True
        for lease in self._leases.values():
            if lease.task is not None:
                lease.task.cancel()
        for lease in self._leases.values():
            if lease.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await lease.task
        if revoke and self._lease is not None:
            for lease in self._leases.values():
                with contextlib.suppress(EtcdError, grpc.aio.AioRpcError, TimeoutError):
                    await self._lease.revoke(lease.etcd_id, timeout=self._op_timeout_s)
        self._leases.clear()
        for call in list(self._watch_calls):
            call.cancel()
        if self._channel is not None:
            await self._channel.close()

    # -- leases ---------------------------------------------------------------------------
    async def grant_lease(self, ttl_s: float = DEFAULT_LEASE_TTL_S) -> int:
        lease_svc = self._services()[1]
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl_s}")
        ttl = max(1, math.ceil(ttl_s))  # etcd counts whole seconds
        resp = await self._call(lease_svc.grant(ttl, timeout=self._op_timeout_s), "grant lease")
        handle = int(resp.ID)
        lease = _Lease(ttl_s=ttl, etcd_id=handle)
        lease.task = asyncio.create_task(self._keep_alive(lease), name=f"etcd-lease-{handle:x}")
        self._leases[handle] = lease
        return handle

    async def revoke_lease(self, lease_id: int) -> None:
        lease_svc = self._services()[1]
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise DiscoveryError(f"lease {lease_id:x} was not granted by this store")
        if lease.task is not None:
            lease.task.cancel()
        await self._call(lease_svc.revoke(lease.etcd_id, timeout=self._op_timeout_s), "revoke lease")

    async def _keep_alive(self, lease: _Lease) -> None:
        interval = lease.ttl_s / 3
        backoff = _RECONNECT_BACKOFF_S[0]
        outage = False
        while True:
            await asyncio.sleep(backoff if outage else interval)
            try:
                async with asyncio.timeout(interval):  # not wait_for: it can swallow a cancel on 3.11
                    ttl = await self._keep_alive_once(lease.etcd_id)
                if ttl <= 0:
                    await self._regrant(lease)
                elif lease.reput_pending:
                    await self._reput(lease)
                if outage:
                    log.info("etcd discovery: reconnected; lease %x alive", lease.etcd_id)
                outage = False
                backoff = _RECONNECT_BACKOFF_S[0]
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError, DiscoveryError) as exc:
                if not outage:
                    log.warning("etcd discovery: lost etcd (%s); retrying", _describe(exc))
                outage = True
                backoff = min(backoff * 2, _RECONNECT_BACKOFF_S[1])

    async def _keep_alive_once(self, etcd_id: int) -> int:
        stub = self._services()[2]

        async def request() -> AsyncIterator[LeaseKeepAliveRequest]:
            yield LeaseKeepAliveRequest(ID=etcd_id)

        call = stub.LeaseKeepAlive(request())
        try:
            async for response in call:
                return int(response.TTL)
        finally:
            call.cancel()
        raise DiscoveryError("etcd closed the keep-alive stream without an answer")

    async def _regrant(self, lease: _Lease) -> None:
        """The etcd lease is gone while we live: take a new one and put our keys back."""
        lease_svc = self._services()[1]
        resp = await lease_svc.grant(lease.ttl_s, timeout=self._op_timeout_s)
        old, lease.etcd_id = lease.etcd_id, int(resp.ID)
        lease.reput_pending = True
        log.warning("etcd discovery: lease %x had expired; re-registering on lease %x", old, lease.etcd_id)
        await self._reput(lease)

    async def _reput(self, lease: _Lease) -> None:
        """Put every key of ``lease`` on its current etcd lease; retried until all succeed."""
        kv = self._services()[0]
        for key, value in list(lease.keys.items()):
            await kv.put(key, value, lease=lease.etcd_id, timeout=self._op_timeout_s)
        lease.reput_pending = False
        log.info("etcd discovery: %d key(s) back on lease %x", len(lease.keys), lease.etcd_id)

    # -- keys -----------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        kv = self._services()[0]
        if not key:
            raise ValueError("discovery key must not be empty")
        lease = None
        if lease_id is not None:
            lease = self._leases.get(lease_id)
            if lease is None:
                raise DiscoveryError(f"lease {lease_id:x} was not granted by this store (or was revoked)")
        etcd_lease = lease.etcd_id if lease is not None else 0
        try:
            await self._call(kv.put(key, bytes(value), lease=etcd_lease, timeout=self._op_timeout_s), "put")
        except DiscoveryError as exc:
            if lease is None or "lease not found" not in str(exc.__cause__):
                raise
            # etcd lost the lease before our keep-alive noticed (e.g. it was wiped): take a new
            # one now, with our other keys, rather than fail the caller.
            await self._call(self._regrant(lease), "re-grant lease")
            await self._call(kv.put(key, bytes(value), lease=lease.etcd_id, timeout=self._op_timeout_s), "put")
        self._forget(key)
        if lease is not None:
            lease.keys[key] = bytes(value)

    async def get(self, key: str) -> bytes | None:
        kv = self._services()[0]
        resp = await self._call(kv.get(key, timeout=self._op_timeout_s), "get")
        return bytes(resp.kvs[0].value) if resp.kvs else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return (await self._snapshot(prefix))[0]

    async def delete(self, key: str) -> None:
        kv = self._services()[0]
        self._forget(key)
        await self._call(kv.delete(key, timeout=self._op_timeout_s), "delete")

    def _forget(self, key: str) -> None:
        for lease in self._leases.values():
            lease.keys.pop(key, None)

    async def _snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        kv = self._services()[0]
        range_end = prefix_range_end(prefix) if prefix else b"\x00"
        resp = await self._call(
            kv.get(prefix or b"\x00", range_end=range_end, timeout=self._op_timeout_s), "get prefix"
        )
        items = {bytes(item.key).decode(): bytes(item.value) for item in resp.kvs}
        return items, int(resp.header.revision)

    # -- watches --------------------------------------------------------------------------
    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        self._services()
        return self._watch(prefix)

    async def _watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        known: dict[str, bytes] = {}
        backoff = _RECONNECT_BACKOFF_S[0]
        outage = False
        while not self._closed:
            try:
                snapshot, revision = await self._snapshot(prefix)
                for event in _diff(known, snapshot):
                    yield event
                known = snapshot
                if outage:
                    log.info("etcd discovery: watch on %r resynchronised at revision %d", prefix, revision)
                outage = False
                backoff = _RECONNECT_BACKOFF_S[0]
                async with contextlib.aclosing(self._stream(prefix, revision + 1)) as stream:
                    async for event in stream:
                        if event.kind is WatchEventKind.PUT:
                            assert event.value is not None
                            known[event.key] = event.value
                        else:
                            known.pop(event.key, None)
                        yield event
            except (EtcdError, grpc.aio.AioRpcError, DiscoveryError, TimeoutError) as exc:
                if self._closed:
                    return
                if not outage:
                    log.warning("etcd discovery: watch on %r lost (%s); resyncing", prefix, _describe(exc))
                outage = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_BACKOFF_S[1])
            except asyncio.CancelledError:
                # close() cancels the stream; a cancel of the consuming task itself propagates.
                task = asyncio.current_task()
                if self._closed and (task is None or task.cancelling() == 0):
                    return
                raise

    async def _stream(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        stub = self._services()[3]
        range_end = prefix_range_end(prefix) if prefix else b"\x00"
        hold_open: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def requests() -> AsyncIterator[WatchRequest]:
            yield WatchRequest(
                create_request=WatchCreateRequest(
                    key=prefix.encode() or b"\x00", range_end=range_end, start_revision=start_revision
                )
            )
            await hold_open  # a watch stream stays open until we cancel it

        call = stub.Watch(requests())
        self._watch_calls.add(call)
        try:
            async for response in call:
                if response.canceled or response.compact_revision > 0:
                    raise DiscoveryError(
                        f"etcd cancelled the watch ({response.cancel_reason or 'compacted'})"
                    )
                for ev in response.events:
                    key = bytes(ev.kv.key).decode()
                    if ev.type == _EVENT_PUT:
                        yield WatchEvent(WatchEventKind.PUT, key, bytes(ev.kv.value))
                    else:
                        yield WatchEvent(WatchEventKind.DELETE, key, None)
            raise DiscoveryError("etcd ended the watch stream")
        finally:
            self._watch_calls.discard(call)
            hold_open.cancel()
            call.cancel()

    # -- helpers --------------------------------------------------------------------------
    def _services(self) -> tuple[KVService, LeaseService, LeaseStub, WatchStub]:
        if self._closed:
            raise DiscoveryError("store is closed")
        if self._kv is None or self._lease is None or self._lease_stub is None or self._watch_stub is None:
            raise DiscoveryError("store not started: call start() first")
        return self._kv, self._lease, self._lease_stub, self._watch_stub

    async def _call(self, coro, what: str):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise DiscoveryError(f"etcd {what} failed: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
