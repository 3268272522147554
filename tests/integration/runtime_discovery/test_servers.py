"""The server fixtures start real servers that answer, and restart them on the same port."""

from __future__ import annotations

import socket

import pytest

from fixtures.servers import EtcdServer, NatsServer

pytestmark = pytest.mark.integration


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def test_etcd_restart_keeps_port(etcd_server: EtcdServer) -> None:
    assert etcd_server.url == f"http://127.0.0.1:{etcd_server.client_port}"
    assert _answers(etcd_server.client_port)
    etcd_server.stop()
    assert not _answers(etcd_server.client_port)
    etcd_server.start()
    assert _answers(etcd_server.client_port)


def test_nats_restart_keeps_port(nats_server: NatsServer) -> None:
    port = nats_server.port
    assert _answers(port)
    nats_server.restart()
    assert nats_server.port == port and _answers(port)
