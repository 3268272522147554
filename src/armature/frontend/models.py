"""Which models the frontend serves: model cards watched in discovery, one pipeline per name.

Workers put their ``ModelCard`` under ``v1/mdc/{ns}/{component}/{endpoint}/{instance:x}`` on
their lease. A model appears with its first card and disappears when its last card goes (the
worker exited, or its lease expired). Loading a tokenizer takes a moment, so it happens on a
thread, once per model name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import msgspec

from armature.frontend.busy import BusyThresholds, LoadBoards
from armature.frontend.model_router import ModelRouter
from armature.frontend.preprocess import Preprocessor
from armature.frontend.tokenizer import ModelTokenizer, TokenizerLoadError
from armature.protocols.embedding import EmbeddingResponse
from armature.protocols.llm import LLMEngineOutput
from armature.protocols.model_card import ModelCard, ModelType
from armature.router.kv_push import KvPushRouter
from armature.router.prefill import DisaggRouter, PrefillRegistry, instance_of_key, is_prefill_card
from armature.router.push import EndpointClient, PushRouter, RouterMode
from armature.runtime.discovery.base import KeyValueStore, WatchEventKind
from armature.runtime.runtime import parse_endpoint_path

log = logging.getLogger(__name__)

MDC_PREFIX = "v1/mdc/"


@dataclass(frozen=True)
class ModelEvent:
    key: str  # one worker instance's card key
    card: ModelCard | None  # None: the card was removed


class ModelSource(Protocol):
    """Yields card additions and removals; an add for every card that exists when it starts."""

    def watch(self) -> AsyncIterator[ModelEvent]: ...


_json_card = msgspec.json.Decoder(ModelCard)
_msgpack_card = msgspec.msgpack.Decoder(ModelCard)


def decode_card(value: bytes) -> ModelCard:
    try:
        return _json_card.decode(value)
    except msgspec.DecodeError:
        return _msgpack_card.decode(value)


def _namespace_of(key: str) -> str:
    # v1/mdc/{ns}/{component}/{endpoint}/{instance}
    parts = key[len(MDC_PREFIX) :].split("/")
    return parts[0] if parts else ""


class DiscoveryModelSource:
    """Model cards from a ``KeyValueStore`` (mem, file or etcd), optionally for one namespace."""

    def __init__(
        self, store: KeyValueStore, namespace: str | None = None, namespace_prefix: str | None = None
    ) -> None:
        self._store = store
        self._namespace = namespace
        self._namespace_prefix = namespace_prefix

    def _wanted(self, key: str) -> bool:
        ns = _namespace_of(key)
        if self._namespace_prefix is not None:
            return ns.startswith(self._namespace_prefix)
        return self._namespace is None or ns == self._namespace

    async def watch(self) -> AsyncIterator[ModelEvent]:
        async for ev in self._store.watch_prefix(MDC_PREFIX):
            if not self._wanted(ev.key):
                continue
            if ev.kind is WatchEventKind.DELETE or ev.value is None:
                yield ModelEvent(ev.key, None)
                continue
            try:
                card = decode_card(ev.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("ignoring unreadable model card at %s: %s", ev.key, exc)
                continue
            yield ModelEvent(ev.key, card)


class ClientFactory(Protocol):
    """A client of the endpoint at ``path`` whose replies decode as ``response_type``."""

    def __call__(self, path: str, response_type: type = LLMEngineOutput, /) -> Awaitable[EndpointClient]: ...


Router = PushRouter | KvPushRouter | DisaggRouter | ModelRouter
# Builds the router of a newly served model (KV mode needs the card's block size and endpoint).
RouterFactory = Callable[[ModelCard, EndpointClient], Awaitable[Router]]


@dataclass
class ServedModel:
    name: str
    card: ModelCard
    preprocessor: Preprocessor
    router: Router
    migration_limit: int
    cards: dict[str, ModelCard] = field(default_factory=dict)  # key -> card, one per instance
    thresholds: BusyThresholds = field(default_factory=BusyThresholds)
    gate: ModelRouter | None = None  # ``router``'s own-workers-and-not-busy layer
    members: set[int] = field(default_factory=set)  # instance ids of the cards held

    def add_card(self, key: str, card: ModelCard) -> None:
        self.cards[key] = card
        self.members.add(instance_of_key(key))

    def remove_card(self, key: str) -> None:
        if self.cards.pop(key, None) is not None:
            self.members.discard(instance_of_key(key))

    def max_batched_tokens(self, worker_id: int) -> int | None:
        """The worker's ``max_num_batched_tokens`` from its card (the first card's if unknown)."""
        card = next((c for k, c in self.cards.items() if instance_of_key(k) == worker_id), self.card)
        return card.runtime_config.max_num_batched_tokens

    def has_instances(self) -> bool:
        return bool(self.router.instance_ids())

    def serves(self, model_type: ModelType) -> bool:
        return model_type in self.card.model_types


class ModelManager:
    """Keeps ``name -> ServedModel`` in step with a ``ModelSource``."""

    def __init__(
        self,
        client_factory: ClientFactory,
        router_mode: RouterMode,
        migration_limit: int = 0,
        kv_cache_block_size: int | None = None,
        router_factory: RouterFactory | None = None,
        decode_fallback: bool = False,
        load_boards: LoadBoards | None = None,
        busy: BusyThresholds | None = None,
    ) -> None:
        self._client_factory = client_factory
        # Busy detection: the thresholds new models start with (the --active-* flags).
        self._load_boards = load_boards
        self._busy_defaults = busy or BusyThresholds()
        # Prefill cards (disaggregated serving) feed prefill pools, never a served model.
        self.prefill = PrefillRegistry(client_factory, router_factory, router_mode, decode_fallback)
        self._router_factory = router_factory
        self._router_mode = router_mode
        self._migration_limit = migration_limit
        self._block_size = kv_cache_block_size
        self._models: dict[str, ServedModel] = {}
        self._name_by_key: dict[str, str] = {}
        self._clients: dict[tuple[str, type], EndpointClient] = {}
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Future[None]] = set()
        self.changed = asyncio.Event()

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def any_serving(self) -> bool:
        return any(m.has_instances() for m in self._models.values())

    async def run(self, source: ModelSource) -> None:
        async for event in source.watch():
            try:
                await self.apply(event)
            except Exception:  # one bad card must not stop the watcher
                log.exception("failed to apply model event for %s", event.key)

    async def apply(self, event: ModelEvent) -> None:
        async with self._lock:
            if event.card is None:
                self._remove(event.key)
            else:
                await self._add(event.key, event.card)
            self.changed.set()
            self.changed = asyncio.Event()

    async def _add(self, key: str, card: ModelCard) -> None:
        if self._block_size is not None:
            card = msgspec.structs.replace(card, kv_cache_block_size=self._block_size)
        if is_prefill_card(card):
            await self.prefill.add(key, card)
            served = self._models.get(card.name)
            if served is not None:
                served.router = self.prefill.wrap(card.name, served.router)
            return
        model = self._models.get(card.name)
        if model is not None:
            if card.tokenizer_path != model.card.tokenizer_path or card.chat_template != model.card.chat_template:
                log.warning(
                    "instance %s registers model %r with a different tokenizer or template; "
                    "keeping the first one's",
                    key,
                    card.name,
                )
            model.add_card(key, card)
            self._name_by_key[key] = card.name
            return
        try:
            tokenizer = await asyncio.to_thread(ModelTokenizer.from_dir, card.tokenizer_path, card.chat_template)
        except TokenizerLoadError as exc:
            log.error("cannot serve model %r: %s", card.name, exc)
            return
        limit = self._migration_limit if self._migration_limit > 0 else card.migration_limit
        router: Router
        if ModelType.EMBEDDING in card.model_types:
            # No KV reuse to route by and no prefill phase: spread embeddings over the workers.
            mode = RouterMode.ROUND_ROBIN if self._router_mode in (RouterMode.KV, RouterMode.DIRECT) else self._router_mode
            router = PushRouter(await self._client(card.endpoint, EmbeddingResponse), mode)
        else:
            client = await self._client(card.endpoint, LLMEngineOutput)
            if self._router_factory is not None:
                router = await self._router_factory(card, client)
            else:
                router = PushRouter(client, self._router_mode)
        served = ServedModel(
            name=card.name,
            card=card,
            preprocessor=Preprocessor(card, tokenizer),
            router=router,
            migration_limit=limit,
        )
        served.add_card(key, card)
        embedding = ModelType.EMBEDDING in card.model_types
        shed = not embedding and self._load_boards is not None
        served.gate = ModelRouter(
            router, card.name, lambda: served.members, (lambda: served.thresholds) if shed else None,
            served.max_batched_tokens,
        )  # fmt: skip
        served.router = served.gate
        if shed:
            await self.set_thresholds(served, replace(self._busy_defaults))
        if not embedding:
            served.router = self.prefill.wrap(card.name, served.router)
        self._models[card.name] = served
        self._name_by_key[key] = card.name
        log.info("serving model %r from %s (context %d)", card.name, card.endpoint, card.context_length)

    async def set_thresholds(self, model: ServedModel, thresholds: BusyThresholds) -> None:
        """Busy thresholds for ``model``; the first that enable detection subscribe to its load."""
        model.thresholds = thresholds
        gate = model.gate
        if gate is None or not gate.can_shed or gate.board is not None or not thresholds.enabled:
            return
        assert self._load_boards is not None
        namespace, component, _ = parse_endpoint_path(model.card.endpoint)
        gate.board = await self._load_boards.board(namespace, component)

    async def _client(self, endpoint: str, response_type: type) -> EndpointClient:
        key = (endpoint, response_type)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = await self._client_factory(endpoint, response_type)
        return client

    def _remove(self, key: str) -> None:
        if self.prefill.remove(key):
            return
        name = self._name_by_key.pop(key, None)
        if name is None:
            return
        model = self._models.get(name)
        if model is None:
            return
        model.remove_card(key)
        if not model.cards:
            del self._models[name]
            log.info("model %r has no workers left; removed", name)
            close = getattr(model.router, "close", None)
            if close is not None:
                self._closing.add(asyncio.ensure_future(close()))

    async def close(self) -> None:
        """Close every model's router (the KV router's subscriptions and tasks)."""
        for model in list(self._models.values()):
            close = getattr(model.router, "close", None)
            if close is not None:
                await close()
        if self._load_boards is not None:
            await self._load_boards.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.prefill.close()
