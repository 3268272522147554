"""The planner's loop: sample, learn, decide, scale; one step per interval.

It joins the runtime like any other process (discovery and event plane), watches the component's
workers, and keeps at least ``--min-endpoint`` of them, bringing the first ones up itself in the
local environment. After a step it waits until discovery shows it before deciding again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence

from armature.planner.config import PlannerConfig, parse_args
from armature.planner.connectors import Connector, LocalConnector, VirtualConnector
from armature.planner.decide import SlaRule, Step, Verdict, WorkerSample, clamp, combine
from armature.planner.observe import ComponentObserver
from armature.runtime.runtime import DistributedRuntime

log = logging.getLogger("armature.planner")


class Planner:
    def __init__(self, cfg: PlannerConfig, observer: ComponentObserver, connector: Connector) -> None:
        self.cfg = cfg
        self.observer = observer
        self.connector = connector
        rule = lambda name, target: SlaRule(  # noqa: E731 - two rules, same settings
            name, target, cfg.window, cfg.min_observations, cfg.down_sensitivity
        )
        self.prefill = rule("ttft", cfg.ttft_s) if cfg.mode == "agg" else None
        self.decode = rule("itl", cfg.itl_s)
        self._target: int | None = None
        self._acted_at = 0.0
        self._deaths_at_action = 0
        self._backoff_s = 0.0
        self._retry_at = 0.0

    def _settled(self) -> bool:
        if not self.connector.ready():
            return False
        if time.monotonic() < self._retry_at:
            return False
        if self._target is None or len(self.observer.live) == self._target:
            self._backoff_s = 0.0
            return True
        if self._retry_at:
            return True  # the back-off after a dead worker is over
        if isinstance(self.connector, LocalConnector) and self.connector.deaths > self._deaths_at_action:
            # A worker it started died: decide again rather than wait for it, but back off (up to
            # a minute) so a command that keeps failing is not restarted every interval.
            self._backoff_s = min(60.0, max(self.cfg.interval_s, 2 * self._backoff_s))
            self._retry_at = time.monotonic() + self._backoff_s
            self._deaths_at_action = self.connector.deaths
            return False
        return time.monotonic() - self._acted_at > self.cfg.settle_timeout_s

    async def _sample_interval(self) -> list[WorkerSample]:
        """``--load-metric-samples`` samples over the interval; each one also teaches the rules."""
        samples: list[WorkerSample] = []
        pause = self.cfg.interval_s / self.cfg.samples
        for _ in range(self.cfg.samples):
            await asyncio.sleep(pause)
            for s in await self.observer.sample():
                samples.append(s)
                self.decode.learn(s.decode_load, s.itl_s)
                if self.prefill is not None:
                    self.prefill.learn(s.prefill_load, s.ttft_s)
        return samples

    @staticmethod
    def _means(samples: list[WorkerSample], attr: str) -> list[float]:
        per: dict[int, list[float]] = {}
        for s in samples:
            per.setdefault(s.worker_id, []).append(getattr(s, attr))
        return [sum(v) / len(v) for v in per.values()]

    def decide(self, samples: list[WorkerSample], replicas: int) -> tuple[int, list[Verdict]]:
        if replicas < self.cfg.min_endpoint:
            return self.cfg.min_endpoint, [Verdict(Step.UP, f"below --min-endpoint {self.cfg.min_endpoint}")]
        verdicts = [self.decode.decide(self._means(samples, "decode_load"), replicas)]
        if self.prefill is not None:
            verdicts.insert(0, self.prefill.decide(self._means(samples, "prefill_load"), replicas))
        step = combine(verdicts)
        return clamp(replicas + step.value, self.cfg.min_endpoint, self.cfg.max_replicas), verdicts

    async def step(self) -> None:
        samples = await self._sample_interval()
        if isinstance(self.connector, VirtualConnector):
            await self.connector.refresh()
        if not self._settled():
            if time.monotonic() < self._retry_at:
                log.info("a worker died; backing off %.1f s before starting another", self._backoff_s)
            else:
                live = len(self.observer.live)
                log.info("waiting for the last step to show (%d live, target %s)", live, self._target)
            return
        replicas = len(self.observer.live)
        target, verdicts = self.decide(samples, replicas)
        why = "; ".join(v.why for v in verdicts)
        if target == replicas:
            log.info("%s: %d workers, hold (%s)", self.cfg.component, replicas, why)
            return
        log.info("%s: %d -> %d workers (%s)%s", self.cfg.component, replicas, target, why,
                 " [no operation]" if self.cfg.no_operation else "")  # fmt: skip
        if self.cfg.no_operation:
            return
        await self.connector.scale(self.cfg.component, target, replicas)
        self._target = target
        self._acted_at = time.monotonic()
        self._retry_at = 0.0
        if isinstance(self.connector, LocalConnector):
            self._deaths_at_action = self.connector.deaths


async def run(cfg: PlannerConfig) -> int:
    runtime = DistributedRuntime.from_settings(cfg.runtime)
    await runtime.start()
    observer = ComponentObserver(runtime, cfg.namespace, cfg.component, cfg.metrics_url, cfg.metrics_prefix,
                                 cfg.model_name)  # fmt: skip
    connector: Connector
    if cfg.environment == "local":
        connector = LocalConnector({cfg.component: cfg.worker_command}, cfg.log_dir)
    else:
        connector = VirtualConnector(runtime.discovery, cfg.namespace)
    planner = Planner(cfg, observer, connector)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await observer.start()
        log.info("planner for %s.%s: mode %s, %s environment, TTFT %.3g ms, ITL %.3g ms, %d..%s workers",
                 cfg.namespace, cfg.component, cfg.mode, cfg.environment, cfg.ttft_s * 1000, cfg.itl_s * 1000,
                 cfg.min_endpoint, cfg.max_replicas if cfg.max_replicas is not None else "any")  # fmt: skip
        while not stop.is_set():
            stepping = asyncio.ensure_future(planner.step())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({stepping, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not stepping.done():
                stepping.cancel()
            elif stepping.exception() is not None:
                log.error("planning step failed: %s", stepping.exception())
            stopping.cancel()
    finally:
        log.info("planner stopping")
        await connector.close()
        await observer.close()
        await runtime.shutdown(grace_period_s=0.0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cfg, level = parse_args(argv)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    return asyncio.run(run(cfg))
