"""``python -m armature serve``: the embedded default as a user runs it (SmolLM2, one process).

The server is started once for the module: the first test drives it with the openai SDK, the
second SIGTERMs it and expects a clean exit. The model cache is made by the ``smollm2_path``
fixture first, so start-up here is the cached path (the time to ready is printed, not asserted).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from integration.frontend.procs import Proc, free_port, process_env, spawn

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
READY_LINE = re.compile(r"Armature is serving '([^']+)' at (http://\S+/v1)")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[tuple[Proc, str]]:
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    started = time.monotonic()
    proc = spawn(["-m", "armature", "serve", "--port", str(port)], tmp / "serve.log", process_env(tmp / "kv"), port)
    try:
        deadline = started + 120
        while (m := READY_LINE.search(proc.log())) is None:
            if not proc.alive():
                pytest.fail(f"armature serve exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"armature serve not ready in 120 s:\n{proc.log()[-3000:]}")
            time.sleep(0.05)
        print(f"armature serve ready {time.monotonic() - started:.1f} s after spawn: {m.group(0)}")
        assert m.group(1) == MODEL
        assert m.group(2) == f"http://127.0.0.1:{port}/v1"
        yield proc, m.group(2)
    finally:
        if proc.alive():
            proc.kill()


def test_serve_answers_the_openai_sdk(served: tuple[Proc, str]) -> None:
    _, url = served
    client = openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 8
    assert r.choices[0].message.content
    text = ""
    for chunk in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, stream=True):
        text += chunk.choices[0].text if chunk.choices else ""
    assert text


def test_sigterm_exits_cleanly(served: tuple[Proc, str]) -> None:
    proc, _ = served
    assert proc.terminate(timeout_s=30) == 0, proc.log()[-3000:]
