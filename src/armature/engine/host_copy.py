"""Small host lists to the device without stalling the host.

``torch.tensor(values, device="cuda")`` copies synchronously: the host waits until the GPU has
finished everything queued before it, which serialises the overlap schedule. Building the tensor
on the host and copying it with ``non_blocking=True`` returns as soon as the values are staged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
