"""Bar 6: KV events arrive over a real ZMQ SUB socket in SGLang's schema, with the shared hashes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq

from armature.engine import Engine
from armature.engine.server_args import ServerArgs
from armature.mocker import MockerArgs, MockerEngine
from armature.protocols.hashing import compute_sequence_block_hashes
from armature.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_event_batch

pytestmark = pytest.mark.integration
TOPIC = "kv-events"


def receive(sub: zmq.Socket, timeout_s: float) -> list[tuple[int, object]]:
    """(seq, EventBatch) pairs until nothing arrives for ``timeout_s``."""
    got = []
    while sub.poll(int(timeout_s * 1000)):
        topic, seq, payload = sub.recv_multipart()
        assert topic == TOPIC.encode() and len(seq) == 8
        got.append((int.from_bytes(seq, "big"), decode_event_batch(payload)))
    return got


def stored_hashes(batches: list[tuple[int, object]]) -> list[int]:
    return [h for _, b in batches for e in b.events if isinstance(e, BlockStored) for h in e.block_hashes]


def wait_connected(eng, sub: zmq.Socket, prompt_base: int) -> None:  # type: ignore[no-untyped-def]
    """PUB/SUB drops what is sent before the link is up: send throwaway blocks until one lands."""
    for i in range(50):
        eng.run_in_loop(lambda: None).result()
        toks = [prompt_base + i] * 17
        _generate(eng, toks)
        if receive(sub, 0.2):
            return
    raise AssertionError("no KV event reached the subscriber")


def _generate(eng, toks: list[int]) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from armature.engine.api import GenerateRequest, SamplingParams

    async def run() -> None:
        async for _ in eng.generate_stream(GenerateRequest(f"r{time.monotonic_ns()}", toks, SamplingParams(max_new_tokens=2))):
            pass

    asyncio.run(run())


def check_stream(eng, sub: zmq.Socket) -> None:  # type: ignore[no-untyped-def]
    wait_connected(eng, sub, 1000)
    prompt = list(range(200, 200 + 50))  # 3 full pages of 16 (the 4th page is partial)
    _generate(eng, prompt)
    batches = receive(sub, 0.5)
    seqs = [s for s, _ in batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    full = prompt + []  # generated tokens extend the last page but do not complete a 4th
    assert stored_hashes(batches) == compute_sequence_block_hashes(full, 16)[: len(stored_hashes(batches))]
    assert stored_hashes(batches)[:3] == compute_sequence_block_hashes(prompt, 16)
    stored = [e for _, b in batches for e in b.events if isinstance(e, BlockStored)]
    assert stored[0].parent_block_hash is None and stored[0].block_size == 16
    assert stored[0].token_ids == prompt[: 16 * len(stored[0].block_hashes)]
    assert all(b.attn_dp_rank == 0 and b.ts > 0 for _, b in batches)
    # Flushing the cache is announced as AllBlocksCleared.
    assert eng.run_in_loop(eng.scheduler.flush_cache).result()
    eng.run_in_loop(lambda: None).result()
    cleared = receive(sub, 0.5)
    assert any(isinstance(e, AllBlocksCleared) for _, b in cleared for e in b.events)


def test_mocker_publishes_to_a_bound_subscriber() -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind("tcp://127.0.0.1:*")
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    endpoint = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    cfg = json.dumps({"publisher": "zmq", "endpoint": endpoint, "topic": TOPIC})
    eng = MockerEngine(ServerArgs(skip_tokenizer_init=True, kv_events_config=cfg),
                       MockerArgs(speedup_ratio=0.0, block_size=16, num_gpu_blocks_override=64))
    try:
        assert eng.info.kv_events_endpoint == endpoint
        check_stream(eng, sub)
    finally:
        eng.shutdown()
        sub.close()


def test_native_engine_binds_and_reports_eviction(tiny_llama_path: Path) -> None:
    cfg = json.dumps({"publisher": "zmq", "endpoint": "tcp://127.0.0.1:*", "topic": TOPIC})
    eng = Engine(model_path=str(tiny_llama_path), max_total_tokens=16 * 12, kv_events_config=cfg)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        endpoint = eng.info.kv_events_endpoint
        assert endpoint and endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
        sub.connect(endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        check_stream(eng, sub)
        # Fill the 12-page pool with distinct prompts: old blocks are evicted and announced.
        for i in range(6):
            _generate(eng, [3000 + i] * 40)
        batches = receive(sub, 0.5)
        removed = [h for _, b in batches for e in b.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
        # Every removed block is a page of a prompt this test sent (and none is removed twice).
        sent = [list(range(200, 250))] + [[1000 + i] * 17 for i in range(50)] + [[3000 + i] * 40 for i in range(6)]
        known = {h for p in sent for h in compute_sequence_block_hashes(p, 16)}
        assert removed and set(removed) <= known and len(set(removed)) == len(removed)
        assert set(stored_hashes(batches)) <= {h for p in sent[-6:] for h in compute_sequence_block_hashes(p, 16)}
        m = eng.load_metrics()
        assert m.kv_cached_blocks + eng.runner.kv_pool.free_pages == m.kv_total_blocks
    finally:
        eng.shutdown()
        sub.close()
