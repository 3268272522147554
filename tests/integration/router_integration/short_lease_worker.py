"""A mocker worker process whose discovery lease lasts ``--lease-ttl`` seconds (tests only).

``python -m armature.mocker`` keeps the runtime's default 10 s lease; the crash tests want a
SIGKILLed worker to vanish from discovery sooner, so this starts the same worker
(``armature.sglang.main.start_worker``) on a runtime with a short lease.

    python short_lease_worker.py --lease-ttl 2 -- <python -m armature.mocker flags>
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from armature.runtime.runtime import DistributedRuntime
from armature.sglang.engines import create_engine
from armature.sglang.logs import configure_logging
from armature.sglang.main import runtime_settings, start_worker
from armature.sglang.mocker_args import parse_mocker_args


async def serve(ttl: float, argv: list[str]) -> int:
    (config,) = parse_mocker_args(argv)
    configure_logging(config.log_level)
    settings = runtime_settings(config)
    settings.lease_ttl_s = ttl
    runtime = DistributedRuntime.from_settings(settings)
    await runtime.start()
    runtime.install_signal_handlers()
    engine = await create_engine(config)
    worker = await start_worker(runtime, config, engine)
    try:
        await runtime.wait_closed()
    finally:
        await worker.stop()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--lease-ttl", type=float, required=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    ns = p.parse_args()
    rest = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    return asyncio.run(serve(ns.lease_ttl, rest))


if __name__ == "__main__":
    sys.exit(main())
