"""Wires a native engine into disaggregated serving: its bootstrap server or its KV puller.

``DisaggLink.attach(engine, config)`` is called once the engine's step loop runs; it connects
the ``DisaggScheduler`` to the network side and publishes the bootstrap address in
``engine.info`` (the worker puts it on its prefill model card).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from armature.engine.api import EngineError
from armature.engine.disagg.bootstrap import BootstrapServer
from armature.engine.disagg.config import DisaggConfig, DisaggMode
from armature.engine.disagg.kv_pages import layout_of
from armature.engine.disagg.puller import KvPuller, PullResult
from armature.engine.disagg.scheduler import DisaggScheduler, PrefillHooks

if TYPE_CHECKING:
    from armature.engine.engine import ThreadedEngine

log = logging.getLogger(__name__)


class DisaggLink:
    def __init__(self, engine: ThreadedEngine, config: DisaggConfig) -> None:
        sched = engine.scheduler
        if not isinstance(sched, DisaggScheduler):
            raise TypeError("a disaggregated engine needs a DisaggScheduler")
        self.config = config
        self.scheduler = sched
        self.server: BootstrapServer | None = None
        self.puller: KvPuller | None = None
        layout = layout_of(sched.pool)
        if config.mode is DisaggMode.PREFILL:

            def abort_request(rid: str, reason: str) -> None:
                # Runs on the bootstrap loop; the engine's abort only enqueues a command.
                sched.abort_reasons[rid] = reason
                asyncio.get_running_loop().create_task(engine.abort(rid))

            def delivered(rid: str) -> None:
                with contextlib.suppress(EngineError):  # shut down meanwhile: nobody waits
                    engine.run_in_loop(lambda: sched.delivered(rid))

            server = BootstrapServer(
                layout,
                abort_request,
                delivered,
                config.bootstrap_host,
                config.bootstrap_port,
                config.bootstrap_timeout_s,
            )
            sched.prefill_hooks = PrefillHooks(
                open_room=server.open_room_threadsafe,
                stage=server.stage_threadsafe,
                fail=server.fail_threadsafe,
                shm_target=server.shm_target,
            )
            self.server = server
            engine.info.bootstrap_host = advertised_host(server.host)
            engine.info.bootstrap_port = server.port
        else:

            def on_done(result: PullResult) -> None:
                # Raises EngineError once the engine is shut down; the puller then frees the KV.
                engine.run_in_loop(lambda: sched.pull_done(result))

            puller = KvPuller(config, layout, on_done)
            self.puller = puller
            sched.start_pull = puller.start_threadsafe
            sched.cancel_pull = puller.cancel_threadsafe

    @classmethod
    def attach(cls, engine: ThreadedEngine, config: DisaggConfig) -> DisaggLink:
        return cls(engine, config)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.puller is not None:
            self.puller.close()



def advertised_host(bind_host: str) -> str:
    """The address decode workers should dial: the bind address, or this host's for a wildcard."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
