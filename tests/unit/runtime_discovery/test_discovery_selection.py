"""Choosing a discovery backend and its settings from flags and the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from armature.runtime.discovery.etcd import EtcdStore, grpc_target
from armature.runtime.discovery.factory import (
    create_store,
    discovery_backend_name,
    etcd_endpoints,
    file_kv_root,
)
from armature.runtime.discovery.file import FileStore
from armature.runtime.discovery.mem import MemoryStore


def test_flag_beats_armature_env_beats_dynamo_env_beats_default() -> None:
    both = {"ARMATURE_DISCOVERY_BACKEND": "file", "DYN_DISCOVERY_BACKEND": "etcd"}
    assert discovery_backend_name("etcd", env=both) == "etcd"
    assert discovery_backend_name(None, env=both) == "file"
    assert discovery_backend_name(None, env={"DYN_DISCOVERY_BACKEND": "ETCD"}) == "etcd"
    assert discovery_backend_name(None, env={}) == "mem"


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown discovery backend 'kubernetes'.*mem, file, etcd"):
        discovery_backend_name("kubernetes", env={})
    with pytest.raises(ValueError, match="unknown discovery backend"):
        discovery_backend_name(None, env={"DYN_DISCOVERY_BACKEND": "zookeeper"})


def test_etcd_endpoints_from_env() -> None:
    assert etcd_endpoints(env={}) == ["http://127.0.0.1:2379"]
    assert etcd_endpoints(env={"ETCD_ENDPOINTS": "http://a:1, http://b:2 ,"}) == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="names no endpoint"):
        etcd_endpoints(env={"ETCD_ENDPOINTS": " , "})


def test_file_root_from_env() -> None:
    assert file_kv_root(env={"ARMATURE_FILE_KV": "/srv/kv"}) == Path("/srv/kv")
    assert file_kv_root(env={"DYN_FILE_KV": "/srv/dyn"}) == Path("/srv/dyn")
    assert file_kv_root(env={"ARMATURE_FILE_KV": "/a", "DYN_FILE_KV": "/b"}) == Path("/a")
    default = file_kv_root(env={})
    assert default.name.startswith("armature_kv_")


def test_create_store_builds_each_backend(tmp_path: Path) -> None:
    assert isinstance(create_store("mem"), MemoryStore)
    store = create_store("file", root=tmp_path)
    assert isinstance(store, FileStore) and store.root == tmp_path
    assert isinstance(create_store("etcd", endpoints=["http://127.0.0.1:1"]), EtcdStore)


def test_grpc_target_from_etcd_urls() -> None:
    assert grpc_target(["http://127.0.0.1:2379"]) == "127.0.0.1:2379"
    assert grpc_target(["etcd-0:2379"]) == "etcd-0:2379"
    assert grpc_target(["http://localhost"]) == "localhost:2379"
    assert grpc_target(["http://127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    with pytest.raises(ValueError, match="TLS"):
        grpc_target(["https://127.0.0.1:2379"])
    with pytest.raises(ValueError, match="no etcd endpoint"):
        grpc_target([""])


async def test_file_keys_that_cannot_be_file_names_are_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    await store.start()
    try:
        await store.put("v1/instances/ns/c/e/ff", b"x")
        assert (tmp_path / "keys" / "v1%2Finstances%2Fns%2Fc%2Fe%2Fff").is_file()
        with pytest.raises(ValueError, match="too long"):
            await store.put("k" * 300, b"x")
    finally:
        await store.close()
