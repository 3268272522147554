"""Request handlers of the worker: decode/aggregated (and later prefill)."""
