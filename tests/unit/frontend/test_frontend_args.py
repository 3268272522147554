"""``python -m armature.frontend`` flags that shape how streams are written."""

from __future__ import annotations

import pytest

from armature.frontend.args import parse_args


def test_stream_write_interval_default_flag_and_env() -> None:
    assert parse_args([], env={}).stream_write_interval_ms == 3.0
    assert parse_args(["--stream-write-interval-ms", "0"], env={}).stream_write_interval_ms == 0.0
    assert parse_args([], env={"ARMATURE_STREAM_WRITE_INTERVAL_MS": "10"}).stream_write_interval_ms == 10.0


@pytest.mark.parametrize("value", ["-1", "5000"])
def test_stream_write_interval_out_of_range(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--stream-write-interval-ms", value], env={})
    assert "--stream-write-interval-ms must be between 0 and 1000" in capsys.readouterr().err
