"""KV cache events.

Two layers:
* SGLang's ZMQ wire format (what an engine publishes): ``EventBatch`` of array-like tagged
  ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``. Our native engine and the mocker emit
  exactly this so the worker's publisher treats them like real SGLang.
* Armature's router events (what the worker relays on the event plane): canonical hashes from
  ``protocols.hashing``, a per-worker monotonically increasing ``event_id`` for gap detection.
"""

from __future__ import annotations

import msgspec

# --- SGLang wire format -------------------------------------------------------------------


class BlockStored(msgspec.Struct, array_like=True, tag=True, omit_defaults=False):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(msgspec.Struct, array_like=True, tag=True, omit_defaults=False):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, array_like=True, tag=True, omit_defaults=False):
    pass


EngineKvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=False):
    ts: float
    events: list[EngineKvEvent]
    attn_dp_rank: int | None = None


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(EventBatch)


def encode_event_batch(batch: EventBatch) -> bytes:
    return _batch_encoder.encode(batch)


def decode_event_batch(payload: bytes) -> EventBatch:
    return _batch_decoder.decode(payload)


# --- Armature router events ---------------------------------------------------------------


class StoredBlock(msgspec.Struct, array_like=True):
    block_hash: int  # the engine's own (opaque) hash; used to address later removals
    tokens_hash: int  # canonical local hash of the block's tokens (protocols.hashing)


class KvStored(msgspec.Struct, tag="stored", kw_only=True):
    parent_hash: int | None  # engine hash of the parent block, None at the root
    blocks: list[StoredBlock]


class KvRemoved(msgspec.Struct, tag="removed", kw_only=True):
    block_hashes: list[int]  # engine hashes


class KvCleared(msgspec.Struct, tag="cleared", kw_only=True):
    pass


class KvCacheEvent(msgspec.Struct, kw_only=True):
    event_id: int
    data: KvStored | KvRemoved | KvCleared
    dp_rank: int = 0


class RouterEvent(msgspec.Struct, kw_only=True):
    worker_id: int
    event: KvCacheEvent
