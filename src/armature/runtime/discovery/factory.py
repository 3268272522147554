"""Pick a discovery backend from a flag value or the environment.

Precedence: the explicit ``backend`` argument (``--discovery-backend``), then
``ARMATURE_DISCOVERY_BACKEND``, then Dynamo's ``DYN_DISCOVERY_BACKEND``, then ``mem``.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from armature.runtime.discovery.base import KeyValueStore

DISCOVERY_BACKENDS = ("mem", "file", "etcd")
DEFAULT_DISCOVERY_BACKEND = "mem"
DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"


def discovery_backend_name(backend: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The backend to use: ``backend`` if given, else the environment, else ``mem``."""
    env = os.environ if env is None else env
    name = backend or env.get("ARMATURE_DISCOVERY_BACKEND") or env.get("DYN_DISCOVERY_BACKEND")
    name = (name or DEFAULT_DISCOVERY_BACKEND).strip().lower()
    if name not in DISCOVERY_BACKENDS:
        raise ValueError(
            f"unknown discovery backend {name!r}; choose one of {', '.join(DISCOVERY_BACKENDS)}"
        )
    return name


def etcd_endpoints(env: Mapping[str, str] | None = None) -> list[str]:
    """``ETCD_ENDPOINTS`` as a list (comma separated), default ``http://127.0.0.1:2379``."""
    env = os.environ if env is None else env
    raw = env.get("ETCD_ENDPOINTS") or DEFAULT_ETCD_ENDPOINT
    endpoints = [e.strip() for e in raw.split(",") if e.strip()]
    if not endpoints:
        raise ValueError(f"ETCD_ENDPOINTS={raw!r} names no endpoint")
    return endpoints


def file_kv_root(env: Mapping[str, str] | None = None) -> Path:
    """``ARMATURE_FILE_KV`` (or ``DYN_FILE_KV``), else a per-user folder in the temp dir.

    Per user, so two users of one machine do not see (or fail to write) each other's keys.
    """
    env = os.environ if env is None else env
    raw = env.get("ARMATURE_FILE_KV") or env.get("DYN_FILE_KV")
    if raw:
        return Path(raw).expanduser()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"armature_kv_{user}"


def create_store(backend: str | None = None, **opts: Any) -> KeyValueStore:
    """Build (not start) the store for ``backend``; ``opts`` go to the backend's constructor.

    mem: ``state`` (defaults to the process-wide one). file: ``root``, ``poll_interval_s``.
    etcd: ``endpoints``, plus client timeouts.
    """
    name = discovery_backend_name(backend)
    if name == "mem":
        from armature.runtime.discovery.mem import MemoryStore

        return MemoryStore(**opts)
    if name == "file":
        from armature.runtime.discovery.file import FileStore

        opts.setdefault("root", file_kv_root())
        return FileStore(**opts)
    from armature.runtime.discovery.etcd import EtcdStore

    opts.setdefault("endpoints", etcd_endpoints())
    return EtcdStore(**opts)
