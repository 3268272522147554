"""Issue 4, bar 2: a schemathesis run against /openapi.json finds no 5xx (a worker is serving)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from integration.frontend.stack import ServedStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_schemathesis_finds_no_server_errors(stack: ServedStack, tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if exe is None:
        pytest.fail("schemathesis is not installed (it is pinned in the test extras: make setup)")
    cmd = [
        exe, "run", f"{stack.base_url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", "25", "--seed", "4", "--request-timeout", "60",
        "--phases", "examples,coverage,fuzzing",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1")
    # Run it as a subprocess awaited on this loop, which keeps serving the requests it sends.
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=tmp_path
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 280)
    text = out.decode(errors="replace")
    print(text[-3000:])
    assert proc.returncode == 0, text[-6000:]
    assert "Server error" not in text
    # And the server still serves a normal request afterwards.
    import httpx

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:
        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
