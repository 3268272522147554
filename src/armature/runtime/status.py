"""The per-process system status server: /health, /live, /metrics and /engine/{route}.

A few routes, a few requests a minute: a small HTTP/1.1 server on asyncio streams starts in
milliseconds and pulls in no web framework. Off unless a port is given (``--system-port``,
``ARMATURE_SYSTEM_PORT`` / ``DYN_SYSTEM_PORT``; 0 = a random free port), loopback by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from armature.runtime.metrics import RuntimeMetrics
from armature.runtime.request_plane.base import env_float

log = logging.getLogger(__name__)

EngineRoute = Callable[[dict[str, Any]], Awaitable[Any]]

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
READ_TIMEOUT_S = 30.0
DEFAULT_SYSTEM_HOST = "127.0.0.1"


def system_port_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The configured port, or None when the server is off (unset or negative)."""
    env = os.environ if env is None else env
    raw = env.get("ARMATURE_SYSTEM_PORT") or env.get("DYN_SYSTEM_PORT")
    if raw is None or raw.strip() == "":
        return None
    try:
        port = int(raw)
    except ValueError as e:
        raise ValueError(f"system port {raw!r} is not an integer") from e
    if port > 65535:
        raise ValueError(f"system port {port} is out of range")
    return None if port < 0 else port


def system_host_from_env(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("ARMATURE_SYSTEM_HOST") or env.get("DYN_SYSTEM_HOST") or DEFAULT_SYSTEM_HOST


@dataclass
class HealthState:
    """What /health reports: each served endpoint's status, and whether the process is leaving."""

    endpoints: dict[str, str] = field(default_factory=dict)  # path -> "ready" | "notready"
    shutting_down: bool = False
    started: float = field(default_factory=time.monotonic)

    def ready(self) -> bool:
        return not self.shutting_down and bool(self.endpoints) and all(v == "ready" for v in self.endpoints.values())

    def body(self, ready: bool) -> dict[str, Any]:
        return {
            "status": "ready" if ready else "notready",
            "uptime": round(time.monotonic() - self.started, 3),
            "endpoints": dict(self.endpoints),
        }


@dataclass(frozen=True)
class CanaryConfig:
    """Canary health checks: after ``wait_s`` without traffic, send the endpoint's health payload.

    Off by default, as in Dynamo (its operator turns them on); a canary that errors or takes over
    ``timeout_s`` marks the endpoint ``notready`` until one succeeds again.
    """

    enabled: bool = False
    wait_s: float = 10.0
    timeout_s: float = 3.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CanaryConfig:
        env = os.environ if env is None else env
        raw = env.get("ARMATURE_HEALTH_CHECK_ENABLED") or env.get("DYN_HEALTH_CHECK_ENABLED") or ""
        return cls(
            enabled=raw.strip().lower() in ("1", "true", "yes", "on"),
            wait_s=env_float(env, ("ARMATURE_CANARY_WAIT_TIME", "DYN_CANARY_WAIT_TIME"), cls.wait_s),
            timeout_s=env_float(
                env, ("ARMATURE_HEALTH_CHECK_REQUEST_TIMEOUT", "DYN_HEALTH_CHECK_REQUEST_TIMEOUT"), cls.timeout_s
            ),
        )


async def run_canary(
    path: str,
    health: HealthState,
    probe: Callable[[], Awaitable[None]],
    last_activity: Callable[[], float],
    config: CanaryConfig,
) -> None:
    """Probe ``path`` whenever it has been idle for ``config.wait_s``; runs until cancelled."""
    while True:
        idle = time.monotonic() - last_activity()
        if idle < config.wait_s:
            await asyncio.sleep(config.wait_s - idle)
            continue
        try:
            await asyncio.wait_for(probe(), config.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the canary means "not healthy"
            if health.endpoints.get(path) == "ready":
                log.warning("health check of %s failed: %s", path, e or type(e).__name__)
            if path in health.endpoints:
                health.endpoints[path] = "notready"
        else:
            if path in health.endpoints and not health.shutting_down:
                health.endpoints[path] = "ready"
        # Traffic of its own counts as activity, so the next canary waits a full period.
        await asyncio.sleep(config.wait_s)


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class StatusServer:
    def __init__(
        self,
        health: HealthState,
        metrics: RuntimeMetrics,
        engine_routes: dict[str, EngineRoute],
        host: str = DEFAULT_SYSTEM_HOST,
        port: int = 0,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.engine_routes = engine_routes
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._serve_client, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("system status server at %s (/health /live /metrics /engine/*)", self.url)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._clients):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(self._read_request(reader), READ_TIMEOUT_S)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return
                except _HttpError as e:
                    await self._respond(writer, e.status, {"error": e.message}, keep_alive=False)
                    return
                if request is None:
                    return
                method, target, headers, body = request
                keep_alive = headers.get("connection", "").lower() != "close"
                try:
                    status, payload, content_type = await self._route(method, target, body)
                except _HttpError as e:
                    status, payload, content_type = e.status, {"error": e.message}, None
                await self._respond(writer, status, payload, content_type, keep_alive)
                if not keep_alive:
                    return
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise
        except asyncio.LimitOverrunError as e:
            raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large") from e
        if len(raw) > MAX_HEADER_BYTES:
            raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1"):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "malformed header")
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not supported")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as e:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from e
        if length > MAX_BODY_BYTES:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
        body = await reader.readexactly(length) if length > 0 else b""
        return parts[0].upper(), parts[1], headers, body

    async def _route(self, method: str, target: str, body: bytes) -> tuple[HTTPStatus, Any, str | None]:
        url = urlsplit(target)
        path = url.path
        if path in ("/health", "/live"):
            if method not in ("GET", "HEAD"):
                raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}")
            # Liveness only says the process is not leaving; health also needs every endpoint up.
            ok = self.health.ready() if path == "/health" else not self.health.shutting_down
            return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE), self.health.body(ok), None
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on /metrics")
            text, content_type = self.metrics.render()
            return HTTPStatus.OK, text, content_type
        if path.startswith("/engine/"):
            name = path[len("/engine/") :].strip("/")
            route = self.engine_routes.get(name)
            if route is None:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no engine route {name!r}")
            if method == "POST":
                try:
                    args = msgspec.json.decode(body) if body.strip() else {}
                except msgspec.DecodeError as e:
                    raise _HttpError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}") from e
                if not isinstance(args, dict):
                    raise _HttpError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
            elif method == "GET":
                args = dict(parse_qsl(url.query))
            else:
                raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on engine routes")
            try:
                result = await route(args)
            except Exception as e:  # noqa: BLE001 - a failing route must not take the server down
                log.exception("engine route %s failed", name)
                raise _HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}") from e
            return HTTPStatus.OK, result, None
        raise _HttpError(HTTPStatus.NOT_FOUND, f"no route {path}")

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        payload: Any,
        content_type: str | None = None,
        keep_alive: bool = True,
    ) -> None:
        if isinstance(payload, bytes):
            body = payload
        else:
            try:
                body = msgspec.json.encode(payload)
            except TypeError as e:
                status, body = HTTPStatus.INTERNAL_SERVER_ERROR, msgspec.json.encode({"error": f"not JSON: {e}"})
            content_type = content_type or "application/json"
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            f"Content-Type: {content_type or 'application/octet-stream'}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
