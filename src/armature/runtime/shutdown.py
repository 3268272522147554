"""Graceful shutdown: the runtime owns SIGTERM/SIGINT and runs the chain in order.

On the first signal: leave discovery at once (routers stop sending here) → give in-flight
streams the grace period to finish → end the rest with a migratable ``engine_shutdown`` (their
handlers are cancelled, so their ``finally`` blocks abort engine requests) → close the request
plane, status server and lease → run the handlers an engine library tried to install for that
signal (SGLang installs its own) → ``serve()`` returns and the process exits 0.

Engine libraries install handlers with ``loop.add_signal_handler`` or ``signal.signal``. Both
are intercepted for the owned signals while installed, and whatever they register is kept and
run last, so an engine cannot kill the process before its streams are drained.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVarTuple

if TYPE_CHECKING:
    from armature.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)

OWNED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Deferred = Callable[[], Any]
_Ts = TypeVarTuple("_Ts")


class GracefulShutdown:
    """Install with ``GracefulShutdown(runtime).install()`` from the main thread, inside the loop."""

    def __init__(self, runtime: DistributedRuntime, signals: tuple[int, ...] = OWNED_SIGNALS) -> None:
        self.runtime = runtime
        self.signals = tuple(signals)
        self.deferred: dict[int, list[Deferred]] = {int(s): [] for s in self.signals}
        self.received: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, Any] = {}
        self._orig_add_signal_handler: Any = None
        self._orig_signal_signal: Any = None
        self._installed = False

    def install(self) -> GracefulShutdown:
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        loop = asyncio.get_running_loop()
        self._loop = loop
        for sig in self.signals:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous
            self._capture_python_handler(sig, previous)
            signal.signal(sig, self._on_signal)
        # Intercept later registrations by engine libraries (e.g. SGLang) for our signals.
        self._orig_add_signal_handler = loop.add_signal_handler
        self._orig_signal_signal = signal.signal
        loop.add_signal_handler = self._add_signal_handler  # type: ignore[method-assign]
        signal.signal = self._signal_signal  # type: ignore[assignment]
        self.runtime._after_close.append(self._run_deferred)
        self._installed = True
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        signal.signal = self._orig_signal_signal  # type: ignore[assignment]
        if self._loop is not None and "add_signal_handler" in vars(self._loop):
            del self._loop.add_signal_handler
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._installed = False

    # --- interception ------------------------------------------------------------------------

    def _capture_python_handler(self, sig: int, handler: Any) -> None:
        # The interpreter's own defaults are not "theirs": SIG_DFL would kill us, and the default
        # SIGINT handler would raise KeyboardInterrupt after a clean shutdown.
        if callable(handler) and handler is not signal.default_int_handler and handler != self._on_signal:
            self.deferred[sig].append(lambda: handler(sig, None))

    def _add_signal_handler(self, sig: int, callback: Callable[[*_Ts], object], *args: *_Ts) -> None:
        if sig in self.deferred:
            log.info("deferring a loop handler for %s until the graceful shutdown is done", signal.Signals(sig).name)
            self.deferred[sig].append(lambda: callback(*args))
            return
        self._orig_add_signal_handler(sig, callback, *args)

    def _signal_signal(self, sig: int, handler: Any) -> Any:
        if sig in self.deferred and threading.current_thread() is threading.main_thread():
            log.info("deferring a signal handler for %s until the graceful shutdown is done", signal.Signals(sig).name)
            self._capture_python_handler(sig, handler)
            return self._on_signal
        return self._orig_signal_signal(sig, handler)

    # --- the chain -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self.trigger, signum)

    def trigger(self, signum: int) -> None:
        """Start the chain as if ``signum`` had arrived (the first signal decides)."""
        if self.received is None:
            self.received = signum
            log.info("%s received: graceful shutdown (grace period %.1f s)",
                     signal.Signals(signum).name, self.runtime.grace_period_s)  # fmt: skip
            self.runtime.request_shutdown()
        elif signum == signal.SIGINT:
            log.warning("second SIGINT: ending in-flight streams now")
            self.runtime.cut_grace_period()

    async def _run_deferred(self) -> None:
        # Give the process its signal handling back first: a deferred handler may re-raise.
        self.uninstall()
        if self.received is None:
            return  # shut down by a call, not a signal: the engine's handlers are not ours to run
        for handler in self.deferred.get(self.received, []):
            try:
                result = handler()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - a foreign handler must not stop the others
                log.exception("deferred signal handler failed")


def install_graceful_shutdown(runtime: DistributedRuntime) -> GracefulShutdown:
    """Own SIGTERM/SIGINT for ``runtime`` (call from the main thread inside the running loop)."""
    return GracefulShutdown(runtime).install()
