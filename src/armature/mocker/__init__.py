"""The mocker: the native engine's scheduler and radix cache with a simulated, timed runner."""

from __future__ import annotations

from armature.mocker.args import MockerArgs
from armature.mocker.engine import MockerEngine
from armature.mocker.runner import PageCounter, SimulatedExecutor, StepRecord
from armature.mocker.timing import PolynomialTiming

__all__ = ["MockerArgs", "MockerEngine", "PageCounter", "PolynomialTiming", "SimulatedExecutor", "StepRecord"]
