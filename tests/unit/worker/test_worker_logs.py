"""Worker log lines: plain text by default, JSON lines with DYN_LOGGING_JSONL."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from armature.sglang.logs import JsonLineFormatter, jsonl_requested


def test_json_line_formatter() -> None:
    record = logging.LogRecord("armature.sglang", logging.INFO, __file__, 1, "worker ready: model=%s", ("m",), None)
    doc = json.loads(JsonLineFormatter().format(record))
    assert doc["level"] == "INFO" and doc["target"] == "armature.sglang"
    assert doc["message"] == "worker ready: model=m" and doc["time"].endswith("Z")


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARMATURE_LOGGING_JSONL", raising=False)
    monkeypatch.setenv("DYN_LOGGING_JSONL", "true")
    assert jsonl_requested()
    monkeypatch.setenv("DYN_LOGGING_JSONL", "0")
    assert not jsonl_requested()


def test_worker_process_logs_json_lines() -> None:
    # A config error before start: the process logs nothing else, so drive configure_logging directly.
    code = (
        "import logging; from armature.sglang.logs import configure_logging; "
        "configure_logging('warning'); logging.getLogger('x').info('hidden'); logging.getLogger('x').warning('shown')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"DYN_LOGGING_JSONL": "1", "PATH": "/usr/bin:/bin"})
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [line["message"] for line in lines] == ["shown"]
