"""The planner's decisions from load and latency (pure: the regression, the rules, the limits)."""

from __future__ import annotations

import pytest

from armature.planner.decide import SlaRule, Step, Verdict, clamp, combine
from armature.planner.observe import scrape_worker_latency
from armature.planner.regression import Fit, LoadLatencyModel


def test_the_fit_recovers_a_line_and_solves_it_backwards() -> None:
    model = LoadLatencyModel(window=10, min_observations=3)
    for x in range(5):
        model.observe(x * 10.0, 0.005 + 0.001 * x * 10.0)
    fit = model.fit()
    assert fit is not None
    assert fit.slope == pytest.approx(0.001) and fit.intercept == pytest.approx(0.005)
    assert fit.load_within(0.050) == pytest.approx(45.0)  # 5 ms + 1 ms per unit of load
    assert Fit(0.001, 0.080).load_within(0.050) == 0.0  # even idle misses the SLA
    assert Fit(-0.001, 0.010).load_within(0.050) is None  # latency falling with load: no answer


def test_the_fit_waits_for_enough_spread_out_observations() -> None:
    model = LoadLatencyModel(window=4, min_observations=3)
    model.observe(1.0, 0.1)
    model.observe(2.0, 0.2)
    assert model.fit() is None
    model.observe(2.0, 0.2)
    assert model.fit() is not None
    flat = LoadLatencyModel(window=4, min_observations=2)
    for _ in range(3):
        flat.observe(5.0, 0.1)
    assert flat.fit() is None  # one load level only: nothing to regress
    for x in range(10):  # the window keeps the last four
        flat.observe(float(x), 0.01 * x)
    assert len(flat) == 4


def _rule(target_s: float = 0.050) -> SlaRule:
    rule = SlaRule("itl", target_s, window=50, min_observations=3, down_sensitivity=0.8)
    for x in range(0, 100, 10):
        rule.learn(float(x), 0.005 + 0.001 * x)  # SLA load 45
    return rule


def test_up_when_every_worker_is_past_the_sla_load() -> None:
    assert _rule().decide([50.0, 60.0], replicas=2).step is Step.UP
    assert _rule().decide([50.0, 30.0], replicas=2).step is Step.HOLD  # one still has room


def test_down_when_every_worker_fits_with_one_fewer() -> None:
    # With 2 workers, one fewer must fit 45 * 1/2 * 0.8 = 18.
    assert _rule().decide([10.0, 17.0], replicas=2).step is Step.DOWN
    assert _rule().decide([10.0, 19.0], replicas=2).step is Step.HOLD
    assert _rule().decide([0.0], replicas=1).step is Step.HOLD  # never below one by this rule


def test_nothing_is_decided_while_learning_or_without_latency() -> None:
    rule = SlaRule("ttft", 0.5, window=50, min_observations=5, down_sensitivity=0.8)
    rule.learn(10.0, None)  # a worker that has not finished a request yet teaches nothing
    rule.learn(20.0, 0.1)
    verdict = rule.decide([1000.0], replicas=1)
    assert verdict.step is Step.HOLD and "learning (1/5" in verdict.why


def test_aggregated_workers_scale_up_on_either_phase_down_only_on_both() -> None:
    up, hold, down = Verdict(Step.UP, ""), Verdict(Step.HOLD, ""), Verdict(Step.DOWN, "")
    assert combine([hold, up]) is Step.UP
    assert combine([down, hold]) is Step.HOLD
    assert combine([down, down]) is Step.DOWN
    assert clamp(9, 1, 8) == 8 and clamp(0, 1, 8) == 1 and clamp(12, 2, None) == 12


def test_per_worker_latency_is_read_from_the_frontend_page() -> None:
    page = "\n".join([
        "# TYPE armature_frontend_worker_last_time_to_first_token_seconds gauge",
        'armature_frontend_worker_last_time_to_first_token_seconds{model="m",worker_id="1f"} 0.25',
        'armature_frontend_worker_last_time_to_first_token_seconds{model="other",worker_id="2a"} 9.0',
        "# TYPE armature_frontend_worker_last_inter_token_latency_seconds gauge",
        'armature_frontend_worker_last_inter_token_latency_seconds{model="m",worker_id="1f"} 0.02',
        "# TYPE armature_frontend_worker_last_input_sequence_tokens gauge",
        'armature_frontend_worker_last_input_sequence_tokens{model="m",worker_id="1f"} 300.0',
    ]) + "\n"  # fmt: skip
    assert scrape_worker_latency(page, "armature_frontend", "m") == {
        0x1F: {"ttft": 0.25, "itl": 0.02, "isl": 300.0}
    }
    assert set(scrape_worker_latency(page, "armature_frontend", None)) == {0x1F, 0x2A}
