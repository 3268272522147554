"""What the scheduler hands the model runner for one forward step.

Sequences are packed (no padding): ``input_ids``/``positions``/``out_cache_loc`` hold the new
tokens of every sequence back to back, in batch order. Each sequence attends over
``kv_indices[i]`` — the KV-pool slots of its whole context (cached prefix + new tokens), in
order — or, for page-table backends, ``page_table[i]`` (its pages; slot = page * page_size +
offset) after the model has written the new tokens' K/V into ``out_cache_loc``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class ForwardMode(Enum):
    EXTEND = "extend"  # prefill (possibly a chunk, possibly over a cached prefix); may mix decodes
    DECODE = "decode"  # every sequence has exactly one new token


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, on the model's device
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64 slots where the new tokens' K/V go
    extend_lens: list[int]  # new tokens per sequence (1 for decode)
    prefix_lens: list[int]  # tokens already in the KV pool per sequence
    kv_indices: list[torch.Tensor]  # per sequence: [prefix_len + extend_len] int64 slots
    # Per sequence: return logits for all its new tokens (prompt logprobs), else only the last.
    return_all_logits: list[bool] = field(default_factory=list)
    # Per sequence: its KV pages in order (backends that address the pool by page table, like
    # the Triton one, read this; kv_indices may then be left empty).
    page_table: list[list[int]] | None = None
    # Overlap schedule: input rows whose token is still on the device (sampled by the previous
    # launch, not yet read by the host), and those tokens, on the model's device.
    future_rows: torch.Tensor | None = None
    future_ids: torch.Tensor | None = None

    def device_input_ids(self, device: torch.device) -> torch.Tensor:
        ids = self.input_ids.to(device, non_blocking=True)
        if self.future_rows is not None:
            assert self.future_ids is not None
            ids = ids.index_copy(0, self.future_rows, self.future_ids)
        return ids

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    def logit_rows(self) -> list[int]:
        """Rows of the packed token dimension whose logits the model must return, in order."""
        rows: list[int] = []
        start = 0
        for n, want_all in zip(self.extend_lens, self.return_all_logits or [False] * self.batch_size):
            rows.extend(range(start, start + n) if want_all else [start + n - 1])
            start += n
        return rows
