"""Drives a workload against one OpenAI endpoint: closed loop (concurrency), open loop (Poisson
rate) or trace timestamps; stops after the workload, ``num_requests`` or ``duration_s``."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from armature.bench.client import RequestResult, StreamingClient
from armature.bench.report import BenchReport, Slo, summarize
from armature.bench.workload import Session, Turn, Workload


@dataclass
class RunConfig:
    url: str
    model: str
    concurrency: int | None = None  # closed loop: this many sessions at once
    request_rate: float | None = None  # open loop: Poisson arrivals per second (inf: all at once)
    duration_s: float | None = None  # stop starting sessions after this long
    endpoint: str = "chat"  # "chat" or "completions"
    api_key: str | None = None
    new_connection: bool = False
    ignore_eos: bool = True
    temperature: float | None = 0.0
    timeout_s: float = 600.0
    slo: Slo = field(default_factory=Slo)
    seed: int = 0
    progress: bool = True
    extra_body: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency <= 0:
            raise ValueError("--concurrency must be positive")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError("--request-rate must be positive")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be 'chat' or 'completions'")


@dataclass
class RunOutcome:
    report: BenchReport
    results: list[RequestResult]
    started_at: float  # perf_counter at the start (the results' start_s are on the same clock)


def _payload(cfg: RunConfig, session: Session, turn: Turn, history: list[dict[str, str]]) -> tuple[str, dict[str, object]]:
    body: dict[str, object] = {
        "model": cfg.model,
        "max_tokens": turn.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    p = turn.prompt
    if p.token_ids is not None or cfg.endpoint == "completions":
        if history:
            raise ValueError("multi-turn sessions need the chat endpoint")
        body["prompt"] = p.token_ids if p.token_ids is not None else p.text
        return "/completions", body
    messages = list(history)
    if not messages and session.system is not None:
        messages.append({"role": "system", "content": session.system})
    messages.append({"role": "user", "content": p.text or ""})
    body["messages"] = messages
    return "/chat/completions", body


async def _run_session(
    client: StreamingClient, cfg: RunConfig, session: Session, sink: Callable[[RequestResult], None]
) -> None:
    history: list[dict[str, str]] = []
    multi = len(session.turns) > 1
    for turn in session.turns:
        path, body = _payload(cfg, session, turn, history)
        result = await client.stream(path, body, keep_text=multi)
        sink(result)
        if not result.ok:
            return  # the rest of a failed conversation would not be the workload any more
        if multi:
            if not history and session.system is not None:
                history.append({"role": "system", "content": session.system})
            history.append({"role": "user", "content": turn.prompt.text or ""})
            history.append({"role": "assistant", "content": result.text})


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[errors]} errors"), transient=True,
            )  # fmt: skip
            self._task = self._bar.add_task("bench", total=total, errors=0)
            self._bar.start()
        self.errors = 0

    def advance(self, result: RequestResult) -> None:
        if not result.ok:
            self.errors += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, errors=self.errors)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


async def run(cfg: RunConfig, workload: Workload) -> RunOutcome:
    """Send ``workload`` to ``cfg.url``; returns the report and every request's result."""
    client = StreamingClient(cfg.url, cfg.api_key, cfg.new_connection, cfg.timeout_s)
    results: list[RequestResult] = []
    progress = _Progress(workload.num_requests, cfg.progress)

    def sink(r: RequestResult) -> None:
        results.append(r)
        progress.advance(r)

    sessions = list(workload.sessions)
    started = time.perf_counter()
    deadline = None if cfg.duration_s is None else started + cfg.duration_s
    rng = random.Random(cfg.seed)
    try:
        timed = all(s.arrival_s is not None for s in sessions) and cfg.concurrency is None and cfg.request_rate is None
        if timed or cfg.request_rate is not None:
            await _open_loop(client, cfg, sessions, sink, started, deadline, rng, timed)
        else:
            await _closed_loop(client, cfg, sessions, sink, deadline, cfg.concurrency or 1)
    finally:
        wall = time.perf_counter() - started
        progress.close()
        await client.close()
    params = {**workload.params, "url": cfg.url, "model": cfg.model, "concurrency": cfg.concurrency,
              "request_rate": cfg.request_rate, "duration_s": cfg.duration_s, "endpoint": cfg.endpoint,
              "new_connection": cfg.new_connection}  # fmt: skip
    report = summarize(results, wall, workload.name, workload.shareable_share, cfg.slo, params)
    return RunOutcome(report, results, started)


async def _closed_loop(
    client: StreamingClient,
    cfg: RunConfig,
    sessions: list[Session],
    sink: Callable[[RequestResult], None],
    deadline: float | None,
    concurrency: int,
) -> None:
    queue = iter(sessions)

    async def worker() -> None:
        for session in queue:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await _run_session(client, cfg, session, sink)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(
    client: StreamingClient,
    cfg: RunConfig,
    sessions: list[Session],
    sink: Callable[[RequestResult], None],
    started: float,
    deadline: float | None,
    rng: random.Random,
    timed: bool,
) -> None:
    limit = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: Session) -> None:
        if limit is None:
            await _run_session(client, cfg, session, sink)
            return
        async with limit:
            await _run_session(client, cfg, session, sink)

    at = 0.0
    try:
        for session in sessions:
            if timed:
                at = session.arrival_s or 0.0
            elif cfg.request_rate is not None and cfg.request_rate != float("inf"):
                at += rng.expovariate(cfg.request_rate)
            when = started + at
            if deadline is not None and when >= deadline:
                break
            delay = when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        for t in list(tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
