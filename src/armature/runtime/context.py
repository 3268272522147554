"""Per-request context: ids, trace ids and cancellation shared by caller and handler.

A caller's stop or kill travels down the tree of linked contexts (a frontend request → its
prefill call and decode call) and, over the request plane, to the handler's own ``Context`` on
the worker. ``stop`` asks the handler to finish early and cleanly (it may still yield a last
item); ``kill`` means nobody wants any more output: the handler is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable

ContextCallback = Callable[["Context"], None]

# Request, trace and span ids must be unique, not secret: nothing is authorised by knowing one.
# A seeded generator makes one in a fraction of a microsecond (uuid4 costs a getrandom call and a
# UUID object; a frontend makes several ids per request). Reseeded in a forked child so parent
# and child never produce the same ids.
_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


def new_request_id() -> str:
    """32 hex digits (128 random bits), like ``uuid.uuid4().hex``."""
    return f"{_rng.getrandbits(128):032x}"


def new_trace_id() -> str:
    return f"{_rng.getrandbits(128):032x}"


def new_span_id() -> str:
    return f"{_rng.getrandbits(64):016x}"


class Context:
    """Cancellation state and identity of one request; cheap to create, safe to share on one loop."""

    __slots__ = (
        "_id", "trace_id", "span_id", "parent_span_id", "_stopped", "_killed", "_event",
        "_children", "_callbacks", "_parent",
    )  # fmt: skip

    def __init__(
        self,
        id: str | None = None,
        *,
        trace_id: str | None = None,
        span_id: str | None = None,
        parent_span_id: str | None = None,
    ) -> None:
        self._id = id or new_request_id()
        self.trace_id = trace_id or new_trace_id()
        self.span_id = span_id or new_span_id()
        self.parent_span_id = parent_span_id
        self._stopped = False
        self._killed = False
        # Created lazily so a Context can be built outside a running loop.
        self._event: asyncio.Event | None = None
        self._children: list[Context] = []
        self._callbacks: list[ContextCallback] = []
        self._parent: Context | None = None

    def id(self) -> str:
        """The request id (a method, as in Dynamo's Python API)."""
        return self._id

    @property
    def request_id(self) -> str:
        return self._id

    def child(self, id: str | None = None) -> Context:
        """A context for a downstream call: same trace, new span, cancelled with this one."""
        ctx = Context(id or new_request_id(), trace_id=self.trace_id, parent_span_id=self.span_id)
        self.link_child(ctx)
        return ctx

    def link_child(self, child: Context) -> None:
        """Propagate this context's stop/kill to ``child`` (at once if already stopped)."""
        child._parent = self
        self._children.append(child)
        if self._killed:
            child.kill()
        elif self._stopped:
            child.stop_generating()

    def unlink_child(self, child: Context) -> None:
        """Forget a finished child so a long-lived parent does not grow without bound."""
        try:
            self._children.remove(child)
        except ValueError:
            pass
        child._parent = None

    def detach(self) -> None:
        if self._parent is not None:
            self._parent.unlink_child(self)

    def add_callback(self, callback: ContextCallback) -> None:
        """Call ``callback(self)`` on every stop/kill transition (stop, then possibly kill)."""
        self._callbacks.append(callback)

    def remove_callback(self, callback: ContextCallback) -> None:
        try:
            self._callbacks.remove(callback)
        except ValueError:
            pass

    def is_stopped(self) -> bool:
        """True once stop or kill was asked for (a killed request is also stopped)."""
        return self._stopped

    def is_killed(self) -> bool:
        return self._killed

    def stop_generating(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._fire()
        for child in list(self._children):
            child.stop_generating()

    def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        self._stopped = True
        self._fire()
        for child in list(self._children):
            child.kill()

    async def async_killed_or_stopped(self) -> bool:
        """Wait until the request is stopped or killed; returns ``True``."""
        if self._stopped:
            return True
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()
        return True

    def _fire(self) -> None:
        if self._event is not None:
            self._event.set()
        for callback in list(self._callbacks):
            callback(self)

    def __repr__(self) -> str:
        state = "killed" if self._killed else "stopped" if self._stopped else "live"
        return f"Context(id={self._id!r}, trace_id={self.trace_id!r}, {state})"
