"""Routing decisions through the public KvRouter API: KV events in, a worker out."""

from __future__ import annotations

import logging
import random

import pytest
from router_kv_tools import BS, SimWorker, tokens

from armature.protocols.llm import RoutingHints
from armature.router.kv import KvRouter, KvRouterConfig, NoWorkersError, UnknownWorkerError

W1, W2 = 0x11, 0x22


async def seeded_router(config: KvRouterConfig | None = None) -> tuple[KvRouter, SimWorker, SimWorker]:
    router = KvRouter(config, block_size=BS, rng=random.Random(0))
    w1, w2 = SimWorker(W1), SimWorker(W2)
    for w in (w1, w2):
        await router.add_worker(w.worker_id)
    for worker, labels in ((w1, "AB"), (w1, "ACD"), (w2, "ACE")):
        for ev in worker.store(tokens(*labels)):
            await router.on_event(ev)
    return router, w1, w2


async def test_dynamo_decision_scenario() -> None:
    router, w1, _ = await seeded_router()
    assert router.find_matches(tokens(*"ACDF")).tree_sizes == {(W1, 0): 4, (W2, 0): 3}

    first = router.best_worker(tokens(*"ACDF"), request_id="r1")
    assert (first.worker_id, first.overlap_blocks) == (W1, 3)
    # w1 serves it: first token, its cache now holds F too, and the request completes.
    assert router.mark_prefill_completed("r1")
    for ev in w1.store(tokens(*"ACDF")):
        await router.on_event(ev)
    assert router.free("r1")

    # Both hold A,C (overlap 2, equal cost); w2 has fewer cached blocks (3 vs 5).
    scores = router.find_matches(tokens(*"ACG"))
    assert scores.scores == {(W1, 0): 2, (W2, 0): 2}
    assert scores.tree_sizes == {(W1, 0): 5, (W2, 0): 3}
    for _ in range(5):
        second = router.best_worker(tokens(*"ACG"))
        assert (second.worker_id, second.overlap_blocks) == (W2, 2)


@pytest.mark.parametrize("seed", range(6))
async def test_cost_tie_goes_to_the_worker_that_holds_the_prefix(seed: int) -> None:
    """At equal cost, the worker that caches the request's prefix stores only its tail; the
    other would compute and store the whole prefix again. The holder wins even though it
    caches more blocks in all."""
    router = KvRouter(block_size=BS, rng=random.Random(seed))
    holder, other = SimWorker(W1), SimWorker(W2)
    for w in (holder, other):
        await router.add_worker(w.worker_id)
    prefix = [f"p{i}" for i in range(8)]
    for ev in [*holder.store(tokens(*prefix)), *other.store(tokens(*"UVW"))]:
        await router.on_event(ev)
    # The holder runs a foreign 8-block request (prefill done): exactly what the cache saves.
    router.best_worker(tokens(*[f"f{i}" for i in range(8)]), request_id="f", hints=RoutingHints(backend_instance_id=W1))
    router.mark_prefill_completed("f")

    req = tokens(*prefix, "x")
    costs = {c.worker_id: c for c in router.potential_loads(req)}
    assert costs[W1].logit == costs[W2].logit == 8 + 1 + 9  # load + prefill blocks + decode blocks
    assert (costs[W1].tree_size, costs[W2].tree_size) == (8, 3)
    d = router.best_worker(req, request_id="r")
    assert (d.worker_id, d.overlap_blocks) == (W1, 8)


async def test_cost_counts_active_load_until_freed() -> None:
    router, _, _ = await seeded_router()
    # Three long requests with no cache anywhere: the second avoids the first one's worker.
    a = router.best_worker(tokens(*"XYZ"), request_id="a")
    b = router.best_worker(tokens(*"QRS"), request_id="b")
    assert a.worker_id != b.worker_id
    loads = {(x.worker_id, x.dp_rank): x for x in router.active_loads()}
    assert loads[(a.worker_id, 0)].active_prefill_tokens == 3 * BS
    assert loads[(a.worker_id, 0)].active_decode_blocks == 3
    router.mark_prefill_completed("a")
    router.free("b")
    loads = {(x.worker_id, x.dp_rank): x for x in router.active_loads()}
    assert loads[(a.worker_id, 0)].active_prefill_tokens == 0
    assert loads[(a.worker_id, 0)].active_decode_blocks == 3
    assert loads[(b.worker_id, 0)].active_decode_blocks == 0
    assert not router.free("b")


async def test_shared_active_prefix_counts_once() -> None:
    router = KvRouter(block_size=BS)
    router.register_worker(1)
    router.best_worker(tokens(*"PQR", tail=3), request_id="x", hints=RoutingHints(backend_instance_id=1))
    router.best_worker(tokens(*"PQS"), request_id="y", hints=RoutingHints(backend_instance_id=1))
    # P,Q shared; R, S and the partial tail block are separate: 5 unique blocks.
    assert router.active_loads()[0].active_decode_blocks == 5
    costs = router.potential_loads(tokens(*"PQT"))
    assert costs[0].decode_blocks == 5 + 1  # only T is new
    router.free("x")
    assert router.active_loads()[0].active_decode_blocks == 3
    router.free("y")
    assert router.active_loads()[0].active_decode_blocks == 0


async def test_prefix_in_flight_counts_as_cached_before_its_events_arrive() -> None:
    """A request whose prefix the router just sent to a worker (no KV event yet: its prefill
    is still running there) goes to that worker, not to a less loaded one that would compute
    the same prefix again; only its own tail is booked as prefill there."""
    router = KvRouter(block_size=BS, rng=random.Random(0))
    for w in (W1, W2):
        router.register_worker(w)
    prefix = [f"p{i}" for i in range(8)]
    router.best_worker(tokens(*prefix, "x"), request_id="a", hints=RoutingHints(backend_instance_id=W1))
    # W2 runs a foreign request whose prefill is done: less load than W1's pending prefill.
    router.best_worker(tokens(*[f"f{i}" for i in range(9)]), request_id="f", hints=RoutingHints(backend_instance_id=W2))
    router.mark_prefill_completed("f")
    assert router.find_matches(tokens(*prefix)).scores == {}  # nothing reported cached anywhere

    costs = {c.worker_id: c for c in router.potential_loads(tokens(*prefix, "y"))}
    assert costs[W1].overlap_blocks == 8
    assert costs[W1].prefill_tokens == 9 * BS + BS  # a's pending prefill + b's own tail block
    assert costs[W2].overlap_blocks == 0

    b = router.best_worker(tokens(*prefix, "y"), request_id="b")
    assert (b.worker_id, b.overlap_blocks, b.prefill_tokens) == (W1, 8, BS)
    loads = {x.worker_id: x for x in router.active_loads()}
    assert loads[W1].active_prefill_tokens == 9 * BS + BS
    assert loads[W1].active_decode_blocks == 10  # the shared prefix once, x and y


async def test_overlap_weight_override_trades_cache_for_load() -> None:
    router, _, _ = await seeded_router()
    # Load w1 heavily with decode blocks; cache says w1 for ACD*, load says w2.
    for i in range(4):
        router.best_worker(tokens(*f"{i}abcdefgh"), request_id=f"bg{i}", hints=RoutingHints(backend_instance_id=W1))
        router.mark_prefill_completed(f"bg{i}")
    req = tokens(*"ACDFGHIJKLMN")
    assert router.best_worker(req, hints=RoutingHints(overlap_score_weight=50.0)).worker_id == W1
    assert router.best_worker(req, hints=RoutingHints(overlap_score_weight=0.0)).worker_id == W2


async def test_pinning_and_dp_rank_hints() -> None:
    router, _, _ = await seeded_router()
    d = router.best_worker(tokens(*"ACE"), hints=RoutingHints(backend_instance_id=W1), request_id="p")
    assert (d.worker_id, d.pinned, d.overlap_blocks) == (W1, True, 2)
    with pytest.raises(UnknownWorkerError):
        router.best_worker(tokens(*"A"), hints=RoutingHints(backend_instance_id=0x999))
    with pytest.raises(ValueError):
        router.best_worker(tokens(*"A"), hints=RoutingHints(backend_instance_id=W1, dp_rank=3))
    router.register_worker(0x33, dp_size=2)
    assert router.best_worker(tokens(*"ACE"), hints=RoutingHints(dp_rank=1)).worker_id == 0x33
    with pytest.raises(NoWorkersError):
        router.best_worker(tokens(*"A"), hints=RoutingHints(dp_rank=7))


async def test_temperature_spreads_choices() -> None:
    router, _, _ = await seeded_router(KvRouterConfig(router_temperature=5.0))
    picks = {router.best_worker(tokens(*"ACDF")).worker_id for _ in range(200)}
    assert picks == {W1, W2}
    greedy = {router.best_worker(tokens(*"ACDF"), hints=RoutingHints(router_temperature=0.0)).worker_id
              for _ in range(50)}
    assert greedy == {W1}


async def test_no_workers_and_bad_input() -> None:
    router = KvRouter(block_size=BS)
    with pytest.raises(NoWorkersError):
        router.best_worker(tokens(*"AB"))
    router.register_worker(5)
    with pytest.raises(ValueError):
        router.best_worker(tokens(*"AB"), hints=RoutingHints(overlap_score_weight=-1.0))
    router.best_worker(tokens(*"AB"), request_id="dup")
    with pytest.raises(ValueError):
        router.best_worker(tokens(*"AB"), request_id="dup")
    with pytest.raises(ValueError):
        KvRouter()  # no block size anywhere


async def test_worker_removal_forgets_blocks_and_requests() -> None:
    router, _, _ = await seeded_router()
    router.best_worker(tokens(*"ACD"), request_id="r", hints=RoutingHints(backend_instance_id=W1))
    router.remove_worker(W1)
    assert (W1, 0) not in router.find_matches(tokens(*"ACD")).tree_sizes
    assert [x.worker_id for x in router.active_loads()] == [W2]
    assert router.best_worker(tokens(*"ACD")).worker_id == W2
    assert not router.free("r")


async def test_decision_is_logged_with_its_formula(caplog: pytest.LogCaptureFixture) -> None:
    router, _, _ = await seeded_router()
    with caplog.at_level(logging.DEBUG, logger="armature.router.kv.scheduler"):
        router.best_worker(tokens(*"ACDF"))
    lines = [r.getMessage() for r in caplog.records if "formula for worker_id" in r.getMessage()]
    assert len(lines) == 2
    chosen = [line for line in lines if "chosen" in line]
    assert chosen and f"worker_id={W1:x}" in chosen[0] and "with 4 cached blocks" in chosen[0]


async def test_precomputed_block_hashes_give_the_same_decision() -> None:
    router, _, _ = await seeded_router()
    req = tokens(*"ACDF", tail=5)
    hashes = router.block_hashes(req)
    assert router.best_worker(req, block_hashes=hashes) == router.best_worker(req)
    with pytest.raises(ValueError):
        router.best_worker(req, block_hashes=hashes[:-1])


async def test_decision_is_the_cheapest_candidate_under_churn() -> None:
    """Many workers (more than one 64-bit mask word), caches, bookings and releases: every
    decision's cost is the minimum of every candidate's cost as ``potential_loads`` reports it."""
    rng = random.Random(7)
    router = KvRouter(block_size=BS, rng=random.Random(1))
    workers = [SimWorker(0x100 + i) for i in range(70)]
    for w in workers:
        await router.add_worker(w.worker_id)
    prompts = [tokens(*[f"{g}{i}" for i in range(6)]) for g in "abcdefgh"]
    live: list[str] = []
    for step in range(300):
        toks = rng.choice(prompts)[: BS * rng.randrange(1, 7)] + tokens(f"x{step}", tail=rng.randrange(BS))
        if rng.random() < 0.4:
            for ev in rng.choice(workers).store(toks):
                await router.on_event(ev)
        costs = router.potential_loads(toks)
        cheapest = min(c.logit for c in costs)
        d = router.best_worker(toks, request_id=f"r{step}")
        chosen = next(c for c in costs if c.worker_id == d.worker_id)
        assert chosen.logit == pytest.approx(cheapest)
        assert d.overlap_blocks == chosen.overlap_blocks
        ties = [c for c in costs if c.logit == pytest.approx(cheapest)]
        assert chosen.tree_size - chosen.overlap_blocks == min(c.tree_size - c.overlap_blocks for c in ties)
        live.append(f"r{step}")
        if rng.random() < 0.3:
            router.mark_prefill_completed(rng.choice(live))
        if len(live) > 20:
            router.free(live.pop(rng.randrange(len(live))))
