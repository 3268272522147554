"""Wire structs of the KV router: worker local-indexer queries and replica sync.

They cross process boundaries (request plane to a worker's local indexer; event plane between
router replicas), so they are msgspec Structs with explicit tags, never dicts.
"""

from __future__ import annotations

import msgspec

from armature.protocols.kv_events import RouterEvent
from armature.protocols.version import PROTOCOL_VERSION

# --- a worker's local indexer ---------------------------------------------------------------


class EventRangeQuery(msgspec.Struct, kw_only=True):
    """Ask a worker for its events ``first..last`` (inclusive)."""

    worker_id: int
    first: int
    last: int


class EventRangeReply(msgspec.Struct, kw_only=True):
    worker_id: int
    events: list[RouterEvent]
    # False when the worker's log no longer holds the whole range: fetch a snapshot instead.
    complete: bool


class WorkerSnapshot(msgspec.Struct, kw_only=True):
    """A worker's whole KV state as stored events, consistent as of ``last_event_id``."""

    worker_id: int
    last_event_id: int | None  # None: the worker has not published any event yet
    events: list[RouterEvent]


# --- router replica sync --------------------------------------------------------------------


class SeqAdded(msgspec.Struct, tag="add", kw_only=True):
    router_id: int
    request_id: str
    worker_id: int
    dp_rank: int
    local_hashes: list[int]  # canonical local block hashes of the request's full blocks
    isl: int
    overlap_blocks: int


class SeqPrefillDone(msgspec.Struct, tag="prefill_done", kw_only=True):
    router_id: int
    request_id: str


class SeqFreed(msgspec.Struct, tag="free", kw_only=True):
    router_id: int
    request_id: str


ReplicaSyncMessage = SeqAdded | SeqPrefillDone | SeqFreed


class ReplicaSyncEnvelope(msgspec.Struct, kw_only=True):
    version: int
    message: ReplicaSyncMessage


class ProtocolMismatch(ValueError):
    pass


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ReplicaSyncEnvelope)


def encode_sync(message: ReplicaSyncMessage) -> bytes:
    return _encoder.encode(ReplicaSyncEnvelope(version=PROTOCOL_VERSION, message=message))


def decode_sync(payload: bytes) -> ReplicaSyncMessage:
    env = _decoder.decode(payload)
    if env.version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"router replica sync protocol {env.version} received, this router speaks {PROTOCOL_VERSION}"
        )
    return env.message
