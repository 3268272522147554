"""The discovery contract: a key-value store with leases and prefix watches.

Every key a process writes hangs on that process's lease. The store keeps the lease alive in
the background; when the process dies (no keep-alive for ``ttl`` seconds) its keys vanish and
every watcher sees a DELETE. Backends that can lose their server (etcd) re-create the lease and
re-put the process's keys after reconnecting, so callers never re-register by hand.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum

DEFAULT_LEASE_TTL_S = 10.0


class WatchEventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    kind: WatchEventKind
    key: str
    value: bytes | None  # None for DELETE


class DiscoveryError(RuntimeError):
    """The store could not be reached or refused an operation."""


class KeyValueStore(abc.ABC):
    """Async key-value store with leases; one instance per process."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Revoke this process's leases (its keys vanish at once) and disconnect."""

    @abc.abstractmethod
    async def grant_lease(self, ttl_s: float = DEFAULT_LEASE_TTL_S) -> int:
        """Create a lease kept alive in the background until ``revoke_lease`` or ``close``."""

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None:
        """Drop the lease and every key attached to it."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None: ...

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Yield a PUT for every existing key under ``prefix``, then changes as they happen.

        After a reconnect the watcher resynchronises: keys that vanished meanwhile are reported
        as DELETEs, new or changed ones as PUTs. The iterator ends when the store closes.
        """


# Key layout (DESIGN.md §4). Instance ids are printed in lowercase hex.
def instance_key(ns: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"v1/instances/{ns}/{component}/{endpoint}/{instance_id:x}"


def model_card_key(ns: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"v1/mdc/{ns}/{component}/{endpoint}/{instance_id:x}"


def event_channel_key(ns: str, component: str, topic: str, publisher_id: int) -> str:
    return f"v1/event_channels/{ns}/{component}/{topic}/{publisher_id:x}"
