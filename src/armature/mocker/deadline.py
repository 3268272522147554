"""``DeadlineTimer``: wake an asyncio task at an exact ``perf_counter()`` instant.

The simulated forwards are short (0.57 ms for a decode step at speedup 10) and their exact
length is what the mocker promises. The event loop's own timer ticks in whole milliseconds, and
a sleeping thread costs two cross-thread hand-offs per step. On Linux a ``timerfd`` armed with
an absolute ``CLOCK_MONOTONIC`` deadline (the clock behind ``time.perf_counter``) is read by
the loop like any socket: it wakes the loop's poll at the deadline itself (an hrtimer, no
millisecond rounding, no thread). ``DeadlineTimer.create`` returns ``None`` where that is not
available; the caller then falls back to the loop's timer and a timer thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    if time.get_clock_info("perf_counter").implementation != "clock_gettime(CLOCK_MONOTONIC)":
        return None  # deadlines are perf_counter() values: the timer must run on the same clock
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        libc.timerfd_settime.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class DeadlineTimer:
    """One timerfd on one event loop; one waiter at a time (the step loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        assert _LIBC is not None
        self._settime = _LIBC.timerfd_settime
        self._loop = loop
        self._fd = fd
        self._spec = _Itimerspec()
        self._spec_ref = ctypes.byref(self._spec)
        self._waiter: asyncio.Future[None] | None = None
        loop.add_reader(fd, self._fired)

    @classmethod
    def create(cls, loop: asyncio.AbstractEventLoop) -> DeadlineTimer | None:
        if _LIBC is None:
            return None
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            return None
        try:
            return cls(loop, fd)
        except (NotImplementedError, OSError):  # a loop that cannot watch file descriptors
            os.close(fd)
            return None

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except (BlockingIOError, InterruptedError):
            return  # re-armed since it fired: the new deadline has not come yet
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def sleep_until(self, deadline: float) -> None:
        """Return at ``deadline`` (``time.perf_counter()`` seconds), not before."""
        if self._fd < 0:
            raise RuntimeError("the deadline timer is closed")
        sec = int(deadline)
        value = self._spec.it_value
        value.tv_sec = sec
        value.tv_nsec = min(int((deadline - sec) * 1e9) + 1, 999_999_999)  # round up: never early
        waiter = self._waiter = self._loop.create_future()
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, self._spec_ref, None) != 0:
            self._waiter = None
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        try:
            await waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        if not self._loop.is_closed():
            self._loop.remove_reader(fd)
        os.close(fd)
