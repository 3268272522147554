"""Health-check canary payloads (Dynamo's shape; env override)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from armature.protocols.llm import PreprocessedRequest
from armature.sglang.health_check import HealthCheckPayloadError, decode_payload


def test_decode_payload_is_bos_one_token_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYN_HEALTH_CHECK_PAYLOAD", raising=False)
    req = msgspec.convert(decode_payload("m", 7), PreprocessedRequest)
    assert req.token_ids == [7] and req.model == "m"
    assert req.stop_conditions.max_tokens == 1 and req.stop_conditions.ignore_eos is False
    assert (req.sampling_options.temperature, req.sampling_options.top_p, req.sampling_options.top_k) == (0.0, 1.0, -1)
    assert msgspec.convert(decode_payload("m", None), PreprocessedRequest).token_ids == [1]


def test_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", json.dumps({"token_ids": [9]}))
    assert decode_payload("m", 1) == {"token_ids": [9], "model": "m"}
    f = tmp_path / "p.json"
    f.write_text('{"token_ids": [10]}')
    monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", f"@{f}")
    assert decode_payload("m", 1) == {"token_ids": [10], "model": "m"}
    monkeypatch.setenv("DYN_HEALTH_CHECK_PAYLOAD", "[1, 2]")
    with pytest.raises(HealthCheckPayloadError, match="JSON object"):
        decode_payload("m", 1)
