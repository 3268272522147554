"""Dynamo's polynomial timing model for the simulated engine (milliseconds).

The coefficients are Dynamo's; how they are applied per step is what Dynamo 1.6.1's mocker was
measured to do (``benchmarks/mocker_probe.py``, docs/mocker.md "Evidence"):

- prefill: ONE polynomial over all new prefill tokens of the step, not one per request (eight
  55-token prompts that arrive together cost ``prefill_ms(440)``, not ``8 * prefill_ms(55)``);
- decode: ``p`` is the KV-cache load, active blocks / total blocks (the ITL of one stream with
  32 active blocks is 5.85 ms with 16384 blocks and 12.1 ms with 256);
- a step that both prefills and decodes costs the sum (a running stream's ITL jumps by the
  prefill time of a prompt scheduled beside it).
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def decode_ms(self, kv_load: float) -> float:
        """One decode step for the whole batch; ``kv_load`` = active KV blocks / total KV blocks."""
        p = kv_load
        return max(0.0, self.decode_a * p * p + self.decode_b * p + self.decode_c)

    def step_ms(self, prefill_tokens: int, decoding: bool, kv_load: float) -> float:
        """A step's time: the prefill polynomial over its new prompt tokens (if any) plus one decode."""
        total = self.prefill_ms(prefill_tokens) if prefill_tokens > 0 else 0.0
        if decoding:
            total += self.decode_ms(kv_load)
        return total
