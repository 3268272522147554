"""Runtime configuration from flags and the environment (Dynamo's names accepted)."""

from __future__ import annotations

import argparse

import pytest

from armature.runtime.runtime import RuntimeSettings, grace_period_from_env, parse_endpoint_path


def test_endpoint_paths() -> None:
    assert parse_endpoint_path("dyn://ns.backend.generate") == ("ns", "backend", "generate")
    assert parse_endpoint_path("ns.prefill.generate") == ("ns", "prefill", "generate")
    for bad in ("ns.backend", "a.b.c.d", "dyn://..x", "ns.bad name.gen"):
        with pytest.raises(ValueError, match="endpoint|invalid name"):
            parse_endpoint_path(bad)


def test_environment_with_dynamo_names() -> None:
    env = {
        "DYN_REQUEST_PLANE": "nats", "DYN_EVENT_PLANE": "nats", "DYN_SYSTEM_PORT": "0",
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "2.5", "NATS_SERVER": "nats://127.0.0.1:9",
        "DYN_DISCOVERY_BACKEND": "file",
    }  # fmt: skip
    s = RuntimeSettings.from_env(env)
    assert (s.request_plane, s.event_plane, s.system_port, s.grace_period_s) == ("nats", "nats", 0, 2.5)
    assert s.nats_url == "nats://127.0.0.1:9" and s.discovery_backend == "file"
    assert s.system_host == "127.0.0.1"
    assert RuntimeSettings.from_env({}).system_port is None  # status server off by default
    assert RuntimeSettings.from_env({"ARMATURE_SYSTEM_PORT": "-1"}).system_port is None
    with pytest.raises(ValueError, match="unknown request plane"):
        RuntimeSettings.from_env({"ARMATURE_REQUEST_PLANE": "carrier-pigeon"})


def test_grace_period_parsing_follows_dynamo() -> None:
    assert grace_period_from_env({}) == 5.0
    assert grace_period_from_env({"ARMATURE_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "-3"}) == 0.0
    assert grace_period_from_env({"DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "soon"}) == 5.0


def test_flags_override_environment() -> None:
    parser = argparse.ArgumentParser()
    RuntimeSettings.add_arguments(parser)
    args = parser.parse_args(["--request-plane", "tcp", "--system-port", "8081", "--discovery-backend", "etcd"])
    s = RuntimeSettings.from_args(args, {"DYN_REQUEST_PLANE": "nats"})
    assert (s.request_plane, s.system_port, s.discovery_backend) == ("tcp", 8081, "etcd")


def test_tcp_host_defaults_to_loopback_and_wildcards_advertise_a_real_address() -> None:
    from armature.runtime.request_plane.tcp import advertise_host_for, tcp_host_from_env

    assert tcp_host_from_env({}) == "127.0.0.1"
    assert tcp_host_from_env({"DYN_TCP_RPC_HOST": "10.0.0.5"}) == "10.0.0.5"
    assert advertise_host_for("10.0.0.5", {}) == "10.0.0.5"
    assert advertise_host_for("0.0.0.0", {"ARMATURE_TCP_RPC_ADVERTISE_HOST": "worker-3"}) == "worker-3"
    assert advertise_host_for("0.0.0.0", {}) not in ("0.0.0.0", "")
