"""``python -m armature.router``: the KV router as its own process (Dynamo's standalone router).

It watches the workers of ``--endpoint`` (discovery), indexes their KV events, and serves two
endpoints on the runtime, under ``{namespace}.{--router-component}``:

- ``generate``: a ``PreprocessedRequest`` in, routed to the best worker, its ``LLMEngineOutput``
  stream forwarded back (booked, released at the first token and at the end, like the frontend's
  ``--router-mode kv``);
- ``best_worker_id``: a ``BestWorkerRequest`` (token ids, optional routing hints) in, one
  ``BestWorkerReply`` out; nothing is booked (for an external picker, e.g. a gateway).

    python -m armature.router --endpoint dynamo.backend.generate --router-block-size 64 \\
        --discovery-backend file
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence

import msgspec

from armature.protocols.llm import LLMEngineOutput, PreprocessedRequest, RoutingHints
from armature.router.kv.config import KvRouterConfig, add_router_args
from armature.router.kv.metrics import RouterMetrics
from armature.router.kv_binding import KvRouterBinding
from armature.router.kv_push import KvPushRouter
from armature.runtime.context import Context
from armature.runtime.runtime import DistributedRuntime, RuntimeSettings, parse_endpoint_path

log = logging.getLogger("armature.router")


class BestWorkerRequest(msgspec.Struct, kw_only=True):
    token_ids: list[int]
    routing: RoutingHints | None = None


class BestWorkerReply(msgspec.Struct, kw_only=True):
    worker_id: int
    dp_rank: int
    overlap_blocks: int
    request_blocks: int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m armature.router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--endpoint", required=True, help="the workers' endpoint, ns.component.endpoint (or dyn://…)")
    p.add_argument("--router-component", default="router", help="component this router serves under")
    p.add_argument("--log-level", default="info", help="debug|info|warning|error")
    RuntimeSettings.add_arguments(p)
    add_router_args(p)
    return p


class StandaloneRouter:
    def __init__(self, runtime: DistributedRuntime, endpoint: str, config: KvRouterConfig, component: str) -> None:
        if config.kv_cache_block_size is None:
            raise ValueError("the standalone router needs --router-block-size (--kv-cache-block-size)")
        self.runtime = runtime
        self.endpoint = endpoint
        self.namespace = parse_endpoint_path(endpoint)[0]
        self.component = component
        self.binding = KvRouterBinding(
            runtime, endpoint, config, config.kv_cache_block_size, RouterMetrics(runtime.metrics.registry)
        )
        self.router: KvPushRouter | None = None

    async def start(self) -> None:
        kv = await self.binding.start()
        client = await self.runtime.endpoint(self.endpoint).client(LLMEngineOutput)
        self.router = KvPushRouter(client, kv, on_close=self.binding.close)
        ns, comp = self.namespace, self.component
        await self.runtime.endpoint(f"{ns}.{comp}.generate").start_serving(
            self.generate, request_type=PreprocessedRequest
        )
        await self.runtime.endpoint(f"{ns}.{comp}.best_worker_id").start_serving(
            self.best_worker_id, request_type=BestWorkerRequest
        )
        log.info("KV router for %s serving %s.%s.{generate,best_worker_id}", self.endpoint, ns, comp)

    async def generate(self, request: PreprocessedRequest, context: Context) -> AsyncIterator[LLMEngineOutput]:
        assert self.router is not None
        _, stream = await self.router.generate(request, context)
        async for out in stream:
            yield out

    async def best_worker_id(self, request: BestWorkerRequest, context: Context) -> AsyncIterator[BestWorkerReply]:
        assert self.router is not None
        probe = PreprocessedRequest(model="", token_ids=request.token_ids, routing=request.routing)
        d = self.router.decide(probe, request_id=None)
        yield BestWorkerReply(worker_id=d.worker_id, dp_rank=d.dp_rank, overlap_blocks=d.overlap_blocks,
                              request_blocks=d.request_blocks)  # fmt: skip

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()


async def serve(ns: argparse.Namespace) -> int:
    config = KvRouterConfig.from_args(ns)
    runtime = DistributedRuntime.from_settings(RuntimeSettings.from_args(ns))
    await runtime.start()
    runtime.install_signal_handlers()
    router = StandaloneRouter(runtime, ns.endpoint, config, ns.router_component)
    try:
        await router.start()
        await runtime.wait_closed()
    finally:
        await router.close()
        if not runtime.shutting_down:
            await runtime.shutdown(grace_period_s=0.0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        parse_endpoint_path(ns.endpoint)
        if KvRouterConfig.from_args(ns).kv_cache_block_size is None:
            parser.error("--router-block-size (or --kv-cache-block-size) is required")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(ns))
