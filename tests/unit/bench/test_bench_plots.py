"""armature bench plots: one PNG per run, from the requests that got a first token."""

from __future__ import annotations

from pathlib import Path

from armature.bench.client import RequestResult
from armature.bench.plots import write_plots


def test_plots_skip_requests_without_a_first_token(tmp_path: Path) -> None:
    results = [
        RequestResult(ok=True, start_s=10.0, ttft_s=0.05, e2e_s=0.5, itls_s=[0.01, 0.02], output_tokens=3),
        RequestResult(ok=True, start_s=10.1, ttft_s=None, e2e_s=0.2),  # finished with no token
        RequestResult(ok=False, start_s=10.2, status=503, e2e_s=0.01, error="no instances"),
    ]
    assert write_plots(results, 10.0, tmp_path, "run") == [tmp_path / "run.png"]
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


def test_no_plot_when_no_request_got_a_token(tmp_path: Path) -> None:
    results = [RequestResult(ok=False, start_s=1.0, status=503), RequestResult(ok=True, start_s=1.0)]
    assert write_plots(results, 0.0, tmp_path, "run") == []
