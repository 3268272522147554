"""ServerArgs / kv_events_config validation and the publisher's bind-or-connect rule."""

from __future__ import annotations

import pytest

from armature.engine.kv_events import endpoint_binds
from armature.engine.server_args import KvEventsConfig, ServerArgs, ServerArgsError


def test_sglang_names_and_defaults() -> None:
    a = ServerArgs()
    assert (a.page_size, a.dp_size, a.stream_interval, a.disable_radix_cache) == (16, 1, 1, False)
    assert a.prefill_chunk_limit == 8192
    assert ServerArgs(chunked_prefill_size=-1).prefill_chunk_limit is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page_size": 0}, "page_size"),
        ({"max_total_tokens": 8}, "max_total_tokens"),
        ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
        ({"context_length": 1}, "context_length"),
        ({"max_running_requests": 0}, "max_running_requests"),
        ({"stream_interval": 0}, "stream_interval"),
        ({"dtype": "int3"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"kv_events_config": "[]"}, "JSON object"),
        ({"kv_events_config": '{"publisher": "zmq", "endpoint": "localhost"}'}, "ZMQ URL"),
        ({"kv_events_config": '{"publisher": "zmq", "replay_endpoint": "tcp://*:1"}'}, "unsupported keys"),
    ],
)
def test_bad_values_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ServerArgsError, match=message):
        ServerArgs(**kwargs)


def test_kv_events_config_parses_sglang_json() -> None:
    cfg = KvEventsConfig.from_json('{"publisher":"zmq","endpoint":"tcp://*:5557","topic":"kv-events","buffer_steps":10}')
    assert (cfg.endpoint, cfg.topic) == ("tcp://*:5557", "kv-events")


@pytest.mark.parametrize(
    ("endpoint", "binds"),
    [
        ("tcp://*:5557", True),
        ("tcp://0.0.0.0:5557", True),
        ("tcp://[::]:5557", True),
        ("ipc:///tmp/kv.sock", True),
        ("inproc://kv", True),
        ("tcp://127.0.0.1:5557", False),
        ("tcp://router-host:5557", False),
    ],
)
def test_bind_or_connect_follows_sglang(endpoint: str, binds: bool) -> None:
    assert endpoint_binds(endpoint) is binds
