"""Router replicas sharing active-sequence changes end in the same state."""

from __future__ import annotations

import random

import pytest
from router_kv_tools import BS, SimWorker, held_paths, tokens

from armature.router.kv import KvRouter, KvRouterConfig
from armature.router.kv.messages import ProtocolMismatch, ReplicaSyncMessage, SeqFreed, decode_sync, encode_sync


class Bus:
    """Delivers each replica's sync messages to every replica, through the wire encoding."""

    def __init__(self) -> None:
        self.routers: list[KvRouter] = []
        self.sent = 0

    def publish(self, message: ReplicaSyncMessage) -> None:
        payload = encode_sync(message)
        self.sent += 1
        for r in self.routers:
            r.apply_remote(decode_sync(payload))  # a router drops its own echo


def replicas(config: KvRouterConfig) -> tuple[KvRouter, KvRouter, Bus]:
    bus = Bus()
    a = KvRouter(config, block_size=BS, sync_publisher=bus, rng=random.Random(1))
    b = KvRouter(config, block_size=BS, sync_publisher=bus, rng=random.Random(2))
    bus.routers += [a, b]
    return a, b, bus


def loads(router: KvRouter) -> list[tuple[int, int, int, int]]:
    return [(x.worker_id, x.dp_rank, x.active_decode_blocks, x.active_prefill_tokens) for x in router.active_loads()]


@pytest.mark.parametrize("use_kv_events", [True, False])
async def test_replicas_converge_to_equal_index_and_load(use_kv_events: bool) -> None:
    a, b, bus = replicas(KvRouterConfig(router_replica_sync=True, use_kv_events=use_kv_events))
    workers = [SimWorker(i) for i in (1, 2, 3)]
    for r in (a, b):
        for w in workers:
            r.register_worker(w.worker_id)
    rng = random.Random(11)
    live: list[tuple[KvRouter, str, SimWorker, list[int]]] = []
    for i in range(60):
        router = (a, b)[i % 2]
        toks = tokens(*[rng.choice("ABCD") for _ in range(rng.randint(2, 6))], tail=rng.randint(0, 15))
        d = router.best_worker(toks, request_id=f"req{i}")
        worker = next(w for w in workers if w.worker_id == d.worker_id)
        live.append((router, f"req{i}", worker, toks))
        if use_kv_events:
            for ev in worker.store(toks):  # both replicas subscribe to the same event stream
                a.apply_event(ev)
                b.apply_event(ev)
        if rng.random() < 0.6:
            r0, rid, _, _ = live[rng.randrange(len(live))]
            r0.mark_prefill_completed(rid)
        if rng.random() < 0.4:
            r0, rid, _, _ = live.pop(rng.randrange(len(live)))
            r0.mark_prefill_completed(rid)
            r0.free(rid)
    assert bus.sent > 60
    assert loads(a) == loads(b)
    assert sum(x[2] for x in loads(a)) > 0
    assert held_paths(a.dump_events()) == held_paths(b.dump_events())
    assert len(held_paths(a.dump_events())) > 10
    for _, rid, _, _ in live:
        owner = next(r for r, q, _, _ in live if q == rid)
        owner.free(rid)
    assert loads(a) == loads(b)
    assert all(x[2] == 0 and x[3] == 0 for x in loads(a))


async def test_alternating_replicas_balance_like_one_router() -> None:
    a, b, _ = replicas(KvRouterConfig(router_replica_sync=True))
    for r in (a, b):
        for wid in (1, 2, 3, 4):
            r.register_worker(wid)
    chosen = [((a, b)[i % 2]).best_worker(tokens(f"u{i}", f"v{i}"), request_id=f"r{i}").worker_id for i in range(12)]
    assert sorted(chosen.count(w) for w in (1, 2, 3, 4)) == [3, 3, 3, 3]


def test_sync_requires_a_publisher_and_checks_versions() -> None:
    with pytest.raises(ValueError):
        KvRouter(KvRouterConfig(router_replica_sync=True), block_size=BS)
    payload = bytearray(encode_sync(SeqFreed(router_id=1, request_id="x")))
    # The envelope is a msgpack map {"version": 1, ...}; flip the version byte.
    idx = payload.index(b"version") + len(b"version")
    payload[idx] = 99
    with pytest.raises(ProtocolMismatch):
        decode_sync(bytes(payload))
