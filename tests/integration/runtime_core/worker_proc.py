"""A worker process for the shutdown and crash tests (run as ``python worker_proc.py``).

Configured like a real worker, from the environment (discovery backend, request plane, grace
period); serves ``test.proc.count`` and owns SIGTERM/SIGINT. It also plays an engine library
that installs its own SIGTERM handler after the runtime did: that handler must run last.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from armature.runtime.context import Context
from armature.runtime.runtime import DistributedRuntime, RuntimeSettings


async def count(request: dict[str, Any], context: Context):
    for i in range(request["n"]):
        if context.is_stopped():
            return
        yield i
        await asyncio.sleep(request["interval"])


async def main() -> int:
    parser = argparse.ArgumentParser()
    RuntimeSettings.add_arguments(parser)
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    args = parser.parse_args()
    settings = RuntimeSettings.from_args(args)
    settings.lease_ttl_s = args.lease_ttl
    runtime = DistributedRuntime.from_settings(settings)
    runtime.install_signal_handlers()
    loop = asyncio.get_running_loop()
    # The "engine library" registering its own handler: deferred until the runtime is done.
    loop.add_signal_handler(
        signal.SIGTERM,
        lambda: print(f"ENGINE-HANDLER-RAN open_streams={len(runtime.dispatcher.streams)}", flush=True),
    )
    endpoint = runtime.endpoint("test.proc.count")
    await endpoint.start_serving(count)
    print(f"READY {runtime.instance_id:x}", flush=True)
    await runtime.wait_closed()
    print("SERVE-RETURNED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
