"""The worker process: runtime → engine → handler → publisher → serve → register (Dynamo's order).

The endpoint starts serving before the model card is registered; requests that arrive in
between wait on the readiness gate. A failed registration shuts the engine down and the process
exits non-zero. SIGTERM/SIGINT start the runtime's graceful shutdown: leave discovery, let
in-flight streams finish within the grace period, end the rest with a migratable error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from armature.engine.api import Engine
from armature.protocols.embedding import EmbeddingRequest
from armature.protocols.llm import PreprocessedRequest
from armature.router.kv.messages import EventRangeQuery
from armature.runtime.runtime import DistributedRuntime, Endpoint, RuntimeSettings
from armature.sglang.args import ConfigError, ServingMode, WorkerConfig, parse_args
from armature.sglang.config_dump import dump_config
from armature.sglang.disagg_metrics import register_disagg_metrics
from armature.sglang.engines import create_engine
from armature.sglang.event_sink import WorkerEventSink, create_event_sink
from armature.sglang.handlers.decode import DecodeWorkerHandler
from armature.sglang.handlers.embedding import EmbeddingWorkerHandler
from armature.sglang.handlers.kv_query import QUERY_ENDPOINT, SNAPSHOT_ENDPOINT, KvQueryHandler
from armature.sglang.handlers.prefill import PrefillWorkerHandler, warm_up
from armature.sglang.health_check import decode_payload, embedding_payload
from armature.sglang.logs import configure_logging
from armature.sglang.publisher import KV_EVENTS_TOPIC, LOAD_TOPIC, WorkerPublisher
from armature.sglang.register import RegistrationError, build_model_card, register_with_readiness_gate

log = logging.getLogger("armature.sglang")

WorkerHandler = DecodeWorkerHandler | PrefillWorkerHandler | EmbeddingWorkerHandler


def runtime_settings(config: WorkerConfig) -> RuntimeSettings:
    settings = RuntimeSettings.from_env()
    settings.discovery_backend = config.dynamo.discovery_backend
    settings.request_plane = config.dynamo.request_plane
    settings.event_plane = config.dynamo.event_plane
    settings.system_port = config.dynamo.system_port if config.dynamo.system_port >= 0 else None
    settings.validate()
    return settings


@dataclass
class RunningWorker:
    """One served engine: what ``stop`` must take down."""

    config: WorkerConfig
    engine: Engine
    endpoint: Endpoint
    handler: WorkerHandler
    publisher: WorkerPublisher
    events: WorkerEventSink

    async def stop(self) -> None:
        self.handler.shutdown_event.set()
        await self.publisher.close()
        with contextlib.suppress(Exception):
            await self.events.close()
        await self.handler.cleanup()


async def _follow_shutdown(leader: DistributedRuntime, others: Sequence[DistributedRuntime]) -> None:
    """Several workers in one process (mocker --num-workers) drain together on one signal."""
    while not leader.shutting_down:
        await asyncio.sleep(0.05)
    for rt in others:
        rt.request_shutdown()


def register_engine_routes(runtime: DistributedRuntime, engine: Engine, endpoint: Endpoint) -> None:
    """Control routes on the status server (``/engine/<name>``), as Dynamo's SGLang worker has."""

    async def flush_cache(body: dict[str, Any]) -> dict[str, Any]:
        return {"status": "ok" if await engine.flush_cache() else "error"}

    async def start_profile(body: dict[str, Any]) -> dict[str, Any]:
        await engine.start_profile()
        return {"status": "ok"}

    async def stop_profile(body: dict[str, Any]) -> dict[str, Any]:
        path = await engine.stop_profile()
        return {"status": "ok", **({"path": path} if path else {})}

    async def release_memory(body: dict[str, Any]) -> dict[str, Any]:
        # Leave discovery first so no new request lands on a worker without memory.
        await endpoint.unregister_instance()
        await engine.release_memory(body.get("tags"))
        return {"status": "ok", "message": "memory released; instance unregistered"}

    async def resume_memory(body: dict[str, Any]) -> dict[str, Any]:
        await engine.resume_memory(body.get("tags"))
        await endpoint.register_instance()
        return {"status": "ok", "message": "memory resumed; instance registered"}

    async def update_weights_from_disk(body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            return {"status": "error", "message": "body needs a 'model_path' string"}
        await engine.update_weights_from_disk(path)
        return {"status": "ok"}

    for name, route in (
        ("flush_cache", flush_cache),
        ("start_profile", start_profile),
        ("stop_profile", stop_profile),
        ("release_memory_occupation", release_memory),
        ("resume_memory_occupation", resume_memory),
        ("update_weights_from_disk", update_weights_from_disk),
    ):
        runtime.register_engine_route(name, route)


async def serve_kv_queries(runtime: DistributedRuntime, config: WorkerConfig, publisher: WorkerPublisher) -> None:
    """The local-indexer endpoints the KV router uses to recover missed events."""
    queries = KvQueryHandler(publisher.local_indexer)
    ns, component = config.endpoint.namespace, config.endpoint.component
    await runtime.endpoint(f"{ns}.{component}.{QUERY_ENDPOINT}").start_serving(
        queries.events, request_type=EventRangeQuery
    )
    await runtime.endpoint(f"{ns}.{component}.{SNAPSHOT_ENDPOINT}").start_serving(queries.snapshot)


async def start_worker(runtime: DistributedRuntime, config: WorkerConfig, engine: Engine) -> RunningWorker:
    """Handler, publisher, serve, register. Raises ``RegistrationError`` if the card cannot be published."""
    endpoint = runtime.endpoint(str(config.endpoint))
    ready = asyncio.Event()
    handler: WorkerHandler
    if config.dynamo.embedding_worker:
        handler = EmbeddingWorkerHandler(engine, ready, asyncio.Event())
    elif config.serving_mode is ServingMode.PREFILL:
        handler = PrefillWorkerHandler(engine, ready, asyncio.Event())
    else:
        handler = DecodeWorkerHandler(engine, ready, asyncio.Event())
        # SGLang's decode mode cannot prefill; the native engine serves such requests aggregated.
        handler.require_bootstrap = config.serving_mode is ServingMode.DECODE and config.engine == "sglang"
    register_engine_routes(runtime, engine, endpoint)
    events = await create_event_sink(runtime, config.endpoint)
    await events.open([KV_EVENTS_TOPIC, LOAD_TOPIC])
    publisher = WorkerPublisher(
        engine,
        runtime.instance_id,
        events.publish,
        runtime.metrics.registry,
        model=config.server.served_model_name,
        component=config.endpoint.component,
    )
    publisher.start()
    register_disagg_metrics(
        runtime.metrics.registry, engine, config.serving_mode.value, config.server.disaggregation_transfer_backend or ""
    )
    worker = RunningWorker(config, engine, endpoint, handler, publisher, events)
    try:
        card = build_model_card(config, engine.info)
        embedding = isinstance(handler, EmbeddingWorkerHandler)
        payload = (embedding_payload if embedding else decode_payload)(
            config.server.served_model_name, engine.info.bos_token_id
        )
        await endpoint.start_serving(
            handler.generate,
            graceful_shutdown=True,
            health_check_payload=payload,
            request_type=EmbeddingRequest if embedding else PreprocessedRequest,
            # Engines that can call back (native, mocker): no task wake-up per token.
            push_handler=handler.generate_push if isinstance(handler, DecodeWorkerHandler) and handler.can_push else None,
        )
        await serve_kv_queries(runtime, config, publisher)
        if config.serving_mode is ServingMode.PREFILL:
            await warm_up(engine)
        await register_with_readiness_gate(lambda: endpoint.register_model(card), ready, engine)
    except BaseException:
        await publisher.close()
        with contextlib.suppress(Exception):
            await events.close()
        with contextlib.suppress(Exception):
            await engine.shutdown()
        raise
    status = runtime.status.url if runtime.status is not None else "off (set --system-port / DYN_SYSTEM_PORT)"
    log.info(
        "worker ready: model=%s engine=%s endpoint=%s instance=%x status=%s",
        config.server.served_model_name, config.engine, config.endpoint.url, runtime.instance_id, status,
    )
    return worker


async def run_workers(configs: Sequence[WorkerConfig]) -> int:
    """Serve one engine per config, each on its own runtime (its own instance), until a signal."""
    runtimes = [DistributedRuntime.from_settings(runtime_settings(c)) for c in configs]
    for rt in runtimes:
        await rt.start()
    runtimes[0].install_signal_handlers()
    follower = asyncio.create_task(_follow_shutdown(runtimes[0], runtimes[1:])) if len(runtimes) > 1 else None
    if configs[0].dynamo.discovery_backend == "mem":
        log.warning("--discovery-backend mem: only this process can find the worker; use file or etcd")
    workers: list[RunningWorker] = []

    async def launch(rt: DistributedRuntime, config: WorkerConfig) -> None:
        startup = float(config.engine_extra.get("startup_time_s") or 0.0)
        if startup > 0:
            # The mocker's --startup-time: look like a worker that takes this long to load.
            await asyncio.sleep(startup)
        engine = await create_engine(config)
        if rt.shutting_down:
            # A signal arrived while the model loaded: nothing was served, nothing to drain.
            await engine.shutdown()
            return
        workers.append(await start_worker(rt, config, engine))

    try:
        # Workers of one process start side by side, as separate processes would.
        results = await asyncio.gather(
            *(launch(rt, c) for rt, c in zip(runtimes, configs, strict=True)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if isinstance(err, (RegistrationError, ConfigError)):
                log.error("%s", err)
            else:
                log.error("worker failed to start: %s", err, exc_info=err)
        if errors:
            return 1
        # Everything alive now (modules, the engine, the model) lives as long as the process: keep
        # the collector from walking it again. Without this every full collection re-scanned the
        # imported libraries' objects, ~9% of a serving mocker worker's CPU.
        gc.freeze()
        for rt in runtimes:
            await rt.wait_closed()
        return 0
    finally:
        if follower is not None:
            follower.cancel()
        for worker in workers:
            await worker.stop()
        for rt in runtimes:
            if not rt.shutting_down:
                await rt.shutdown(grace_period_s=0.0)


def mocker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m armature.mocker``: the same worker on the simulated engine."""
    from armature.sglang.mocker_args import parse_mocker_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        configs = parse_mocker_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(configs[0].log_level)
    return run_async(run_workers(configs))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    dump_config(config.dynamo.dump_config_to, config)
    return run_async(run_workers([config]))


def run_async(coro: Any) -> int:
    # uvloop when present (uvicorn[standard] brings it): the request plane's per-frame path is
    # cheaper on it.
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))
