"""How the planner's decisions take effect.

- ``LocalConnector`` (``--environment local``): starts and stops worker processes on this host
  from a command line. It stops only workers it started, newest first, with SIGTERM, so they
  leave discovery and drain their requests. It stops all of them when the planner exits.
- ``VirtualConnector`` (``--environment virtual``, Dynamo's): publishes each decision in the
  discovery store for an orchestrator to carry out. It issues no new decision until the last
  one is acknowledged, or has waited ``ack_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from armature.runtime.discovery.base import KeyValueStore

log = logging.getLogger(__name__)


class Connector(Protocol):
    async def scale(self, component: str, target: int, current: int) -> None: ...

    def ready(self) -> bool:
        """False while an earlier decision is still being carried out."""
        ...

    async def close(self) -> None: ...


@dataclass
class LocalConnector:
    commands: dict[str, list[str]]  # component -> argv of one worker
    log_dir: Path
    stop_timeout_s: float = 30.0
    _procs: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)
    _stopping: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: dict[int, Path] = field(default_factory=dict)
    deaths: int = 0  # workers it started that exited unasked

    def ready(self) -> bool:
        self._stopping = [p for p in self._stopping if p.poll() is None]
        self._reap()
        return not self._stopping

    def _reap(self) -> None:
        """Forget workers that exited without being asked to, and say where their logs are."""
        for component, own in self._procs.items():
            for p in [p for p in own if p.poll() is not None]:
                own.remove(p)
                self.deaths += 1
                log.error("%s worker pid %d exited with code %s; its log: %s", component, p.pid, p.returncode,
                          self._logs.pop(p.pid, "?"))  # fmt: skip

    async def scale(self, component: str, target: int, current: int) -> None:
        self._reap()
        own = self._procs.setdefault(component, [])
        for _ in range(max(0, target - current)):
            own.append(self._start(component))
        for _ in range(max(0, current - target)):
            if not own:
                log.warning("%s: %d workers above target, but none started by this planner to stop", component,
                            current - target)  # fmt: skip
                break
            proc = own.pop()
            log.info("stopping %s worker pid %d", component, proc.pid)
            proc.send_signal(signal.SIGTERM)
            self._stopping.append(proc)

    def _start(self, component: str) -> subprocess.Popen[bytes]:
        argv = self.commands.get(component)
        if not argv:
            raise ValueError(f"no worker command for component {component!r}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{component}-{time.time_ns()}.log"
        with path.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        self._logs[proc.pid] = path
        log.info("started %s worker pid %d (log %s)", component, proc.pid, path)
        return proc

    async def close(self) -> None:
        procs = [p for own in self._procs.values() for p in own] + self._stopping
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for p in procs:
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(Exception):
                    p.wait(5)


class VirtualConnector:
    """Decisions in ``v1/planner/{namespace}/decision``; acknowledgements in ``…/scaled``.

    decision: ``{"decision_id": n, "targets": {component: replicas}}``
    acknowledgement (written by the orchestrator): ``{"decision_id": n}``
    """

    def __init__(self, store: KeyValueStore, namespace: str, ack_timeout_s: float = 1800.0) -> None:
        self._store = store
        self._key = f"v1/planner/{namespace}/decision"
        self._ack_key = f"v1/planner/{namespace}/scaled"
        self._ack_timeout_s = ack_timeout_s
        self._decision_id = 0
        self._targets: dict[str, int] = {}
        self._issued_at = 0.0
        self._acked = True

    def ready(self) -> bool:
        return self._acked or time.monotonic() - self._issued_at > self._ack_timeout_s

    async def refresh(self) -> None:
        raw = await self._store.get(self._ack_key)
        if raw is not None:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                self._acked = int(json.loads(raw).get("decision_id", -1)) >= self._decision_id

    async def scale(self, component: str, target: int, current: int) -> None:
        self._targets[component] = target
        self._decision_id += 1
        body = {"decision_id": self._decision_id, "targets": dict(self._targets)}
        await self._store.put(self._key, json.dumps(body).encode())
        self._issued_at = time.monotonic()
        self._acked = False
        log.info("decision %d: %s", self._decision_id, body["targets"])

    async def close(self) -> None:
        return None
