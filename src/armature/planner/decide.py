"""Scaling decisions from live load and latency (Dynamo's load-based planner).

Each latency target has its own model of latency against load, learnt from every worker's
samples. Solved backwards it gives the load a worker can carry within the SLA. When every worker
carries more than that, add one. When every worker would still be under it with one worker fewer
(times a sensitivity), remove one. Otherwise hold. One step per interval, so a change shows in the
samples before the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from armature.planner.regression import LoadLatencyModel


class Step(Enum):
    UP = 1
    HOLD = 0
    DOWN = -1


@dataclass(frozen=True)
class WorkerSample:
    """One worker at one sampling instant."""

    worker_id: int
    prefill_load: float  # prefill tokens in flight + the prompt of its last request
    decode_load: float  # active decode KV blocks
    ttft_s: float | None  # its last finished request's, if it finished one
    itl_s: float | None


@dataclass(frozen=True)
class Verdict:
    step: Step
    why: str


class SlaRule:
    """One latency target on one kind of load."""

    def __init__(
        self, name: str, target_s: float, window: int, min_observations: int, down_sensitivity: float
    ) -> None:
        self.name = name
        self.target_s = target_s
        self.model = LoadLatencyModel(window, min_observations)
        self._min = min_observations
        self._sensitivity = down_sensitivity  # fraction, e.g. 0.8

    def learn(self, load: float, latency_s: float | None) -> None:
        if latency_s is not None:
            self.model.observe(load, latency_s)

    def decide(self, loads: list[float], replicas: int) -> Verdict:
        """``loads``: each live worker's mean load over the interval."""
        fit = self.model.fit()
        if fit is None and len(self.model) < self._min:
            return Verdict(Step.HOLD, f"{self.name}: learning ({len(self.model)}/{self._min} observations)")
        if fit is None:
            return Verdict(Step.HOLD, f"{self.name}: learning (every observation at one load so far)")
        limit = fit.load_within(self.target_s)
        if limit is None:
            return Verdict(Step.HOLD, f"{self.name}: latency does not grow with load yet")
        if loads and all(x > limit for x in loads):
            return Verdict(Step.UP, f"{self.name}: every worker above {limit:.1f} (the SLA's load)")
        floor = limit * (replicas - 1) / replicas * self._sensitivity if replicas > 1 else 0.0
        if replicas > 1 and loads and all(x < floor for x in loads):
            return Verdict(Step.DOWN, f"{self.name}: every worker below {floor:.1f} with one fewer")
        return Verdict(Step.HOLD, f"{self.name}: within the SLA's load {limit:.1f}")


def combine(verdicts: list[Verdict]) -> Step:
    """Aggregated workers do both phases: up when either phase needs it, down only when both allow it."""
    steps = [v.step for v in verdicts]
    if Step.UP in steps:
        return Step.UP
    if steps and all(s is Step.DOWN for s in steps):
        return Step.DOWN
    return Step.HOLD


def clamp(target: int, min_endpoint: int, max_replicas: int | None) -> int:
    if max_replicas is not None:
        target = min(target, max_replicas)
    return max(target, min_endpoint)
