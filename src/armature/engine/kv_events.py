"""Publishes KV cache events in SGLang's ZMQ wire format from a dedicated thread.

Multipart ``(topic, seq as 8-byte big-endian, msgpack EventBatch)`` on a PUB socket. As SGLang
does, the socket binds when the endpoint is a wildcard (``*``, ``::``, ``0.0.0.0``) or ipc/inproc,
and connects otherwise (a relay's SUB socket bound elsewhere). The step loop only enqueues, so a
slow subscriber never stalls generation; past ``max_queue_size`` batches the oldest are dropped
and counted (the router's gap detection sees the missing sequence numbers).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import zmq

from armature.engine.server_args import KvEventsConfig
from armature.protocols.kv_events import EngineKvEvent, EventBatch, encode_event_batch

log = logging.getLogger(__name__)


def endpoint_binds(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    return any(w in endpoint for w in ("*", "::", "0.0.0.0"))


class KvEventPublisher:
    def __init__(self, config: KvEventsConfig, dp_rank: int = 0) -> None:
        self.config = config
        self.endpoint = config.endpoint
        self.dp_rank = dp_rank
        self.dropped = 0
        self._seq = 0
        self._queue: queue.Queue[EventBatch | None] = queue.Queue(maxsize=config.max_queue_size)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, config.hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if endpoint_binds(config.endpoint):
            self._sock.bind(config.endpoint)
            # A wildcard port (tcp://127.0.0.1:*) resolves at bind: report the real one.
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._sock.connect(config.endpoint)
        self._topic = config.topic.encode()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def publish(self, events: Sequence[EngineKvEvent]) -> None:
        if not events:
            return
        batch = EventBatch(ts=time.time(), events=list(events), attn_dp_rank=self.dp_rank)
        while True:
            try:
                self._queue.put_nowait(batch)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        # The socket is used only by this thread after construction (ZMQ sockets are not
        # thread-safe).
        while True:
            batch = self._queue.get()
            if batch is None:
                break
            payload = encode_event_batch(batch)
            try:
                self._sock.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload])
            except zmq.ZMQError as exc:
                log.warning("KV event publish failed: %s", exc)
            self._seq += 1
        self._sock.close(linger=0)

    def close(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout)
