"""Disaggregated prefill/decode for the native engine: bootstrap server, KV transfer, scheduler glue.

A prefill engine computes a prompt's KV (and its first token) and serves it from its bootstrap
server, keyed by a 63-bit room the caller chose. A decode engine given the same room reserves
pages for the prompt, connects, receives the pages (every layer, K and V, page-aligned) over
the chosen transfer backend (``tcp`` across hosts, ``shm`` between processes of one host), and
decodes from there. See docs/disaggregation.md.
"""

from armature.engine.disagg.config import DisaggConfig, DisaggMode, TransferBackend

__all__ = ["DisaggConfig", "DisaggMode", "TransferBackend"]
