"""The OpenAI-compatible HTTP service: routes, limits, auth, health, metrics, OpenAPI.

``Frontend`` is built from a ``ModelSource`` (where model cards come from) and a client factory
(how to reach an endpoint), so the standalone ``python -m armature.frontend`` and the embedded
``armature serve`` (frontend and worker in one process, in-memory discovery) share all of it.
It is the ``Application`` that ``http_server.HttpServer`` serves: every route answers with a
``Reply`` or a ``StreamReply``, and every failure becomes an OpenAI-style error reply.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from armature.frontend.busy import BusyThresholds, LoadBoards, ServiceOverloaded
from armature.frontend.busy_thresholds import set_thresholds, threshold_list
from armature.frontend.embeddings import create_embeddings, embedding_request_decoder
from armature.frontend.errors import ApiError, from_decode_error
from armature.frontend.http_server import Application, HttpRequest, Reply, SseSink, StreamReply
from armature.frontend.metrics import CONTENT_TYPE, FrontendMetrics
from armature.frontend.models import ClientFactory, ModelManager, ModelSource, RouterFactory, ServedModel
from armature.frontend.openapi import openapi_document
from armature.frontend.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    ModelObject,
    chat_request_decoder,
    completion_request_decoder,
    json_encoder,
)
from armature.frontend.pipeline import RequestPipeline
from armature.frontend.postprocess import EngineStreamError
from armature.frontend.response import chat_aggregate, chat_stream, completion_aggregate, completion_stream
from armature.frontend.sse import frame
from armature.protocols.model_card import ModelType
from armature.router.push import DirectTargetError, NoInstancesError, RouterMode
from armature.runtime.context import Context
from armature.runtime.request_plane.base import RequestPlaneError

log = logging.getLogger(__name__)

DEFAULT_BODY_LIMIT = 16 * 1024 * 1024
_ROUTE_OF = {
    ModelType.CHAT: "/v1/chat/completions",
    ModelType.COMPLETIONS: "/v1/completions",
    ModelType.EMBEDDING: "/v1/embeddings",
}


@dataclass
class FrontendConfig:
    router_mode: RouterMode = RouterMode.ROUND_ROBIN
    migration_limit: int = 0
    kv_cache_block_size: int | None = None
    api_key: str | None = None
    body_limit_bytes: int = DEFAULT_BODY_LIMIT
    # Disaggregated models with no prefill worker left: decode aggregated instead of 503.
    decode_fallback: bool = False
    # Busy detection's starting thresholds for every model (all None: off until /busy_threshold).
    busy: BusyThresholds = field(default_factory=BusyThresholds)


Route = Callable[[HttpRequest], Awaitable["Reply | StreamReply"]]


def _error_reply(err: ApiError) -> Reply:
    return Reply(err.status, err.body())


def _json_reply(body: Any, status: int = 200) -> Reply:
    return Reply(status, msgspec.json.encode(body))


def _stream_error(err: ApiError) -> bytes:
    return frame(err.body())


def _engine_failure(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ServiceOverloaded):
        return ApiError(503, str(exc), code="service_unavailable")
    if isinstance(exc, NoInstancesError):
        return ApiError(503, str(exc), code="no_workers")
    if isinstance(exc, DirectTargetError):
        return ApiError(400, str(exc), param="nvext.backend_instance_id")
    if isinstance(exc, RequestPlaneError):
        if exc.kind == "invalid_request":
            return ApiError(400, f"the worker rejected the request: {exc.message}")
        return ApiError(503, f"the worker failed: {exc}", code=exc.kind)
    if isinstance(exc, EngineStreamError):
        return ApiError(500, f"the worker failed the request: {exc}", code="engine_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


class Frontend(Application):
    def __init__(
        self,
        source: ModelSource,
        client_factory: ClientFactory,
        config: FrontendConfig | None = None,
        metrics: FrontendMetrics | None = None,
        router_factory: RouterFactory | None = None,
        load_boards: LoadBoards | None = None,
    ) -> None:
        self.config = config or FrontendConfig()
        if self.config.router_mode is RouterMode.KV and router_factory is None:
            raise ValueError("--router-mode kv needs a KV router factory (armature.router.kv_binding)")
        self.metrics = metrics or FrontendMetrics()
        self.models = ModelManager(
            client_factory,
            self.config.router_mode,
            self.config.migration_limit,
            self.config.kv_cache_block_size,
            router_factory,
            decode_fallback=self.config.decode_fallback,
            load_boards=load_boards,
            busy=self.config.busy,
        )
        self._source = source
        # With --http-processes: every process's metrics merged (armature.frontend.processes).
        self.metrics_page: Callable[[], Awaitable[bytes]] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._routes: dict[str, dict[str, Route]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/models": {"GET": self._list_models},
            "/health": {"GET": self._health},
            "/live": {"GET": self._live},
            "/metrics": {"GET": self._metrics},
            "/busy_threshold": {"GET": self._busy_list, "POST": self._busy_set},
            "/openapi.json": {"GET": self._openapi},
        }

    @property
    def body_limit_bytes(self) -> int:  # type: ignore[override]
        return self.config.body_limit_bytes

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.ensure_future(self.models.run(self._source))

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._watch_task = None
        await self.models.close()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503, /health unhealthy) and wait for in-flight ones."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("%d requests still running after %.1f s of draining", self._inflight, timeout_s)

    async def wait_for_model(self, name: str | None = None, timeout_s: float = 30.0) -> None:
        """Wait until a model (any, when ``name`` is None) is served by a live instance."""
        deadline = time.monotonic() + timeout_s
        while True:
            if name is None and self.models.any_serving():
                return
            m = self.models.get(name) if name is not None else None
            if m is not None and m.has_instances():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no worker serves {name or 'any model'} after {timeout_s} s")
            await asyncio.sleep(min(0.05, left))

    # ---------------------------------------------------------------- app

    def error_reply(self, status: int, message: str) -> Reply:
        return _error_reply(ApiError(status, message))

    async def handle(self, request: HttpRequest) -> Reply | StreamReply:
        routes = self._routes.get(request.path)
        if routes is None:
            return _error_reply(ApiError(404, "Not Found"))
        route = routes.get("GET" if request.method == "HEAD" else request.method)
        if route is None:
            allowed = ", ".join(sorted(set(routes) | ({"HEAD"} if "GET" in routes else set())))
            reply = _error_reply(ApiError(405, "Method Not Allowed"))
            reply.headers.append(("allow", allowed))
            return reply
        try:
            return await route(request)
        except ApiError as exc:
            return _error_reply(exc)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            log.exception("unhandled error on %s", request.path, exc_info=exc)
            return _error_reply(_engine_failure(exc))

    # ---------------------------------------------------------------- helpers

    def _check_auth(self, request: HttpRequest) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")

    def _model(self, name: str, model_type: ModelType) -> ServedModel:
        if self.draining:
            raise ApiError(503, "the frontend is shutting down", code="draining")
        model = self.models.get(name)
        if model is None and not self.models.models():
            raise ApiError(503, "no worker is serving any model right now; retry later", code="no_workers")
        if model is None:
            known = ", ".join(sorted(m.name for m in self.models.models())) or "none"
            raise ApiError(404, f"model '{name}' not found (served: {known})", param="model", code="model_not_found")
        if not model.serves(model_type):
            served = ", ".join(t.value for t in model.card.model_types)
            raise ApiError(
                400, f"model '{name}' does not serve {_ROUTE_OF[model_type]} (it serves: {served})",
                param="model", code="model_not_supported",
            )  # fmt: skip
        if not model.has_instances():
            raise ApiError(503, f"no worker is serving model '{name}' right now", code="no_workers")
        return model

    def _enter(self, model: str) -> None:
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.labels(model).inc()

    def _leave(self, model: str) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        self.metrics.inflight.labels(model).dec()

    # ---------------------------------------------------------------- OpenAI routes

    async def _chat(self, request: HttpRequest) -> Reply | StreamReply:
        return await self._generate(request, chat=True)

    async def _completions(self, request: HttpRequest) -> Reply | StreamReply:
        return await self._generate(request, chat=False)

    async def _generate(self, request: HttpRequest, chat: bool) -> Reply | StreamReply:
        started = time.monotonic()
        self._check_auth(request)
        body = request.body
        decoder = chat_request_decoder if chat else completion_request_decoder
        try:
            req: ChatCompletionRequest | CompletionRequest = decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise from_decode_error(exc) from None
        model = self._model(req.model, ModelType.CHAT if chat else ModelType.COMPLETIONS)
        pre = model.preprocessor
        if isinstance(req, ChatCompletionRequest):
            prepared = await pre.chat(req)
        else:
            prepared = await pre.completion(req)
        endpoint = "chat_completions" if chat else "completions"
        context = Context()
        pipeline = RequestPipeline(model, prepared, self.metrics, context, started, keep_text=not req.stream)
        self._enter(model.name)
        try:
            await pipeline.open()
        except BaseException as exc:
            pipeline.cancel()
            self._leave(model.name)
            pipeline.record_end(False, endpoint, req.stream)
            raise _engine_failure(exc) from exc
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        if req.stream:
            sink = SseSink()
            gen = (chat_stream if chat else completion_stream)(pipeline, include_usage, continuous, sink)
            return StreamReply(self._guard_stream(pipeline, gen, endpoint), pipeline.cancel, sink)
        ok = False
        try:
            payload = await (chat_aggregate if chat else completion_aggregate)(pipeline)
            ok = True
            return Reply(200, payload)
        except asyncio.CancelledError:
            # The client went away (the server cancels the request's task): stop the engine.
            pipeline.cancel()
            self.metrics.disconnects.labels(model.name).inc()
            raise
        except Exception as exc:
            raise _engine_failure(exc) from exc
        finally:
            pipeline.cancel()
            self._leave(model.name)
            pipeline.record_end(ok, endpoint, False)

    async def _embeddings(self, request: HttpRequest) -> Reply:
        started = time.monotonic()
        self._check_auth(request)
        try:
            req = embedding_request_decoder.decode(request.body)
        except msgspec.DecodeError as exc:
            raise from_decode_error(exc) from None
        model = self._model(req.model, ModelType.EMBEDDING)
        context = Context()
        self._enter(model.name)
        ok = False
        prompt_tokens = 0
        try:
            body, prompt_tokens = await create_embeddings(model, req, context)
            ok = True
            return Reply(200, body)
        except asyncio.CancelledError:
            self.metrics.disconnects.labels(model.name).inc()
            raise
        except ApiError:
            raise
        except Exception as exc:
            raise _engine_failure(exc) from exc
        finally:
            # Whatever still runs (the client went away, an error) is cancelled on the worker.
            context.kill()
            self._leave(model.name)
            m = self.metrics
            m.requests.labels(model.name, "embeddings", "unary", "success" if ok else "error").inc()
            m.isl.labels(model.name).observe(prompt_tokens)
            m.duration.labels(model.name).observe(time.monotonic() - started)

    async def _guard_stream(self, pipeline: RequestPipeline, gen: Any, endpoint: str) -> Any:
        ok = False
        try:
            async for chunk in gen:
                yield chunk
            ok = True
        except asyncio.CancelledError:
            self.metrics.disconnects.labels(pipeline.model.name).inc()
            raise
        except Exception as exc:  # after the 200 header: report in-band, as OpenAI does
            err = _engine_failure(exc)
            if err.status >= 500:
                log.error("stream for %s failed: %s", pipeline.model.name, exc)
            yield _stream_error(err)
        finally:
            pipeline.cancel()
            await gen.aclose()
            self._leave(pipeline.model.name)
            pipeline.record_end(ok, endpoint, True)

    # ---------------------------------------------------------------- other routes

    async def _list_models(self, request: HttpRequest) -> Reply:
        self._check_auth(request)
        data = [
            ModelObject(m.name, "model", 0, "armature") for m in sorted(self.models.models(), key=lambda m: m.name)
        ]
        return Reply(200, json_encoder.encode(ModelList("list", data)))

    async def _health(self, request: HttpRequest) -> Reply:
        models = self.models.models()
        serving = [m for m in models if m.has_instances()]
        status = "draining" if self.draining else ("healthy" if serving else "unhealthy")
        body = {
            "status": status,
            "models": sorted(m.name for m in serving),
            "endpoints": sorted({f"dyn://{m.card.endpoint}" for m in serving}),
            "instances": sorted({f"{i:x}" for m in serving for i in m.router.instance_ids()}),
        }
        return _json_reply(body, 200 if status == "healthy" else 503)

    async def _busy_list(self, request: HttpRequest) -> Reply:
        self._check_auth(request)
        return _json_reply(threshold_list(self.models.models()))

    async def _busy_set(self, request: HttpRequest) -> Reply:
        self._check_auth(request)
        return _json_reply(await set_thresholds(self.models, request.body))

    async def _live(self, request: HttpRequest) -> Reply:
        if self.draining:
            return _json_reply({"status": "shutting_down"}, 503)
        return _json_reply({"status": "live"})

    async def _metrics(self, request: HttpRequest) -> Reply:
        page = await self.metrics_page() if self.metrics_page is not None else self.metrics.render()
        return Reply(200, page, CONTENT_TYPE)

    async def _openapi(self, request: HttpRequest) -> Reply:
        return Reply(200, openapi_document(tuple(sorted(m.name for m in self.models.models()))))
