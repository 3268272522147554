"""Run the frontend: runtime (discovery + request plane client) → ``Frontend`` → uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Generator, Sequence

import uvicorn

from armature.frontend.args import FrontendArgs, parse_args
from armature.frontend.metrics import FrontendMetrics
from armature.frontend.models import DiscoveryModelSource
from armature.frontend.server import Frontend
from armature.protocols.llm import LLMEngineOutput
from armature.router.kv.metrics import RouterMetrics
from armature.router.kv_binding import kv_router_factory
from armature.router.push import EndpointClient, RouterMode
from armature.runtime.runtime import DistributedRuntime

log = logging.getLogger("armature.frontend")


def runtime_client_factory(runtime: DistributedRuntime):  # noqa: ANN201 - ClientFactory
    async def factory(path: str) -> EndpointClient:
        return await runtime.endpoint(path).client(LLMEngineOutput)

    return factory


def build_frontend(runtime: DistributedRuntime, args: FrontendArgs) -> Frontend:
    source = DiscoveryModelSource(runtime.discovery, args.namespace, args.namespace_prefix)
    metrics = FrontendMetrics(args.metrics_prefix)
    router_factory = None
    if args.router_mode is RouterMode.KV:
        # armature_router_* on the frontend's /metrics, one set shared by every model's router.
        router_factory = kv_router_factory(runtime, args.kv_router, RouterMetrics(metrics.registry))
    return Frontend(source, runtime_client_factory(runtime), args.frontend_config(), metrics, router_factory)


class HttpServer(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal that stopped it.

    uvicorn shuts down gracefully on SIGTERM/SIGINT and then raises the same signal again with the
    previous handler in place, so the process dies "by signal" (exit -15) after a clean drain. The
    frontend still has its runtime to close after that, and a clean shutdown should exit 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            captured = getattr(self, "_captured_signals", None)
            if captured:
                log.info("shutting down on signal %s", ", ".join(str(s) for s in captured))
                captured.clear()


def uvicorn_config(frontend: Frontend, args: FrontendArgs) -> uvicorn.Config:
    return uvicorn.Config(
        frontend.app,
        host=args.http_host,
        port=args.http_port,
        log_level=args.log_level.lower(),
        access_log=False,
        ssl_certfile=args.tls_cert_path,
        ssl_keyfile=args.tls_key_path,
        timeout_graceful_shutdown=max(1, int(args.graceful_shutdown_timeout_s)),
        lifespan="off",
    )


async def serve(args: FrontendArgs) -> int:
    runtime = DistributedRuntime.from_settings(args.runtime)
    await runtime.start()
    frontend = build_frontend(runtime, args)
    await frontend.start()
    server = HttpServer(uvicorn_config(frontend, args))
    scheme = "https" if args.tls_cert_path else "http"
    log.info("frontend listening on %s://%s:%d (router %s)", scheme, args.http_host, args.http_port, args.router_mode.value)
    try:
        # uvicorn owns SIGTERM/SIGINT here: it stops accepting, lets requests finish within the
        # graceful timeout, then returns.
        await server.serve()
    finally:
        frontend.draining = True
        await frontend.stop()
        await runtime.shutdown(grace_period_s=0.0)
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        import uvloop

        return int(uvloop.run(serve(args)))
    except ImportError:
        return int(asyncio.run(serve(args)))
