"""Dynamo's polynomial timing model for the simulated engine (milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass

# Per-step decode time is a function of how full the KV cache is, normalised to this many tokens.
DECODE_NORM_TOKENS = 16384


@dataclass(frozen=True)
class PolynomialTiming:
    prefill_a: float = 4.209989e-07
    prefill_b: float = 1.518344e-02
    prefill_c: float = 16.50142
    decode_a: float = -25.74
    decode_b: float = 54.01
    decode_c: float = 5.74

    def prefill_ms(self, new_tokens: int) -> float:
        n = float(new_tokens)
        return max(0.0, self.prefill_a * n * n + self.prefill_b * n + self.prefill_c)

    def decode_ms(self, active_kv_tokens: int) -> float:
        p = active_kv_tokens / DECODE_NORM_TOKENS
        return max(0.0, self.decode_a * p * p + self.decode_b * p + self.decode_c)

    def step_ms(self, prefill_chunks: list[int], decoding: bool, active_kv_tokens: int) -> float:
        """Every prefill scheduled in the step costs its own time; one decode step covers all."""
        total = sum(self.prefill_ms(n) for n in prefill_chunks)
        if decoding:
            total += self.decode_ms(active_kv_tokens)
        return total
