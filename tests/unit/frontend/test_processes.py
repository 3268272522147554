"""``--http-processes``: the flag's checks, and one ``/metrics`` page out of every process's."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from armature.frontend.args import parse_args
from armature.frontend.metrics import FrontendMetrics
from armature.frontend.processes import merge_pages
from armature.router.kv.metrics import RouterMetrics


def samples(page: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(page.decode())
        for s in fam.samples
    }


def busy_process(requests: int, inflight: int, ttft_s: float) -> FrontendMetrics:
    m = FrontendMetrics()
    m.requests.labels("m", "chat_completions", "stream", "success").inc(requests)
    m.inflight.labels("m").set(inflight)
    m.ttft.labels("m").observe(ttft_s)
    return m


def test_one_page_comes_back_unchanged() -> None:
    page = busy_process(3, 1, 0.02).render()
    assert samples(merge_pages([page])) == samples(page)


def test_counters_gauges_and_histograms_add_up_over_processes() -> None:
    a, b = busy_process(3, 1, 0.002), busy_process(5, 2, 0.2)
    merged = samples(merge_pages([a.render(), b.render()]))
    req = ("armature_frontend_requests_total",
           (("endpoint", "chat_completions"), ("model", "m"), ("request_type", "stream"), ("status", "success")))  # fmt: skip
    assert merged[req] == 8
    assert merged[("armature_frontend_inflight_requests", (("model", "m"),))] == 3
    ttft = "armature_frontend_time_to_first_token_seconds"
    assert merged[(f"{ttft}_count", (("model", "m"),))] == 2
    assert merged[(f"{ttft}_sum", (("model", "m"),))] == pytest.approx(0.202)
    assert merged[(f"{ttft}_bucket", (("le", "0.0025"), ("model", "m")))] == 1  # only the fast one
    assert merged[(f"{ttft}_bucket", (("le", "+Inf"), ("model", "m")))] == 2


def test_a_series_began_when_its_first_process_began_it() -> None:
    a, b = busy_process(1, 0, 0.1), busy_process(1, 0, 0.1)
    pa, pb = samples(a.render()), samples(b.render())
    created = next(k for k in pa if k[0] == "armature_frontend_requests_created")
    assert samples(merge_pages([a.render(), b.render()]))[created] == min(pa[created], pb[created])


def test_what_every_router_holds_a_copy_of_is_not_counted_twice() -> None:
    pages = []
    for active in (4, 6):
        registry = CollectorRegistry()
        router = RouterMetrics(registry)
        router.set_worker_load(0xAB, 0, decode_blocks=active, prefill_tokens=0)
        router.worker_cached_blocks.labels("ab", "0").set(100)  # both indexes saw the same events
        router.event_types["stored"].inc(7)
        pages.append(_render(registry))
    merged = samples(merge_pages(pages))
    worker = (("dp_rank", "0"), ("worker_id", "ab"))
    assert merged[("armature_router_worker_cached_blocks", worker)] == 100
    assert merged[("armature_router_worker_active_decode_blocks", worker)] == 10  # each router's own
    assert merged[("armature_router_kv_events_applied_total", (("event_type", "stored"),))] == 7


def test_label_values_keep_their_quotes_and_newlines() -> None:
    registry = CollectorRegistry()
    Gauge("odd", "a gauge", ["name"], registry=registry).labels('say "hi"\nthere\\').set(1)
    page = _render(registry)
    assert samples(merge_pages([page, page])) == {("odd", (("name", 'say "hi"\nthere\\'),)): 2.0}


def _render(registry: CollectorRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)


def test_http_processes_flag_and_env() -> None:
    file_discovery = ["--discovery-backend", "file"]
    assert parse_args(file_discovery, env={}).http_processes == 1
    assert parse_args([*file_discovery, "--http-processes", "4"], env={}).http_processes == 4
    assert parse_args(file_discovery, env={"ARMATURE_HTTP_PROCESSES": "3"}).http_processes == 3


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--discovery-backend", "file", "--http-processes", "0"], "--http-processes must be >= 1"),
        (["--discovery-backend", "mem", "--http-processes", "2"], "needs discovery the processes share"),
    ],
)
def test_http_processes_refused(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env={})
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
