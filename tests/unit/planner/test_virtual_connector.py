"""The virtual environment: decisions written to the discovery store for an orchestrator, and
no new decision until it acknowledges the last one."""

from __future__ import annotations

import json

from armature.planner.connectors import VirtualConnector
from armature.runtime.discovery.mem import MemoryState, MemoryStore


async def test_decisions_wait_for_the_orchestrators_acknowledgement() -> None:
    store = MemoryStore(MemoryState())
    connector = VirtualConnector(store, "prod", ack_timeout_s=3600)
    assert connector.ready()
    await connector.scale("backend", 3, 2)
    decision = json.loads(await store.get("v1/planner/prod/decision") or b"{}")
    assert decision == {"decision_id": 1, "targets": {"backend": 3}}
    await connector.refresh()
    assert not connector.ready()
    # The orchestrator scaled and says so.
    await store.put("v1/planner/prod/scaled", json.dumps({"decision_id": 1}).encode())
    await connector.refresh()
    assert connector.ready()
    await connector.scale("backend", 2, 3)
    assert json.loads(await store.get("v1/planner/prod/decision") or b"{}")["decision_id"] == 2
    await connector.refresh()
    assert not connector.ready()  # the old acknowledgement does not cover the new decision


async def test_an_unanswered_decision_expires() -> None:
    connector = VirtualConnector(MemoryStore(MemoryState()), "prod", ack_timeout_s=0.0)
    await connector.scale("backend", 2, 1)
    assert connector.ready()
