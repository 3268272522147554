"""Context: ids, trace linkage, and cancellation that flows down to linked children."""

from __future__ import annotations

import asyncio

from armature.runtime.context import Context


def test_child_shares_the_trace_and_chains_spans() -> None:
    parent = Context("req-1")
    child = parent.child()
    assert child.trace_id == parent.trace_id
    assert child.parent_span_id == parent.span_id and child.span_id != parent.span_id
    assert len(parent.trace_id) == 32 and len(parent.span_id) == 16


def test_stop_and_kill_flow_to_children_not_parents() -> None:
    parent = Context()
    child = parent.child()
    grandchild = child.child()
    child.stop_generating()
    assert child.is_stopped() and grandchild.is_stopped() and not parent.is_stopped()
    assert not grandchild.is_killed()
    parent.kill()
    assert child.is_killed() and grandchild.is_killed() and parent.is_stopped()


def test_linking_to_a_killed_parent_kills_at_once_and_unlinking_stops_propagation() -> None:
    parent = Context()
    parent.kill()
    assert parent.child().is_killed()
    live = Context()
    child = live.child()
    child.detach()
    live.stop_generating()
    assert not child.is_stopped()


def test_callbacks_fire_on_each_transition() -> None:
    ctx = Context()
    seen: list[tuple[bool, bool]] = []
    ctx.add_callback(lambda c: seen.append((c.is_stopped(), c.is_killed())))
    ctx.stop_generating()
    ctx.stop_generating()
    ctx.kill()
    assert seen == [(True, False), (True, True)]


async def test_async_wait_wakes_on_stop() -> None:
    ctx = Context()
    waiter = asyncio.ensure_future(ctx.async_killed_or_stopped())
    await asyncio.sleep(0)
    assert not waiter.done()
    ctx.stop_generating()
    assert await asyncio.wait_for(waiter, 1) is True
    assert await ctx.async_killed_or_stopped() is True
