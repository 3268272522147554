"""The scheduler of a disaggregated engine: the native ``Scheduler`` plus the two P/D roles.

Prefill role: a request that carries bootstrap info opens its room on the bootstrap server;
when it finishes (prompt computed, first token sampled) its prompt pages are copied to a staging
tensor *before* the pages are released — into the radix cache as usual, so repeated prefixes
are not recomputed and KV events still flow — and handed to the server. An abort fails the room.

Decode role: a request that carries bootstrap info does not wait for prefill here. It reserves
pages for its prompt (``TRANSFER`` phase, counted as locked pages), a pull brings the prefill
side's pages into a staging buffer, and on the step loop the pages are copied into the pool,
inserted into this engine's radix cache, and the request joins the running batch with the
prefill's first token already generated — the next step decodes from there.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from armature.engine.api import EngineFinishReason, GenerateOutput, GenerateRequest, LoadMetrics
from armature.engine.disagg.bootstrap import StagedKv
from armature.engine.disagg.config import DisaggMode
from armature.engine.disagg.kv_pages import gather_pages, scatter_pages
from armature.engine.disagg.puller import PullJob, PullResult
from armature.engine.disagg.transfer import gather_into_segment
from armature.engine.kv_pool import KVPool
from armature.engine.scheduler import Req, ReqStatus, Scheduler, SchedulerConfig, SeqResult, StepExecutor
from armature.protocols.llm import BootstrapInfo

log = logging.getLogger(__name__)

# Every decode-side transfer failure starts with this, so the worker can tell it from a model
# error and let the frontend migrate the request (the prefill worker may be gone).
TRANSFER_ERROR_PREFIX = "KV transfer failed: "
_WAIT_FOR_PAGES_S = 0.002


def is_transfer_error(error: str | None) -> bool:
    return bool(error) and error.startswith(TRANSFER_ERROR_PREFIX)  # type: ignore[union-attr]


@dataclass
class TransferStats:
    transfers: int = 0
    failures: int = 0
    bytes: int = 0
    wire_s: float = 0.0  # bytes on the wire (tcp) / mapping the segment (shm)
    copy_s: float = 0.0  # received pages into this pool (on the step loop)
    # From the prefill side starting to stage the KV to the pages being in this pool.
    total_s: float = 0.0
    recent: deque[tuple[int, float, float]] = field(default_factory=lambda: deque(maxlen=4096))


@dataclass(eq=False)
class _Transfer:
    req: Req
    bootstrap: BootstrapInfo
    pages: list[int] = field(default_factory=list)


@dataclass
class PrefillHooks:
    """What the prefill role needs from the bootstrap server (set by ``DisaggLink``)."""

    open_room: Callable[[int, str], None]
    stage: Callable[[int, StagedKv], None]
    fail: Callable[[int, str], None]
    # The shared-memory segment a waiting decode side reads from, to write the pages there at once.
    shm_target: Callable[[int], str | None]


class DisaggScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, executor: StepExecutor, mode: DisaggMode) -> None:
        super().__init__(config, executor)
        if not isinstance(self.allocator, KVPool):
            raise TypeError("disaggregation moves real KV pages: it needs the native engine's KV pool")
        self.pool: KVPool = self.allocator
        self.mode = DisaggMode(mode)
        # Prefill role.
        self.prefill_hooks: PrefillHooks | None = None
        self._rooms: dict[str, int] = {}
        # A finished prefill's last output is held until its room is done (KV delivered, or the
        # room failed / expired), so the prefill request's stream spans the transfer, as in
        # SGLang, and aborting it (the caller cancelled) drops the staged KV at once.
        self._staged: dict[str, int] = {}
        self._held: dict[str, GenerateOutput] = {}
        # Why the bootstrap server asked for an abort (set from its thread, read on the step loop).
        self.abort_reasons: dict[str, str] = {}
        # Decode role.
        self.start_pull: Callable[[PullJob], None] | None = None
        self.cancel_pull: Callable[[str], None] | None = None
        self.transfer_stats = TransferStats()
        self._transfers: dict[str, _Transfer] = {}
        self._unallocated: deque[_Transfer] = deque()
        self._ready: list[GenerateOutput] = []

    # --- requests in / out -----------------------------------------------------------------

    def add_request(self, req: GenerateRequest) -> Req:
        boot = req.bootstrap
        r = super().add_request(req)
        if boot is None:
            return r
        if self.mode is DisaggMode.PREFILL:
            if self.prefill_hooks is not None:
                self._rooms[r.rid] = boot.bootstrap_room
                self.prefill_hooks.open_room(boot.bootstrap_room, r.rid)
            return r
        # Decode: out of the prefill queue, into the transfer phase.
        self.waiting.remove(r)
        t = _Transfer(r, boot)
        self._transfers[r.rid] = t
        self._unallocated.append(t)
        self._allocate_transfers()
        return r

    def abort(self, rid: str, reason: str = "aborted by the caller") -> GenerateOutput | None:
        reason = self.abort_reasons.pop(rid, reason)
        held = self._held.pop(rid, None)
        if held is not None:
            room = self._staged.pop(rid, None)
            if room is not None and self.prefill_hooks is not None:
                self.prefill_hooks.fail(room, f"the prefill request was aborted ({reason})")
            held.finish_reason = EngineFinishReason.ABORT
            held.error = reason
            self.stats.aborted += 1
            return held
        t = self._transfers.pop(rid, None)
        if t is not None:
            self._drop_transfer(t)
            r = t.req
            r.finish_reason = EngineFinishReason.ABORT
            r.error = reason
            self.stats.aborted += 1
            return self._finish(r)
        out = super().abort(rid, reason)
        room = self._rooms.pop(rid, None)
        if room is not None and self.prefill_hooks is not None:
            self.prefill_hooks.fail(room, f"the prefill request was aborted ({reason})")
        return out

    def abort_all(self, reason: str) -> list[GenerateOutput]:
        outs = super().abort_all(reason)
        return outs + [o for rid in list(self._held) if (o := self.abort(rid, reason)) is not None]

    def delivered(self, rid: str) -> None:
        """On the step loop: the room of prefill request ``rid`` handed its KV over."""
        self._staged.pop(rid, None)
        out = self._held.pop(rid, None)
        if out is not None:
            self._ready.append(out)

    def _drop_transfer(self, t: _Transfer) -> None:
        if t in self._unallocated:
            self._unallocated.remove(t)
        if t.pages:
            # The puller writes only into its own staging buffer, so the pages are free at once.
            self.allocator.free(t.pages)
            t.pages = []
            if self.cancel_pull is not None:
                self.cancel_pull(t.req.rid)

    # --- state -----------------------------------------------------------------------------

    @property
    def held_prefills(self) -> int:
        return len(self._held)

    @property
    def has_work(self) -> bool:
        return super().has_work or bool(self._ready) or bool(self._unallocated)

    @property
    def transfers_in_flight(self) -> int:
        return len(self._transfers)

    def private_pages(self) -> int:
        return super().private_pages() + sum(len(t.pages) for t in self._transfers.values())

    def load_metrics(self) -> LoadMetrics:
        m = super().load_metrics()
        # A request whose KV is still on its way is queued work, as SGLang's transfer queue.
        m.num_waiting_reqs += len(self._transfers)
        return m

    # --- prefill role ----------------------------------------------------------------------

    def _release(self, r: Req) -> None:
        room = self._rooms.get(r.rid)
        if room is not None and r.finish_reason in (EngineFinishReason.STOP, EngineFinishReason.LENGTH):
            del self._rooms[r.rid]
            if self._stage(r, room):
                self._staged[r.rid] = room
        super()._release(r)

    def _stage(self, r: Req, room: int) -> bool:
        assert self.prefill_hooks is not None
        n = len(r.input_ids)
        if not r.output_ids or r.kv_len < n:
            self.prefill_hooks.fail(room, "the prefill request finished without computing its prompt")
            return False
        staged_at = time.time()
        num_pages = -(-n // self.page_size)
        pages = r.pages[:num_pages]
        data: torch.Tensor | None = None
        segment = self.prefill_hooks.shm_target(room)
        if segment is not None:
            try:
                nbytes = gather_into_segment(self.pool, pages, segment)
            except OSError as exc:  # the decode side left meanwhile (or is elsewhere): stage
                log.debug("room %d: direct write into %s failed (%s); staging", room, segment, exc)
                segment = None
        if segment is None:
            data = gather_pages(self.pool, pages)
            nbytes = data.numel() * data.element_size()
        top = r.output_top_logprobs[0] if r.output_top_logprobs else None
        self.prefill_hooks.stage(
            room,
            StagedKv(
                rid=r.rid,
                data=data,
                nbytes=nbytes,
                in_segment=segment,
                num_tokens=n,
                num_pages=num_pages,
                first_token=r.output_ids[0],
                logprob=r.output_logprobs[0] if r.output_logprobs else None,
                top_logprobs=[(int(t), float(lp)) for t, lp in top] if top is not None else None,
                cached_tokens=max(0, r.cached_tokens),
                staged_at=staged_at,
                input_logprobs=r.input_logprobs,
                input_top_logprobs=r.input_top_logprobs,
            ),
        )
        return True

    # --- decode role -----------------------------------------------------------------------

    def _allocate_transfers(self) -> None:
        while self._unallocated:
            t = self._unallocated[0]
            need = -(-len(t.req.input_ids) // self.page_size)
            avail = self._available()
            reserve = self._reserve_pages(self.running) + self.config.watermark_pages if self.running else 0
            if need > avail - reserve and (self.running or self._transfers_holding_pages()):
                return  # wait for running decodes or other transfers to give pages back
            if need > avail:
                return  # (validation keeps a prompt within the pool, so only locked pages get here)
            self._unallocated.popleft()
            t.pages = self._alloc(need)
            assert self.start_pull is not None, "a decode scheduler needs its KV puller"
            self.start_pull(PullJob(t.req.rid, t.bootstrap, len(t.req.input_ids), list(t.pages)))

    def _transfers_holding_pages(self) -> bool:
        return any(t.pages for t in self._transfers.values())

    def pull_done(self, result: PullResult) -> None:
        """On the step loop: the pull of ``result.rid`` ended (its pages arrived, or it failed)."""
        t = self._transfers.get(result.rid)
        if t is None or t.req.status is ReqStatus.FINISHED:
            if result.kv is not None:
                result.kv.release()
            return
        del self._transfers[result.rid]
        r = t.req
        st = self.transfer_stats
        if not result.ok or result.ready is None or result.kv is None:
            st.failures += 1
            self._drop_transfer(t)
            r.finish_reason = EngineFinishReason.ERROR
            r.error = TRANSFER_ERROR_PREFIX + (result.error or "no KV arrived")
            log.warning("request %s: %s", r.rid, r.error)
            self._ready.append(self._finish(r))
            return
        ready, kv = result.ready, result.kv
        began = time.perf_counter()
        try:
            scatter_pages(self.pool, t.pages, kv.data)
        finally:
            kv.release()
        st.copy_s += time.perf_counter() - began
        st.transfers += 1
        st.bytes += kv.nbytes
        st.wire_s += result.wire_s
        total = max(0.0, time.time() - ready.staged_at) if ready.staged_at else result.wire_s
        st.total_s += total
        st.recent.append((kv.nbytes, result.wire_s, total))
        self._start_running(r, t.pages, ready.cached_tokens)
        if r.input_logprobs is not None and ready.input_logprobs is not None:
            # Prompt logprobs were computed by the prefill side; the first output carries them.
            r.input_logprobs = list(ready.input_logprobs)
            if r.input_top_logprobs is not None and ready.input_top_logprobs is not None:
                rows = ready.input_top_logprobs
                r.input_top_logprobs = [[(int(t), float(lp)) for t, lp in row] for row in rows]
        if r.sampling.max_new_tokens == 0:
            r.finish_reason = EngineFinishReason.LENGTH
        else:
            tops = ready.top_logprobs
            top = [(int(a), float(b)) for a, b in tops] if tops is not None else None
            first = SeqResult(token_id=ready.first_token, logprob=ready.logprob, top_logprobs=top)
            self._append_token(r, first)
        if r.finish_reason is not None:
            self.running.remove(r)
            self._release(r)
            self.stats.finished += 1
            self._ready.append(self._finish(r))
        else:
            self._ready.append(self._delta(r))

    def _start_running(self, r: Req, pages: list[int], cached_tokens: int) -> None:
        r.pages = list(pages)
        r.cached_pages = 0
        r.kv_len = len(r.input_ids)
        r.status = ReqStatus.RUNNING
        r.admit_seq = self._admit_counter
        self._admit_counter += 1
        r.cached_tokens = cached_tokens
        self.running.append(r)
        # The received prompt is as good as one computed here: share it through the cache.
        self._cache_computed(r)

    # --- one step --------------------------------------------------------------------------

    def step(self) -> list[GenerateOutput]:
        if self._unallocated:
            self._allocate_transfers()
        outputs, self._ready = self._ready, []
        if super().has_work:
            for out in super().step():
                if out.finish_reason is not None and out.rid in self._staged:
                    self._held[out.rid] = out  # until the room is done
                else:
                    outputs.append(out)
        elif self._unallocated and not outputs:
            # Only transfers in flight hold the pages we wait for: do not spin the core.
            time.sleep(_WAIT_FOR_PAGES_S)
        return outputs
