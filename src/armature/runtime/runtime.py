"""The distributed runtime's object model: runtime → namespace → component → endpoint → client.

One ``DistributedRuntime`` per process. It owns the process's discovery lease, its instance id,
one request-plane server (shared by every endpoint it serves), the request-plane clients, the
status server and the graceful-shutdown chain. Everything above the runtime (frontend, router,
workers) talks to other processes only through this API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import random
import secrets
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from armature.protocols.model_card import ModelCard
from armature.runtime.context import Context
from armature.runtime.discovery.base import (
    DEFAULT_LEASE_TTL_S,
    KeyValueStore,
    WatchEventKind,
    instance_key,
    model_card_key,
)
from armature.runtime.metrics import RuntimeMetrics
from armature.runtime.request_plane.base import (
    ClientTransport,
    ErrorKind,
    Instance,
    PlaneTimeouts,
    RequestPlaneError,
    ServerTransport,
    TransportInfo,
)
from armature.runtime.request_plane.dispatcher import Dispatcher, PushHandler, RequestHandler, ServedEndpoint
from armature.runtime.request_plane.stream import ResponseStream
from armature.runtime.status import (
    CanaryConfig,
    EngineRoute,
    HealthState,
    StatusServer,
    run_canary,
    system_host_from_env,
    system_port_from_env,
)

log = logging.getLogger(__name__)

REQUEST_PLANES = ("tcp", "nats")
EVENT_PLANES = ("zmq", "nats")
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_GRACE_PERIOD_S = 5.0
_json_encoder = msgspec.json.Encoder()
_instance_decoder = msgspec.json.Decoder(Instance)
_any_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return None


def grace_period_from_env(env: Mapping[str, str] | None = None) -> float:
    """``ARMATURE_/DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS``; invalid → 5 s, negative → 0 (as Dynamo)."""
    env = os.environ if env is None else env
    raw = _env(env, "ARMATURE_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS")
    if raw is None:
        return DEFAULT_GRACE_PERIOD_S
    try:
        value = float(raw)
    except ValueError:
        log.warning("grace period %r is not a number; using %s s", raw, DEFAULT_GRACE_PERIOD_S)
        return DEFAULT_GRACE_PERIOD_S
    return max(0.0, value)


def parse_endpoint_path(path: str) -> tuple[str, str, str]:
    """``"ns.component.endpoint"`` or ``"dyn://ns.component.endpoint"`` → its three parts."""
    raw = path
    for scheme in ("dyn://", "armature://"):
        if path.startswith(scheme):
            path = path[len(scheme) :]
    parts = path.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"endpoint {raw!r} must look like 'namespace.component.endpoint' (or dyn://…)")
    for part in parts:
        _check_name(part)
    return parts[0], parts[1], parts[2]


def _check_name(name: str) -> str:
    if not name or "/" in name or "." in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid name {name!r}: no dots, slashes or spaces")
    return name


@dataclass
class RuntimeSettings:
    """Process-level runtime configuration from flags and the environment."""

    discovery_backend: str | None = None  # None: the discovery factory reads the environment
    request_plane: str = "tcp"
    event_plane: str = "zmq"
    nats_url: str = DEFAULT_NATS_URL
    tcp_host: str | None = None
    tcp_port: int | None = None
    system_port: int | None = None  # None = no status server
    system_host: str = "127.0.0.1"
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    discovery_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RuntimeSettings:
        env = os.environ if env is None else env
        request_plane = (_env(env, "ARMATURE_REQUEST_PLANE", "DYN_REQUEST_PLANE") or "tcp").lower()
        event_plane = (_env(env, "ARMATURE_EVENT_PLANE", "DYN_EVENT_PLANE") or "zmq").lower()
        settings = cls(
            discovery_backend=_env(env, "ARMATURE_DISCOVERY_BACKEND", "DYN_DISCOVERY_BACKEND"),
            request_plane=request_plane,
            event_plane=event_plane,
            nats_url=_env(env, "NATS_SERVER") or DEFAULT_NATS_URL,
            tcp_host=_env(env, "ARMATURE_TCP_RPC_HOST", "DYN_TCP_RPC_HOST"),
            system_port=system_port_from_env(env),
            system_host=system_host_from_env(env),
            grace_period_s=grace_period_from_env(env),
        )
        settings.validate()
        return settings

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The runtime's flags; defaults come from the environment (env var named in the help)."""
        g = parser.add_argument_group("distributed runtime")
        g.add_argument("--discovery-backend", choices=("mem", "file", "etcd"), default=None,
                       help="env ARMATURE_DISCOVERY_BACKEND / DYN_DISCOVERY_BACKEND; default mem")
        g.add_argument("--request-plane", choices=REQUEST_PLANES, default=None,
                       help="env ARMATURE_REQUEST_PLANE / DYN_REQUEST_PLANE; default tcp")
        g.add_argument("--event-plane", choices=EVENT_PLANES, default=None,
                       help="env ARMATURE_EVENT_PLANE / DYN_EVENT_PLANE; default zmq")
        g.add_argument("--system-port", type=int, default=None,
                       help="status server port (0 = random, -1 = off); env ARMATURE_SYSTEM_PORT / DYN_SYSTEM_PORT")
        g.add_argument("--system-host", default=None,
                       help="status server bind host; env DYN_SYSTEM_HOST; default 127.0.0.1")
        g.add_argument("--tcp-rpc-host", default=None,
                       help="request-plane bind/advertise host; env ARMATURE_TCP_RPC_HOST / DYN_TCP_RPC_HOST")  # fmt: skip

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> RuntimeSettings:
        """Flags win over the environment."""
        settings = cls.from_env(env)
        if getattr(args, "discovery_backend", None):
            settings.discovery_backend = args.discovery_backend
        if getattr(args, "request_plane", None):
            settings.request_plane = args.request_plane
        if getattr(args, "event_plane", None):
            settings.event_plane = args.event_plane
        port = getattr(args, "system_port", None)
        if port is not None:
            settings.system_port = None if port < 0 else port
        if getattr(args, "system_host", None):
            settings.system_host = args.system_host
        if getattr(args, "tcp_rpc_host", None):
            settings.tcp_host = args.tcp_rpc_host
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.request_plane not in REQUEST_PLANES:
            raise ValueError(f"unknown request plane {self.request_plane!r}; choose one of {', '.join(REQUEST_PLANES)}")
        if self.event_plane not in EVENT_PLANES:
            raise ValueError(f"unknown event plane {self.event_plane!r}; choose one of {', '.join(EVENT_PLANES)}")


class DistributedRuntime:
    """One per process. Cheap to construct; connects on first use (or ``await start()``)."""

    def __init__(
        self,
        discovery: KeyValueStore,
        request_plane: str = "tcp",
        event_plane: str = "zmq",
        *,
        nats_url: str | None = None,
        tcp_host: str | None = None,
        tcp_port: int | None = None,
        system_port: int | None = None,
        system_host: str = "127.0.0.1",
        grace_period_s: float | None = None,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        timeouts: PlaneTimeouts | None = None,
        canary: CanaryConfig | None = None,
    ) -> None:
        if request_plane not in REQUEST_PLANES:
            raise ValueError(f"unknown request plane {request_plane!r}; choose one of {', '.join(REQUEST_PLANES)}")
        if event_plane not in EVENT_PLANES:
            raise ValueError(f"unknown event plane {event_plane!r}; choose one of {', '.join(EVENT_PLANES)}")
        self.discovery = discovery
        self.request_plane = request_plane
        self.event_plane = event_plane
        self.nats_url = nats_url or os.environ.get("NATS_SERVER") or DEFAULT_NATS_URL
        self.tcp_host = tcp_host
        self.tcp_port = tcp_port
        self.system_port = system_port
        self.system_host = system_host
        self.grace_period_s = grace_period_from_env() if grace_period_s is None else max(0.0, grace_period_s)
        self.lease_ttl_s = lease_ttl_s
        self.timeouts = timeouts or PlaneTimeouts.from_env()
        self.canary = canary or CanaryConfig.from_env()
        self._canaries: list[asyncio.Task[None]] = []
        # Random 63 bits: unique enough across a cluster, positive in every language's int64.
        self.instance_id = secrets.randbits(63) or 1
        self.metrics = RuntimeMetrics()
        self.health = HealthState()
        self.engine_routes: dict[str, EngineRoute] = {}
        self.status: StatusServer | None = None
        self.lease_id: int | None = None
        self.dispatcher = Dispatcher(self.instance_id)
        self._server: ServerTransport | None = None
        self._client_transport: ClientTransport | None = None
        self._nats: Any = None  # NatsLink, created for the nats request plane
        self._events: Any = None  # EventPlane, created on first use
        self._served: dict[str, _ServedRegistration] = {}
        self._start_lock = asyncio.Lock()
        self._transport_lock = asyncio.Lock()  # endpoints starting together share one server
        self._started = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._grace_cut = asyncio.Event()
        # Coroutines run after everything is closed (the deferred signal handlers of engines).
        self._after_close: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def from_settings(
        cls, settings: RuntimeSettings | None = None, discovery: KeyValueStore | None = None
    ) -> DistributedRuntime:
        """Build from flags/env: ``RuntimeSettings.from_args(args)`` or the environment alone."""
        settings = settings or RuntimeSettings.from_env()
        if discovery is None:
            from armature.runtime.discovery.factory import create_store

            discovery = create_store(settings.discovery_backend, **settings.discovery_options)
        return cls(
            discovery,
            settings.request_plane,
            settings.event_plane,
            nats_url=settings.nats_url,
            tcp_host=settings.tcp_host,
            tcp_port=settings.tcp_port,
            system_port=settings.system_port,
            system_host=settings.system_host,
            grace_period_s=settings.grace_period_s,
            lease_ttl_s=settings.lease_ttl_s,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> DistributedRuntime:
        """Connect discovery, take the process lease, start the status server; idempotent."""
        async with self._start_lock:
            if self._started:
                return self
            if self._shutdown_task is not None:
                raise RuntimeError("the runtime has been shut down")
            await self.discovery.start()
            self.lease_id = await self.discovery.grant_lease(self.lease_ttl_s)
            if self.system_port is not None:
                self.status = StatusServer(
                    self.health, self.metrics, self.engine_routes, self.system_host, self.system_port
                )
                await self.status.start()
            self._started = True
        return self

    async def __aenter__(self) -> DistributedRuntime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(grace_period_s=0.0)

    def connection_id(self) -> int:
        return self.instance_id

    @property
    def shutting_down(self) -> bool:
        return self._shutdown_task is not None

    async def _nats_link(self) -> Any:
        if self._nats is None:
            from armature.runtime.request_plane.nats import NatsLink

            self._nats = NatsLink(self.nats_url)
        await self._nats.connect()
        return self._nats

    async def _server_transport(self) -> ServerTransport:
        await self.start()
        async with self._transport_lock:
            return await self._create_server_transport()

    async def _create_server_transport(self) -> ServerTransport:
        if self._server is None:
            if self.request_plane == "tcp":
                from armature.runtime.request_plane.tcp import TcpServer

                server: ServerTransport = TcpServer(
                    self.dispatcher, self.tcp_host, self.tcp_port, self.timeouts.max_message_bytes
                )
            else:
                from armature.runtime.request_plane.nats import NatsServer

                server = NatsServer(self.dispatcher, await self._nats_link(), self.timeouts.max_message_bytes)
            await server.start()
            self._server = server
        return self._server

    async def client_transport(self) -> ClientTransport:
        await self.start()
        async with self._transport_lock:
            return await self._create_client_transport()

    async def _create_client_transport(self) -> ClientTransport:
        if self._client_transport is None:
            if self.request_plane == "tcp":
                from armature.runtime.request_plane.tcp import TcpClient

                self._client_transport = TcpClient(self.timeouts)
            else:
                from armature.runtime.request_plane.nats import NatsClient

                self._client_transport = NatsClient(await self._nats_link(), self.timeouts)
        return self._client_transport

    async def events(self) -> Any:
        """This process's event plane (``event_plane`` kind), shared and closed with the runtime.

        zmq publishers register their address on the process lease, so they vanish with it.
        """
        await self.start()
        if self._events is None:
            from armature.runtime.event_plane.factory import create_event_plane

            self._events = create_event_plane(
                self.event_plane, discovery=self.discovery, lease_id=self.lease_id, nats_server=self.nats_url
            )
        return self._events

    def request_shutdown(self, grace_period_s: float | None = None) -> asyncio.Task[None]:
        """Begin the graceful shutdown chain (once); returns its task."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(grace_period_s))
        return self._shutdown_task

    async def shutdown(self, grace_period_s: float | None = None) -> None:
        """Leave discovery, let streams finish (up to the grace period), end the rest, close."""
        await asyncio.shield(self.request_shutdown(grace_period_s))

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _shutdown(self, grace_period_s: float | None) -> None:
        grace = self.grace_period_s if grace_period_s is None else max(0.0, grace_period_s)
        self.health.shutting_down = True
        for task in self._canaries:
            task.cancel()
        try:
            # 1. Leave discovery at once, so routers stop sending here; refuse new streams.
            await asyncio.gather(
                *(reg.endpoint.unregister_instance() for reg in list(self._served.values())), return_exceptions=True
            )
            # 2. Streams of endpoints served without graceful shutdown end now; the rest get the grace period.
            for reg in self._served.values():
                if not reg.graceful:
                    for stream in list(reg.served.streams):
                        stream.shutdown()
            if self.dispatcher.streams and grace > 0 and not self._grace_cut.is_set():
                log.info("shutdown: waiting up to %.1f s for %d stream(s)", grace, len(self.dispatcher.streams))
                idle = asyncio.ensure_future(self.dispatcher.wait_idle(grace))
                cut = asyncio.ensure_future(self._grace_cut.wait())
                await asyncio.wait((idle, cut), return_when=asyncio.FIRST_COMPLETED)
                for waiter in (idle, cut):
                    waiter.cancel()
            # 3. Whatever still runs ends with a migratable engine_shutdown error.
            if self.dispatcher.streams:
                log.info("shutdown: ending %d stream(s) with engine_shutdown", len(self.dispatcher.streams))
            await self.dispatcher.shutdown_streams()
            # 4. Let the error frames leave before connections close.
            await asyncio.sleep(0)
        finally:
            await self._close_transports()
            for hook in self._after_close:
                with contextlib.suppress(Exception):
                    await hook()
            self._closed.set()

    def cut_grace_period(self) -> None:
        """End the grace period now (a second SIGINT): running streams get engine_shutdown."""
        self._grace_cut.set()

    def install_signal_handlers(self) -> Any:
        """Own SIGTERM/SIGINT (main thread, inside the loop); returns the ``GracefulShutdown``."""
        from armature.runtime.shutdown import GracefulShutdown

        return GracefulShutdown(self).install()

    async def _close_transports(self) -> None:
        for closer in (
            self._server.close() if self._server else None,
            self._client_transport.close() if self._client_transport else None,
            self.status.close() if self.status else None,
        ):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer
        if self._events is not None:
            with contextlib.suppress(Exception):
                await self._events.close()
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await self._nats.close()
        if self._started:
            with contextlib.suppress(Exception):
                await self.discovery.close()

    # --- object model ------------------------------------------------------------------------

    def namespace(self, name: str) -> Namespace:
        return Namespace(self, _check_name(name))

    def endpoint(self, path: str) -> Endpoint:
        ns, component, endpoint = parse_endpoint_path(path)
        return Endpoint(self, ns, component, endpoint)

    def register_engine_route(self, name: str, handler: EngineRoute) -> None:
        """Serve ``handler(body: dict) -> JSON`` at ``/engine/{name}`` on the status server."""
        name = name.strip("/")
        if not name:
            raise ValueError("engine route name must not be empty")
        if not callable(handler):
            raise TypeError("engine route handler must be an async callable: async def h(body: dict) -> dict")
        self.engine_routes[name] = handler


@dataclass
class _ServedRegistration:
    endpoint: Endpoint
    served: ServedEndpoint
    graceful: bool
    health_check_payload: Any


class Namespace:
    def __init__(self, runtime: DistributedRuntime, name: str) -> None:
        self.runtime = runtime
        self.name = name

    def component(self, name: str) -> Component:
        return Component(self.runtime, self.name, _check_name(name))


class Component:
    def __init__(self, runtime: DistributedRuntime, namespace: str, name: str) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.name = name

    def endpoint(self, name: str) -> Endpoint:
        return Endpoint(self.runtime, self.namespace, self.name, _check_name(name))


def _request_type(handler: RequestHandler) -> Any:
    """The Struct type a handler declares for its request parameter, if any."""
    try:
        hints = typing.get_type_hints(handler)
        params = list(inspect.signature(handler).parameters)
    except (NameError, TypeError, ValueError):
        return Any
    if not params:
        return Any
    hint = hints.get(params[0], Any)
    if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
        return hint
    return Any


class Endpoint:
    def __init__(self, runtime: DistributedRuntime, namespace: str, component: str, name: str) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.component = component
        self.name = name

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.name}"

    def __repr__(self) -> str:
        return f"Endpoint({self.path})"

    def connection_id(self) -> int:
        return self.runtime.instance_id

    @property
    def instance_key(self) -> str:
        return instance_key(self.namespace, self.component, self.name, self.runtime.instance_id)

    # --- serving -------------------------------------------------------------------------------

    async def start_serving(
        self,
        handler: RequestHandler,
        *,
        graceful_shutdown: bool = True,
        health_check_payload: Any = None,
        request_type: Any = None,
        push_handler: PushHandler | None = None,
    ) -> None:
        """Accept requests and register the instance in discovery; returns at once.

        ``push_handler`` (optional) serves the same requests by pushing items as they appear
        (``async def p(request, context, emit)``), without a task wake-up per item; the request
        plane uses it instead of ``handler`` when given.
        """
        if not callable(handler) or (inspect.iscoroutinefunction(handler) and not inspect.isasyncgenfunction(handler)):
            raise TypeError("handler must be an async generator function: async def h(request, context): yield ...")
        rt = self.runtime
        if rt.shutting_down:
            raise RuntimeError("the runtime is shutting down")
        server = await rt._server_transport()
        rtype = request_type if request_type is not None else _request_type(handler)
        served = ServedEndpoint(
            self.namespace,
            self.component,
            self.name,
            handler,
            _any_decoder if rtype is Any else msgspec.msgpack.Decoder(rtype),
            rt.metrics.endpoint(self.namespace, self.component, self.name),
            push=push_handler,
        )
        rt.dispatcher.add(served)
        rt._served[self.path] = _ServedRegistration(self, served, graceful_shutdown, health_check_payload)
        try:
            await self.register_instance(server)
        except BaseException:
            rt.dispatcher.remove(self.path)
            rt._served.pop(self.path, None)
            raise
        rt.health.endpoints[self.path] = "ready"
        if health_check_payload is not None and rt.canary.enabled:
            rt._canaries.append(asyncio.get_running_loop().create_task(self._canary(served, health_check_payload)))
        log.info("serving %s as instance %x over %s at %s", self.path, rt.instance_id, server.kind, server.address)

    async def serve(
        self,
        handler: RequestHandler,
        graceful_shutdown: bool = True,
        health_check_payload: Any = None,
        *,
        request_type: Any = None,
    ) -> None:
        """Serve until the runtime shuts down (a signal, or ``runtime.shutdown()``)."""
        await self.start_serving(
            handler,
            graceful_shutdown=graceful_shutdown,
            health_check_payload=health_check_payload,
            request_type=request_type,
        )
        await self.runtime.wait_closed()

    async def _canary(self, served: ServedEndpoint, payload: Any) -> None:
        """Send ``payload`` to this very instance over the request plane when it has been idle."""
        client = await self.client()

        async def probe() -> None:
            stream = await client.direct(payload, self.runtime.instance_id)
            async with stream:
                async for _ in stream:
                    return  # one answer is enough: the handler and its engine respond
            # An empty stream that ended cleanly is an answer too.

        try:
            await run_canary(self.path, self.runtime.health, probe, lambda: served.last_activity, self.runtime.canary)
        finally:
            await client.close()

    async def register_instance(self, server: ServerTransport | None = None) -> None:
        rt = self.runtime
        server = server or await rt._server_transport()
        record = Instance(self.namespace, self.component, self.name, rt.instance_id, TransportInfo(server.kind, server.address))
        await rt.discovery.put(self.instance_key, _json_encoder.encode(record), rt.lease_id)

    async def unregister_instance(self) -> None:
        """Leave discovery and refuse new streams; streams already running go on."""
        rt = self.runtime
        rt.dispatcher.remove(self.path)
        for key in (self.instance_key, model_card_key(self.namespace, self.component, self.name, rt.instance_id)):
            await rt.discovery.delete(key)
        if self.path in rt.health.endpoints:
            rt.health.endpoints[self.path] = "notready"

    # --- model cards -----------------------------------------------------------------------------

    async def register_model(self, card: ModelCard) -> None:
        """Publish ``card`` (JSON) under ``v1/mdc/…/{instance_id:x}`` on the process lease."""
        rt = self.runtime
        await rt.start()
        if not card.endpoint:
            card = msgspec.structs.replace(card, endpoint=self.path)
        key = model_card_key(self.namespace, self.component, self.name, rt.instance_id)
        await rt.discovery.put(key, msgspec.json.encode(card), rt.lease_id)

    async def unregister_model(self) -> None:
        rt = self.runtime
        await rt.discovery.delete(model_card_key(self.namespace, self.component, self.name, rt.instance_id))

    # --- calling ---------------------------------------------------------------------------------

    async def client(self, response_type: Any = None) -> Client:
        """A client that follows this endpoint's instances in discovery."""
        client = Client(self, response_type)
        await client.start()
        return client


class Client:
    """Calls one endpoint's instances: round robin, random, or a chosen instance."""

    def __init__(self, endpoint: Endpoint, response_type: Any = None) -> None:
        self.endpoint = endpoint
        self.runtime = endpoint.runtime
        self._decoder = _any_decoder if response_type in (None, Any) else msgspec.msgpack.Decoder(response_type)
        self._prefix = f"v1/instances/{endpoint.namespace}/{endpoint.component}/{endpoint.name}/"
        self._instances: dict[int, Instance] = {}
        self._changed = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._rr = itertools.count()
        self._transport: ClientTransport | None = None

    async def start(self) -> None:
        if self._watch_task is not None:
            return
        self._transport = await self.runtime.client_transport()
        for key, value in (await self.runtime.discovery.get_prefix(self._prefix)).items():
            self._put(key, value)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task

    async def _watch(self) -> None:
        watch: AsyncIterator[Any] = self.runtime.discovery.watch_prefix(self._prefix)
        try:
            async for event in watch:
                if event.kind == WatchEventKind.PUT and event.value is not None:
                    self._put(event.key, event.value)
                else:
                    self._delete(event.key)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the store closed under us (runtime shutdown)
            log.debug("instance watch on %s ended", self._prefix, exc_info=True)
        finally:
            aclose = getattr(watch, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _put(self, key: str, value: bytes) -> None:
        try:
            instance = _instance_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring malformed instance record at %s", key)
            return
        if instance.transport.kind != self.runtime.request_plane:
            log.warning(
                "instance %x of %s speaks %s, this runtime %s: ignored",
                instance.instance_id, instance.path, instance.transport.kind, self.runtime.request_plane,
            )  # fmt: skip
            return
        self._instances[instance.instance_id] = instance
        self._notify()

    def _delete(self, key: str) -> None:
        try:
            instance_id = int(key.rsplit("/", 1)[1], 16)
        except ValueError:
            return
        if self._instances.pop(instance_id, None) is not None:
            if self._transport is not None:
                self._transport.instance_removed(instance_id)
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def instance_ids(self) -> list[int]:
        return sorted(self._instances)

    def instances(self) -> list[Instance]:
        return [self._instances[i] for i in sorted(self._instances)]

    async def wait_for_instances(self, timeout_s: float | None = None) -> list[int]:
        """Wait until at least one instance is known; returns their ids."""

        async def wait() -> list[int]:
            while not self._instances:
                await self._changed.wait()
            return self.instance_ids()

        return await asyncio.wait_for(wait(), timeout_s)

    async def wait_for_instance_count(self, count: int, timeout_s: float | None = None) -> list[int]:
        """Wait until exactly ``count`` instances are known (0 to wait for them all to leave)."""

        async def wait() -> list[int]:
            while len(self._instances) != count:
                await self._changed.wait()
            return self.instance_ids()

        return await asyncio.wait_for(wait(), timeout_s)

    def _pick(self, instance_id: int | None, mode: str) -> Instance:
        if instance_id is not None:
            instance = self._instances.get(instance_id)
            if instance is None:
                raise RequestPlaneError(
                    ErrorKind.ENDPOINT_NOT_FOUND, f"instance {instance_id:x} of {self.endpoint.path} is not known", False
                )
            return instance
        if not self._instances:
            raise RequestPlaneError(ErrorKind.NO_INSTANCES, f"no instances of {self.endpoint.path}", False)
        ids = sorted(self._instances)
        if mode == "random":
            return self._instances[random.choice(ids)]
        return self._instances[ids[next(self._rr) % len(ids)]]

    async def _call(self, request: Any, instance: Instance, context: Context | None) -> ResponseStream:
        assert self._transport is not None, "client not started"
        if context is None:
            ctx = Context()
        else:
            ctx = context.child(context.id())
        payload = _encoder.encode(request)
        try:
            return await self._transport.open_stream(instance, payload, ctx, self._decoder)
        except BaseException:
            ctx.detach()
            raise

    async def round_robin(self, request: Any, context: Context | None = None) -> ResponseStream:
        return await self._call(request, self._pick(None, "round_robin"), context)

    async def random(self, request: Any, context: Context | None = None) -> ResponseStream:
        return await self._call(request, self._pick(None, "random"), context)

    async def direct(self, request: Any, instance_id: int, context: Context | None = None) -> ResponseStream:
        return await self._call(request, self._pick(instance_id, "direct"), context)

    async def generate(self, request: Any, context: Context | None = None) -> ResponseStream:
        """Dynamo's name for the default routing (round robin)."""
        return await self.round_robin(request, context)
