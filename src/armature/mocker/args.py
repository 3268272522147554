"""The mocker's settings: Dynamo's mocker flags and defaults (``MockEngineArgs``)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass


@dataclass
class MockerArgs:
    block_size: int = 64
    num_gpu_blocks_override: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    speedup_ratio: float = 1.0  # divides every simulated delay; 0 = no delay at all
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    watermark: float = 0.01  # fraction of blocks admission keeps free
    # Token ids are drawn from [0, vocab_size); the model folder's config wins when there is one.
    vocab_size: int = 32000
    context_length: int = 32768
    # Older spelling of num_gpu_blocks_override (kept so either name configures the pool).
    num_gpu_blocks: InitVar[int | None] = None

    def __post_init__(self, num_gpu_blocks: int | None) -> None:
        if num_gpu_blocks is not None:
            self.num_gpu_blocks_override = num_gpu_blocks
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_gpu_blocks_override <= 0:
            raise ValueError(f"num_gpu_blocks_override must be positive, got {self.num_gpu_blocks_override}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.speedup_ratio < 0:
            raise ValueError(f"speedup_ratio must be >= 0 (0 disables delays), got {self.speedup_ratio}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.vocab_size <= 0 or self.context_length <= 1:
            raise ValueError("vocab_size must be positive and context_length > 1")
