"""Online latency model: a linear fit of latency against load over a sliding window, solved
backwards for the most load a worker can carry within the SLA (Dynamo's load-based regression)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Fit:
    slope: float
    intercept: float

    def load_within(self, target: float) -> float | None:
        """The largest load whose predicted latency is within ``target``; 0 when even an idle
        worker misses it; None when the fit says nothing usable (latency falls with load)."""
        if self.slope <= 0:
            return None if self.intercept <= target else 0.0
        return max(0.0, (target - self.intercept) / self.slope)


class LoadLatencyModel:
    def __init__(self, window: int, min_observations: int) -> None:
        self._points: deque[tuple[float, float]] = deque(maxlen=window)
        self._min = min_observations

    def observe(self, load: float, latency: float) -> None:
        self._points.append((load, latency))

    def __len__(self) -> int:
        return len(self._points)

    def fit(self) -> Fit | None:
        """Least squares over the window; None before ``min_observations`` or without spread in load."""
        n = len(self._points)
        if n < self._min:
            return None
        mean_x = sum(x for x, _ in self._points) / n
        mean_y = sum(y for _, y in self._points) / n
        sxx = sum((x - mean_x) ** 2 for x, _ in self._points)
        if sxx == 0:
            return None
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in self._points)
        slope = sxy / sxx
        return Fit(slope, mean_y - slope * mean_x)
