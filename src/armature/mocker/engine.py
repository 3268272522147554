"""``MockerEngine``: the native engine's scheduler and radix cache over a simulated runner."""

from __future__ import annotations

import json
from pathlib import Path

from armature.engine.api import EngineInfo
from armature.engine.engine import ThreadedEngine
from armature.engine.scheduler import Scheduler, SchedulerConfig
from armature.engine.server_args import ServerArgs
from armature.mocker.args import MockerArgs
from armature.mocker.runner import SimulatedExecutor


def _model_facts(model_path: str | None, args: MockerArgs) -> tuple[int, list[int], int | None, int]:
    """vocab size, EOS ids, BOS id and context length from a model folder's config.json if any."""
    if model_path:
        folder = Path(model_path)
        if folder.is_file() and folder.suffix.lower() == ".gguf":
            # The tokenizer and vocabulary of a GGUF come from its converted folder (made once).
            from armature.engine.loader import resolve_model_path

            folder = resolve_model_path(folder)
        cfg_path = folder / "config.json"
        if cfg_path.is_file():
            raw = json.loads(cfg_path.read_text())
            eos = raw.get("eos_token_id")
            eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([] if eos is None else [int(eos)])
            ctx = int(raw.get("max_position_embeddings") or args.context_length)
            return int(raw.get("vocab_size") or args.vocab_size), eos_ids, raw.get("bos_token_id"), ctx
    return args.vocab_size, [], None, args.context_length


class MockerEngine(ThreadedEngine):
    """Implements the ``Engine`` protocol with simulated forwards.

    Scheduling comes from ``MockerArgs`` (Dynamo's mocker flags); the model identity, the context
    length cap, KV events, stream interval and seed come from ``ServerArgs``.
    """

    def __init__(self, server_args: ServerArgs | None = None, mocker_args: MockerArgs | None = None) -> None:
        sargs = server_args or ServerArgs(skip_tokenizer_init=True)
        margs = mocker_args or MockerArgs()
        self.server_args = sargs
        self.mocker_args = margs
        vocab, eos, bos, ctx = _model_facts(sargs.model_path, margs)
        if sargs.context_length is not None:
            ctx = sargs.context_length
        self.executor = SimulatedExecutor(
            num_pages=margs.num_gpu_blocks_override,
            page_size=margs.block_size,
            vocab_size=vocab,
            speedup_ratio=margs.speedup_ratio,
            seed=sargs.random_seed,
        )
        config = SchedulerConfig(
            page_size=margs.block_size,
            context_length=ctx,
            vocab_size=vocab,
            eos_token_ids=eos,
            max_running_requests=margs.max_num_seqs,
            max_prefill_tokens=margs.max_num_batched_tokens,
            chunked_prefill_size=margs.max_num_batched_tokens if margs.enable_chunked_prefill else None,
            # vLLM-style steps: new prefill chunks ride along with the running decodes.
            enable_mixed_chunk=True,
            disable_radix_cache=not margs.enable_prefix_caching,
            stream_interval=sargs.stream_interval,
            watermark_pages=int(margs.watermark * margs.num_gpu_blocks_override),
            random_seed=sargs.random_seed,
        )
        super().__init__(Scheduler(config, self.executor), sargs.kv_events(), "mocker")
        self.info = EngineInfo(
            model_path=sargs.model_path or "mocker",
            served_model_name=sargs.served_model_name or Path(sargs.model_path or "mocker").name,
            page_size=margs.block_size,
            total_kv_blocks=margs.num_gpu_blocks_override,
            max_running_requests=margs.max_num_seqs,
            max_prefill_tokens=margs.max_num_batched_tokens,
            context_length=ctx,
            vocab_size=vocab,
            bos_token_id=bos,
            eos_token_ids=eos,
            dp_size=1,
            kv_events_endpoint=self.publisher.endpoint if self.publisher else None,
            engine_kind="mocker",
        )
