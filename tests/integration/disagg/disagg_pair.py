"""Helpers for disaggregation tests: a prefill + decode pair of native engines in one process.

The pair is driven the way the frontend's prefill router drives two workers: one room per
request, the prefill request (one token) and the decode request sent at once.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

from armature.engine.api import GenerateOutput, GenerateRequest, SamplingParams
from armature.engine.disagg import DisaggConfig, DisaggMode, TransferBackend
from armature.engine.engine import NativeEngine
from armature.protocols.llm import BootstrapInfo

ENGINE_KW = dict(max_total_tokens=1 << 16, context_length=4096, chunked_prefill_size=1024)


def prompts(n: int, seed: int = 7, lo: int = 16, hi: int = 2000, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    # Shared leading pages on some prompts, so the caches on both sides see repeated prefixes.
    shared = [rng.randrange(3, vocab) for _ in range(64)]
    out = []
    for i, n_tok in enumerate(lengths):
        body = [rng.randrange(3, vocab) for _ in range(n_tok)]
        out.append((shared + body)[:n_tok] if i % 3 == 0 and n_tok > 64 else body)
    return out


def prefill_engine(model: Path, timeout_s: float = 30.0) -> NativeEngine:
    cfg = DisaggConfig(mode=DisaggMode.PREFILL, bootstrap_timeout_s=timeout_s)
    return NativeEngine(model_path=str(model), disaggregation=cfg, **ENGINE_KW)  # type: ignore[arg-type]


def decode_engine(
    model: Path, backend: TransferBackend, timeout_s: float = 30.0, waiting_s: float = 30.0
) -> NativeEngine:
    cfg = DisaggConfig(mode=DisaggMode.DECODE, transfer_backend=backend, bootstrap_timeout_s=timeout_s,
                       waiting_timeout_s=waiting_s)
    return NativeEngine(model_path=str(model), disaggregation=cfg, **ENGINE_KW)  # type: ignore[arg-type]


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0)


@dataclass
class DisaggResult:
    tokens: list[int]
    last: GenerateOutput
    prefill_last: GenerateOutput | None


def bootstrap_of(prefill: NativeEngine, room: int | None = None) -> BootstrapInfo:
    assert prefill.info.bootstrap_host is not None and prefill.info.bootstrap_port is not None
    return BootstrapInfo(
        bootstrap_host=prefill.info.bootstrap_host,
        bootstrap_port=prefill.info.bootstrap_port,
        bootstrap_room=secrets.randbits(63) if room is None else room,
    )


async def run_disagg(
    prefill: NativeEngine, decode: NativeEngine, ids: list[int], max_new: int
) -> DisaggResult:
    boot = bootstrap_of(prefill)
    tag = f"{boot.bootstrap_room:x}"
    preq = GenerateRequest(rid=f"p-{tag}", input_ids=ids, sampling=greedy(1), bootstrap=boot)
    dreq = GenerateRequest(rid=f"d-{tag}", input_ids=ids, sampling=greedy(max_new), bootstrap=boot)

    async def drain_prefill() -> GenerateOutput | None:
        last = None
        async for o in prefill.generate_stream(preq):
            last = o
        return last

    ptask = asyncio.create_task(drain_prefill())
    tokens: list[int] = []
    last: GenerateOutput | None = None
    async for o in decode.generate_stream(dreq):
        tokens.extend(o.token_ids)
        last = o
    assert last is not None
    return DisaggResult(tokens, last, await ptask)


async def run_aggregated(engine: NativeEngine, ids: list[int], max_new: int) -> list[int]:
    req = GenerateRequest(rid=f"a-{secrets.token_hex(4)}", input_ids=ids, sampling=greedy(max_new))
    return [t async for o in engine.generate_stream(req) for t in o.token_ids]


async def settled(engine: NativeEngine) -> None:
    """Wait until the engine has nothing running or waiting (results reach callers first)."""
    for _ in range(200):
        m = engine.load_metrics()
        if m.num_running_reqs == 0 and m.num_waiting_reqs == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.wrap_future(engine.run_in_loop(engine.scheduler.check_accounting))
