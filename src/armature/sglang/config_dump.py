"""``--dump-config-to``: the resolved worker configuration plus the facts needed to reproduce it.

Shaped like Dynamo's dump (system info, relevant environment, config, runtime info, version,
installed packages). Without the flag the same document is logged at DEBUG level only.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import armature
from armature.sglang.args import WorkerConfig

log = logging.getLogger(__name__)

ENV_PREFIXES = ("DYN_", "SGL_", "SGLANG_", "ARMATURE_", "CUDA_", "PYTHONHASHSEED", "HF_HUB_OFFLINE")
# Values of these never leave the process, even into a local file a user may share.
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL", "AUTH")
PACKAGES = ("armature", "torch", "transformers", "tokenizers", "msgspec", "pyzmq", "nats-py", "sglang")


def _environment() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in sorted(os.environ.items()):
        if not name.startswith(ENV_PREFIXES):
            continue
        out[name] = "<redacted>" if any(m in name.upper() for m in SECRET_MARKERS) else value
    return out


def _packages() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_dump(config: WorkerConfig) -> dict[str, Any]:
    return {
        "system_info": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
        },
        "environment": _environment(),
        "config": config.to_json_dict(),
        "runtime_info": {"pid": os.getpid(), "cwd": os.getcwd(), "argv": list(sys.argv)},
        "armature_version": armature.__version__,
        "installed_packages": _packages(),
    }


def dump_config(path: str | None, config: WorkerConfig) -> None:
    """Write the dump to ``path``; with no path, log it when DEBUG logging is on."""
    if path is None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("worker config: %s", json.dumps(build_dump(config), sort_keys=True))
        return
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(build_dump(config), indent=2, sort_keys=True) + "\n")
    log.info("wrote config dump to %s", target)
