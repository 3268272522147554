"""Stop strings on streamed text: hold back what might be the start of a stop string.

The engine sees token ids only, so the frontend matches stop strings on detokenized text. Text
that could still become a stop string is "jailed" (withheld) until the next text settles it; a
match ends the sequence and nothing of the stop string — nor anything after it — reaches the
client. When several stop strings match, the one completed first wins (the earliest end), so
the answer never depends on how the text was split into tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JailResult:
    text: str  # safe to show now
    stopped: bool  # a stop string matched; ``text`` is everything before it
    matched: str | None = None


class StopStringJail:
    __slots__ = ("_stops", "_pending", "_max_hold")

    def __init__(self, stops: list[str]) -> None:
        # An empty stop string would match everywhere; callers drop them, but be safe.
        self._stops = [s for s in dict.fromkeys(stops) if s]
        self._pending = ""
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1

    @property
    def active(self) -> bool:
        return bool(self._stops)

    @property
    def pending(self) -> str:
        return self._pending

    def push(self, text: str) -> JailResult:
        if not self._stops:
            return JailResult(text, False)
        buf = self._pending + text
        # Text released earlier held no stop string and no unfinished prefix of one beyond
        # ``_pending``, so every match lies within ``buf``.
        # The match that is complete first wins: only that choice is the same however the text
        # is split (a longer stop string starting earlier may not be complete yet). Of two that
        # end together, the one starting earlier.
        best_at = best_end = -1
        best: str | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at == -1:
                continue
            end = at + len(stop)
            if best is None or end < best_end or (end == best_end and at < best_at):
                best_at, best_end, best = at, end, stop
        if best is not None:
            self._pending = ""
            return JailResult(buf[:best_at], True, best)
        hold = self._held_suffix(buf)
        if hold:
            self._pending = buf[-hold:]
            return JailResult(buf[:-hold], False)
        self._pending = ""
        return JailResult(buf, False)

    def flush(self) -> str:
        """Release what is held (the sequence ended for another reason)."""
        out, self._pending = self._pending, ""
        return out

    def _held_suffix(self, buf: str) -> int:
        # Longest suffix of ``buf`` that is a proper prefix of some stop string.
        longest = min(self._max_hold, len(buf))
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            for stop in self._stops:
                if stop.startswith(tail):
                    return n
        return 0
