"""Stand-in for SGLang's ``sgl.Engine``: the real package cannot be installed here (no CUDA).

It mimics only the contract Armature's adapter relies on (reference/sglang.md §1.2–1.3):
``await async_generate(input_ids=…, sampling_params={…}, stream=True, rid=…, …)`` returns an
async iterator of ``{"output_ids": [disjoint delta], "meta_info": {...}}`` chunks whose last
``meta_info["finish_reason"]`` is a dict (``stop`` with ``matched``, ``length``, ``abort``);
logprob lists are cumulative ``(logprob, token_id, None)`` tuples; an input longer than the
context raises ``ValueError``; ``tokenizer_manager.abort_request(rid=…, abort_all=False)``.
Generation is deterministic: next token = (previous * 7 + 3) % vocab.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

SAMPLING_KEYS = {
    "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p",
    "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "ignore_eos",
    "skip_special_tokens", "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
    "json_schema", "regex", "ebnf", "structural_tag", "spaces_between_special_tokens",
}


class StandInTokenizerManager:
    def __init__(self, engine: StandInSglEngine, context_len: int, vocab_size: int, bos: int, eos: int) -> None:
        self._engine = engine
        self.model_config = SimpleNamespace(
            context_len=context_len,
            vocab_size=vocab_size,
            hf_config=SimpleNamespace(bos_token_id=bos, eos_token_id=eos),
        )
        self.abort_calls: list[str] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.abort_calls.append(rid)
        self._engine.aborted.add(rid)


class StandInSglEngine:
    def __init__(
        self,
        *,
        context_len: int = 64,
        vocab_size: int = 97,
        page_size: int = 4,
        max_total_num_tokens: int = 1000,
        bos: int = 1,
        eos: int = 2,
        hold_first_token: asyncio.Event | None = None,
        vanish_after: int | None = None,
    ) -> None:
        self.server_args = SimpleNamespace(
            model_path="/models/standin",
            served_model_name="standin",
            page_size=page_size,
            max_prefill_tokens=16384,
            max_running_requests=None,
            dp_size=1,
            disaggregation_mode="null",
            disaggregation_bootstrap_port=8998,
            kv_events_config=None,
        )
        self.scheduler_info = {"max_total_num_tokens": max_total_num_tokens, "max_running_requests": 48}
        self.tokenizer_manager = StandInTokenizerManager(self, context_len, vocab_size, bos, eos)
        self.calls: list[dict[str, Any]] = []
        self.aborted: set[str] = set()
        self.hold_first_token = hold_first_token
        # Simulates the engine process dying: the stream just ends after this many tokens.
        self.vanish_after = vanish_after
        self.running: set[str] = set()
        self._seen_prompts: list[list[int]] = []
        self.shut_down = False

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        lora_path: str | None = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        routed_dp_rank: int | None = None,
        rid: str | None = None,
        priority: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        call = {k: v for k, v in locals().items() if k != "self" and v is not None}
        self.calls.append(call)
        params = dict(sampling_params or {})
        unknown = set(params) - SAMPLING_KEYS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keys {sorted(unknown)}")
        if input_ids is None or not stream:
            raise NotImplementedError("the stand-in only streams token ids")
        return self._stream(list(input_ids), params, rid or "anon", return_logprob,
                            logprob_start_len, top_logprobs_num or 0)

    def _cached_prefix(self, ids: list[int]) -> int:
        page = self.server_args.page_size
        best = 0
        for old in self._seen_prompts:
            n = 0
            while n < min(len(old), len(ids)) and old[n] == ids[n]:
                n += 1
            best = max(best, n)
        return best // page * page

    async def _stream(
        self, ids: list[int], params: dict[str, Any], rid: str, return_logprob: bool,
        logprob_start_len: int | None, top_k: int,
    ) -> AsyncIterator[dict[str, Any]]:
        ctx = self.tokenizer_manager.model_config.context_len
        if len(ids) >= ctx:
            raise ValueError(
                f"The input ({len(ids)} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        vocab = self.tokenizer_manager.model_config.vocab_size
        cached = self._cached_prefix(ids)
        self._seen_prompts.append(ids)
        self.running.add(rid)
        out_lp: list[tuple[float, int, None]] = []
        out_top: list[list[tuple[float, int, None]]] = []
        stop_ids = set(params.get("stop_token_ids") or [])
        if not params.get("ignore_eos"):
            stop_ids.add(self.tokenizer_manager.model_config.hf_config.eos_token_id)
        max_new = int(params.get("max_new_tokens", 128))
        prev = ids[-1]
        generated = 0
        try:
            if self.hold_first_token is not None:
                while not self.hold_first_token.is_set() and rid not in self.aborted:
                    await asyncio.sleep(0.001)
            while True:
                await asyncio.sleep(0)
                meta: dict[str, Any] = {"id": rid, "prompt_tokens": len(ids), "completion_tokens": generated,
                                        "cached_tokens": cached, "num_running_reqs": len(self.running),
                                        "num_waiting_reqs": 0, "finish_reason": None}
                if rid in self.aborted:
                    meta["finish_reason"] = {"type": "abort", "message": "Abort in waiting queue",
                                             "status_code": 200}
                    yield {"output_ids": [], "meta_info": meta}
                    return
                if self.vanish_after is not None and generated >= self.vanish_after:
                    return
                token = (prev * 7 + 3) % vocab
                prev = token
                generated += 1
                out_lp.append((-0.5 * generated, token, None))
                out_top.append([((-0.5 * generated) - i, (token + i) % vocab, None) for i in range(top_k)])
                meta["completion_tokens"] = generated
                if return_logprob:
                    meta["output_token_logprobs"] = list(out_lp)
                    meta["output_top_logprobs"] = list(out_top)
                    if logprob_start_len is not None:
                        meta["input_token_logprobs"] = [
                            (None if i == 0 else -1.0 * i, t, None) for i, t in enumerate(ids)
                        ][logprob_start_len:]
                        meta["input_top_logprobs"] = [
                            None if i == 0 else [(-1.0 * i, t, None)] for i, t in enumerate(ids)
                        ][logprob_start_len:]
                if token in stop_ids:
                    meta["finish_reason"] = {"type": "stop", "matched": token}
                elif generated >= max_new or len(ids) + generated >= ctx:
                    meta["finish_reason"] = {"type": "length", "length": generated}
                yield {"output_ids": [token], "meta_info": meta}
                if meta["finish_reason"] is not None:
                    return
        finally:
            self.running.discard(rid)

    def shutdown(self) -> None:
        self.shut_down = True
