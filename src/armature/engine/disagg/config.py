"""How an engine takes part in disaggregated serving (SGLang's ``--disaggregation-*`` flags)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class DisaggMode(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class TransferBackend(str, Enum):
    TCP = "tcp"  # KV bytes over the bootstrap connection: works across hosts
    SHM = "shm"  # the decode side's shared-memory segment, written by the prefill side: one host


@dataclass
class DisaggConfig:
    mode: DisaggMode
    # Prefill: where the bootstrap server listens (loopback unless asked); port 0 picks a free one.
    bootstrap_host: str = "127.0.0.1"
    bootstrap_port: int = 0
    # Decode: how it asks for the KV (the prefill side serves every backend it is asked for).
    transfer_backend: TransferBackend = TransferBackend.TCP
    # Prefill: a room whose decode side has not connected this long after the prefill request
    # arrived is dropped (its request aborted, its staged KV freed). Decode: the longest wait
    # for the bootstrap server to accept the connection.
    bootstrap_timeout_s: float = 300.0
    # Decode: the longest wait for the KV once connected (the prefill queue may be long).
    waiting_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        self.mode = DisaggMode(self.mode)
        self.transfer_backend = TransferBackend(self.transfer_backend)
        if not 0 <= self.bootstrap_port <= 65535:
            raise ValueError(f"bootstrap port must be in [0, 65535], got {self.bootstrap_port}")
        if self.bootstrap_timeout_s <= 0 or self.waiting_timeout_s <= 0:
            raise ValueError("bootstrap and waiting timeouts must be positive")
