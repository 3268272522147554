"""The ``plane`` fixture: runtimes on one request plane (tcp, or nats with a real nats-server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from integration.runtime_core.planes import REQUEST_PLANES, Plane


@pytest.fixture(params=REQUEST_PLANES)
async def plane(request: pytest.FixtureRequest) -> AsyncIterator[Plane]:
    nats_url = request.getfixturevalue("nats_server_shared").url if request.param == "nats" else None
    p = Plane(request.param, nats_url)
    yield p
    for rt in p.made:
        await rt.shutdown(grace_period_s=0)

