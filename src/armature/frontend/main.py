"""Run the frontend: runtime (discovery + request plane client) → ``Frontend`` → ``HttpServer``."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from armature.frontend.args import FrontendArgs, parse_args
from armature.frontend.busy import LoadBoards, WorkerLoadGauges
from armature.frontend.http_server import HttpServer, tls_context
from armature.frontend.metrics import FrontendMetrics
from armature.frontend.models import DiscoveryModelSource
from armature.frontend.processes import FrontendProcesses
from armature.frontend.server import Frontend
from armature.protocols.llm import LLMEngineOutput
from armature.router.kv.metrics import RouterMetrics
from armature.router.kv_binding import kv_router_factory
from armature.router.push import EndpointClient, RouterMode
from armature.runtime.runtime import DistributedRuntime

log = logging.getLogger("armature.frontend")


def runtime_client_factory(runtime: DistributedRuntime):  # noqa: ANN201 - ClientFactory
    async def factory(path: str, response_type: type = LLMEngineOutput) -> EndpointClient:
        return await runtime.endpoint(path).client(response_type)

    return factory


def build_frontend(runtime: DistributedRuntime, args: FrontendArgs) -> Frontend:
    source = DiscoveryModelSource(runtime.discovery, args.namespace, args.namespace_prefix)
    metrics = FrontendMetrics(args.metrics_prefix)
    router_factory = None
    if args.router_mode is RouterMode.KV:
        # armature_router_* on the frontend's /metrics, one set shared by every model's router.
        router_factory = kv_router_factory(runtime, args.kv_router, RouterMetrics(metrics.registry))
    # Busy detection reads the workers' load events, subscribed per component when first enabled.
    boards = LoadBoards(runtime.events, WorkerLoadGauges(metrics.registry, args.metrics_prefix))
    return Frontend(
        source, runtime_client_factory(runtime), args.frontend_config(), metrics, router_factory, boards
    )


def http_server(frontend: Frontend, args: FrontendArgs) -> HttpServer:
    return HttpServer(
        frontend,
        host=args.http_host,
        port=args.http_port,
        ssl_context=tls_context(args.tls_cert_path, args.tls_key_path),
        graceful_timeout_s=max(1.0, float(args.graceful_shutdown_timeout_s)),
        reuse_port=args.http_processes > 1,
        stream_write_interval_s=args.stream_write_interval_ms / 1000.0,
    )


async def serve(args: FrontendArgs, argv: Sequence[str] = ()) -> int:
    runtime = DistributedRuntime.from_settings(args.runtime)
    await runtime.start()
    frontend = build_frontend(runtime, args)
    await frontend.start()
    server = http_server(frontend, args)
    group = FrontendProcesses(args.http_processes, argv, frontend.metrics.render) if args.http_processes > 1 else None
    others_ok = True
    try:
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", args.http_host, args.http_port, exc)
            return 1
        if group is not None:
            await group.start(server)
            frontend.metrics_page = group.peers.render
        if group is None or group.first:
            scheme = "https" if args.tls_cert_path else "http"
            log.info("frontend listening on %s://%s:%d (router %s%s)", scheme, args.http_host, args.http_port,
                     args.router_mode.value, f", {args.http_processes} processes" if group else "")  # fmt: skip
        # What lives now lives as long as the process: full collections need not walk it again.
        gc.freeze()
        # The server owns SIGTERM/SIGINT here: it stops accepting, lets requests finish within the
        # graceful timeout, then returns.
        await server.serve(signals=group.signals if group is not None else (signal.SIGTERM, signal.SIGINT))
    finally:
        frontend.draining = True
        if group is not None:
            others_ok = await group.stop(server.graceful_timeout_s)
        await frontend.stop()
        await runtime.shutdown(grace_period_s=0.0)
    return 0 if server.started and others_ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        import uvloop

        return int(uvloop.run(serve(args, argv)))
    except ImportError:
        return int(asyncio.run(serve(args, argv)))
