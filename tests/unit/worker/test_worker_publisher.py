"""KV-event relay (SGLang ZMQ format → RouterEvent with canonical hashes) and load publishing."""

from __future__ import annotations

import asyncio
import json
import struct
import time

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, generate_latest
from sglang_standin import StandInSglEngine

from armature.protocols.hashing import compute_local_block_hashes
from armature.protocols.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KvCleared,
    KvRemoved,
    KvStored,
    RouterEvent,
    encode_event_batch,
)
from armature.protocols.load import ActiveLoad
from armature.sglang.args import SglangServerConfig
from armature.sglang.publisher import KV_EVENTS_TOPIC, LOAD_TOPIC, KvEventConverter, WorkerPublisher
from armature.sglang.sgl_compat import SglangEngine


def _stored(tokens: list[int], hashes: list[int], parent: int | None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=4)


def test_converter_recomputes_hashes_and_numbers_events() -> None:
    conv = KvEventConverter(worker_id=0xABC, block_size=4)
    tokens = list(range(10, 18))
    batch = EventBatch(ts=1.0, events=[_stored(tokens, [111, 222], None), BlockRemoved(block_hashes=[222]),
                                       AllBlocksCleared()])
    events = conv.convert(batch)
    assert [e.event.event_id for e in events] == [0, 1, 2]
    assert all(e.worker_id == 0xABC for e in events)
    stored = events[0].event.data
    assert isinstance(stored, KvStored) and stored.parent_hash is None
    assert [b.block_hash for b in stored.blocks] == [111, 222]
    assert [b.tokens_hash for b in stored.blocks] == compute_local_block_hashes(tokens, 4)
    assert isinstance(events[1].event.data, KvRemoved) and events[1].event.data.block_hashes == [222]
    assert isinstance(events[2].event.data, KvCleared)
    more = conv.convert(EventBatch(ts=2.0, events=[_stored([1, 2, 3, 4], [333], 222)], attn_dp_rank=None))
    assert more[0].event.event_id == 3 and more[0].event.data.parent_hash == 222


def test_inconsistent_stored_event_is_dropped_not_guessed() -> None:
    conv = KvEventConverter(worker_id=1, block_size=4)
    assert conv.convert(EventBatch(ts=0.0, events=[_stored([1, 2, 3], [5], None)])) == []
    assert conv.dropped == 1 and conv.next_event_id == 0


async def test_relay_from_zmq_and_load_into_metrics() -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sgl = StandInSglEngine(page_size=4)
    sgl.server_args.kv_events_config = json.dumps({"publisher": "zmq", "endpoint": f"tcp://*:{port}"})
    engine = SglangEngine(sgl, SglangServerConfig(model_path="/m", served_model_name="m", page_size=4))
    assert engine.info.kv_events_endpoint == f"tcp://*:{port}"
    received: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        received.append((topic, payload))

    registry = CollectorRegistry()
    publisher = WorkerPublisher(engine, 7, publish, registry, model="m", component="backend", interval_s=0.01)
    publisher.start()
    try:
        tokens = [5, 6, 7, 8]
        batch = encode_event_batch(EventBatch(ts=1.0, events=[_stored(tokens, [42], None)]))
        deadline = time.monotonic() + 10
        # PUB/SUB drops messages sent before the subscription propagates: resend until seen.
        seq = 0
        while not any(t == KV_EVENTS_TOPIC for t, _ in received):
            assert time.monotonic() < deadline, "no KV event relayed"
            await pub.send_multipart([b"", struct.pack(">Q", seq), batch])
            seq += 1
            await asyncio.sleep(0.02)
        kv = [msgspec.msgpack.decode(p, type=RouterEvent) for t, p in received if t == KV_EVENTS_TOPIC]
        assert kv[0].worker_id == 7 and kv[0].event.event_id == 0
        assert kv[0].event.data.blocks[0].tokens_hash == compute_local_block_hashes(tokens, 4)[0]
        loads = [msgspec.msgpack.decode(p, type=ActiveLoad) for t, p in received if t == LOAD_TOPIC]
        assert loads and loads[-1].worker_id == 7 and loads[-1].kv_total_blocks == 250
        text = generate_latest(registry).decode()
        assert 'armature_worker_kv_total_blocks{component="backend",dp_rank="0",model="m"} 250.0' in text
    finally:
        await publisher.close()
        pub.close(0)
        ctx.term()


async def test_relay_binds_when_the_engine_connects() -> None:
    from armature.sglang.sgl_compat import reserve_free_port

    port = reserve_free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    sgl = StandInSglEngine(page_size=4)
    sgl.server_args.kv_events_config = json.dumps({"publisher": "zmq", "endpoint": endpoint})
    engine = SglangEngine(sgl, SglangServerConfig(model_path="/m", served_model_name="m", page_size=4))
    received: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        received.append((topic, payload))

    publisher = WorkerPublisher(engine, 9, publish, CollectorRegistry(), model="m", component="backend")
    publisher.start()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(endpoint)  # SGLang connects a non-wildcard endpoint; the worker must bind it
    try:
        batch = encode_event_batch(EventBatch(ts=1.0, events=[AllBlocksCleared()]))
        deadline = time.monotonic() + 10
        while not any(t == KV_EVENTS_TOPIC for t, _ in received):
            assert time.monotonic() < deadline, "no KV event relayed"
            await pub.send_multipart([b"", struct.pack(">Q", 0), batch])
            await asyncio.sleep(0.02)
    finally:
        await publisher.close()
        pub.close(0)
        ctx.term()


async def test_an_engine_in_this_process_hands_its_events_over_without_a_socket() -> None:
    from armature.engine.server_args import ServerArgs
    from armature.mocker import MockerArgs, MockerEngine

    engine = MockerEngine(ServerArgs(skip_tokenizer_init=True), MockerArgs(speedup_ratio=0.0, block_size=4))
    assert engine.info.kv_events_endpoint is None  # no --kv-events-config: no ZMQ socket at all
    received: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        received.append((topic, payload))

    publisher = WorkerPublisher(engine, 5, publish, CollectorRegistry(), model="m", component="backend")
    publisher.start()
    try:
        from armature.engine.api import GenerateRequest, SamplingParams

        prompt = list(range(100, 110))  # two full blocks of 4, then two tokens
        async for _ in engine.generate_stream(GenerateRequest("r", prompt, SamplingParams(max_new_tokens=3))):
            pass
        deadline = time.monotonic() + 10
        while not any(t == KV_EVENTS_TOPIC for t, _ in received):
            assert time.monotonic() < deadline, "no KV event relayed"
            await asyncio.sleep(0.01)
        kv = [msgspec.msgpack.decode(p, type=RouterEvent) for t, p in received if t == KV_EVENTS_TOPIC]
        assert [e.event.event_id for e in kv] == list(range(len(kv)))
        stored = [b for e in kv if isinstance(e.event.data, KvStored) for b in e.event.data.blocks]
        assert [b.tokens_hash for b in stored[:2]] == compute_local_block_hashes(prompt[:8], 4)
        assert all(e.worker_id == 5 for e in kv)
        assert publisher.local_indexer is not None and publisher.kv_events_relayed == len(kv)
    finally:
        await publisher.close()
        await engine.shutdown()
