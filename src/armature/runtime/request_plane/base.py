"""The request-plane contract: errors, the instance record, and the two transport halves.

A *server transport* accepts streams for the endpoints this process serves and hands them to a
``Dispatcher`` (dispatcher.py), which runs the handlers. A *client transport* opens streams to
an ``Instance`` found in discovery and returns a ``ResponseStream`` (stream.py). Both halves
share the frame semantics of codec.py, whatever carries the bytes (TCP or NATS).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from armature.runtime.context import Context

if TYPE_CHECKING:
    from armature.runtime.request_plane.stream import ResponseStream


class ErrorKind:
    """Error kinds carried in ERROR frames; callers retry the migratable ones elsewhere."""

    HANDLER_ERROR = "handler_error"  # the handler raised
    INVALID_REQUEST = "invalid_request"  # the payload does not decode to the handler's type
    INVALID_RESPONSE = "invalid_response"  # an item does not decode to the caller's type
    MESSAGE_TOO_LARGE = "message_too_large"
    ENDPOINT_NOT_FOUND = "endpoint_not_found"  # instance gone or not serving that endpoint
    DISCONNECTED = "disconnected"  # the connection dropped mid-stream
    CANNOT_CONNECT = "cannot_connect"
    CONNECTION_TIMEOUT = "connection_timeout"  # connect or first-response timeout
    ENGINE_SHUTDOWN = "engine_shutdown"  # the worker is shutting down
    VERSION_MISMATCH = "version_mismatch"
    PROTOCOL_ERROR = "protocol_error"
    NO_INSTANCES = "no_instances"
    CALLER_ERROR = "caller_error"  # the caller's own item callback raised (never on the wire)


# Errors after which the same request may be sent to another instance (Dynamo's set).
MIGRATABLE_KINDS = frozenset(
    {
        ErrorKind.DISCONNECTED,
        ErrorKind.CANNOT_CONNECT,
        ErrorKind.CONNECTION_TIMEOUT,
        ErrorKind.ENGINE_SHUTDOWN,
        ErrorKind.ENDPOINT_NOT_FOUND,
    }
)


class RequestPlaneError(RuntimeError):
    """A stream failed. Handlers may raise it too, to choose the kind the caller sees."""

    def __init__(self, kind: str, message: str, migratable: bool | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.migratable = kind in MIGRATABLE_KINDS if migratable is None else migratable


class EngineShutdown(RequestPlaneError):
    """Raised by a handler whose engine is going away; the caller migrates the request."""

    def __init__(self, message: str = "engine was shut down during generation") -> None:
        super().__init__(ErrorKind.ENGINE_SHUTDOWN, message, True)


class TransportInfo(msgspec.Struct, frozen=True):
    kind: str  # "tcp" | "nats"
    address: str  # tcp: "host:port"; nats: the instance's request subject


class Instance(msgspec.Struct, frozen=True):
    """What ``v1/instances/{ns}/{component}/{endpoint}/{instance_id:x}`` holds."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    transport: TransportInfo

    @property
    def path(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"


def env_float(env: Mapping[str, str], names: tuple[str, ...], default: float) -> float:
    """The first of ``names`` set in ``env`` as a positive number, else ``default``."""
    for name in names:
        raw = env.get(name)
        if raw:
            try:
                value = float(raw)
            except ValueError as e:
                raise ValueError(f"{name}={raw!r} is not a number") from e
            if value <= 0:
                raise ValueError(f"{name}={raw!r} must be positive")
            return value
    return default


@dataclass(frozen=True)
class PlaneTimeouts:
    connect_s: float = 5.0
    # Until the handler acknowledges the stream (not until the first token: prefill may be long).
    first_response_s: float = 5.0
    # Items a handler may send ahead of the caller's consumption, per stream. 256 keeps a single
    # token stream from waiting on credit round trips (64 cost ~35% of single-stream throughput
    # in benchmarks/request_plane.py); lower it for endpoints streaming large items.
    window: int = 256
    max_message_bytes: int = 32 * 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PlaneTimeouts:
        env = os.environ if env is None else env
        return cls(
            connect_s=env_float(env, ("ARMATURE_TCP_CONNECT_TIMEOUT", "DYN_TCP_CONNECT_TIMEOUT"), cls.connect_s),
            first_response_s=env_float(
                env, ("ARMATURE_TCP_REQUEST_TIMEOUT", "DYN_TCP_REQUEST_TIMEOUT"), cls.first_response_s
            ),
            max_message_bytes=int(
                env_float(env, ("ARMATURE_TCP_MAX_MESSAGE_SIZE", "DYN_TCP_MAX_MESSAGE_SIZE"), cls.max_message_bytes)
            ),
            window=int(env_float(env, ("ARMATURE_REQUEST_PLANE_WINDOW",), cls.window)),
        )


class StreamSink(abc.ABC):
    """The handler side's way back to one caller stream."""

    @abc.abstractmethod
    def send_ack(self) -> None: ...

    @abc.abstractmethod
    def send_item(self, item: object) -> int:
        """Encode and queue one item; returns its size. Raises ``FrameTooLarge``."""

    @abc.abstractmethod
    def send_end(self) -> None: ...

    @abc.abstractmethod
    def send_error(self, kind: str, message: str, migratable: bool) -> None: ...

    @abc.abstractmethod
    def congested(self) -> bool:
        """True while the connection's write buffer is above its high-water mark."""

    @abc.abstractmethod
    async def wait_writable(self) -> None: ...


class StreamChannel(abc.ABC):
    """The caller side's way to the handler of one open stream."""

    @abc.abstractmethod
    def send_control(self, stream_key: int, kind: int, amount: int = 0) -> None:
        """Send STOP, KILL or CREDIT(amount) for the stream."""

    @abc.abstractmethod
    def forget(self, stream_key: int) -> None:
        """The stream is over on the caller side; drop its routing state."""


class ServerTransport(abc.ABC):
    kind: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @property
    @abc.abstractmethod
    def address(self) -> str: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting and drop connections; the dispatcher has drained streams before."""


class ClientTransport(abc.ABC):
    kind: str

    @abc.abstractmethod
    async def open_stream(
        self, instance: Instance, payload: bytes, context: Context, decoder: msgspec.msgpack.Decoder
    ) -> ResponseStream: ...

    def instance_removed(self, instance_id: int) -> None:  # noqa: B027 - optional hook
        """Discovery lost the instance; transports without a connection to watch check liveness."""

    @abc.abstractmethod
    async def close(self) -> None: ...

