"""Runtimes wired to one shared discovery, over the TCP plane or a real nats-server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from armature.runtime.discovery.mem import MemoryState, MemoryStore
from armature.runtime.runtime import DistributedRuntime

REQUEST_PLANES = ("tcp", "nats")


@dataclass
class Plane:
    """Makes runtimes ("processes") that see each other, all on one request plane."""

    kind: str
    nats_url: str | None
    state: MemoryState = field(default_factory=MemoryState)
    made: list[DistributedRuntime] = field(default_factory=list)

    def runtime(self, **kwargs: Any) -> DistributedRuntime:
        rt = DistributedRuntime(MemoryStore(self.state), self.kind, nats_url=self.nats_url, **kwargs)
        self.made.append(rt)
        return rt
