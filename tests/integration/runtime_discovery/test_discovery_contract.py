"""The KeyValueStore contract, run against every backend: mem, file, and a real etcd.

Each test uses two stores on one backing store (two "processes"): a writer and an observer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from armature.runtime.discovery.base import DiscoveryError, KeyValueStore, WatchEvent, WatchEventKind
from integration.runtime_discovery.backends import DISCOVERY_BACKENDS, TEST_TTL_S, WatchView, store_maker

pytestmark = pytest.mark.integration

PUT, DELETE = WatchEventKind.PUT, WatchEventKind.DELETE


@pytest.fixture(params=DISCOVERY_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], KeyValueStore]:
    etcd_url = request.getfixturevalue("etcd_server_shared").url if backend == "etcd" else None
    return store_maker(backend, tmp_path, etcd_url)


@pytest.fixture
async def stores(make_store: Callable[[], KeyValueStore]) -> AsyncIterator[tuple[KeyValueStore, KeyValueStore]]:
    writer, observer = make_store(), make_store()
    await writer.start()
    await observer.start()
    yield writer, observer
    await writer.close()
    await observer.close()


@pytest.fixture
def prefix() -> str:
    # The shared etcd outlives a test; a fresh prefix keeps tests apart.
    return f"t/{uuid.uuid4().hex[:12]}/"


async def test_put_get_prefix_delete(stores: tuple[KeyValueStore, KeyValueStore], prefix: str) -> None:
    writer, observer = stores
    assert await observer.get(prefix + "a") is None
    await writer.put(prefix + "a", b"1")
    await writer.put(prefix + "b/c", b"2")
    await writer.put(prefix + "a", b"3")  # overwrite
    await writer.put("elsewhere/" + prefix, b"x")
    assert await observer.get(prefix + "a") == b"3"
    assert await observer.get_prefix(prefix) == {prefix + "a": b"3", prefix + "b/c": b"2"}
    assert await observer.get_prefix(prefix + "b/") == {prefix + "b/c": b"2"}
    await observer.delete(prefix + "a")
    await observer.delete(prefix + "never-existed")
    assert await writer.get(prefix + "a") is None
    assert await writer.get_prefix(prefix) == {prefix + "b/c": b"2"}
    await writer.delete("elsewhere/" + prefix)


async def test_values_are_bytes_exactly(stores: tuple[KeyValueStore, KeyValueStore], prefix: str) -> None:
    writer, observer = stores
    blob = bytes(range(256)) * 64
    await writer.put(prefix + "blob", blob)
    await writer.put(prefix + "empty", b"")
    assert await observer.get(prefix + "blob") == blob
    assert await observer.get(prefix + "empty") == b""


async def test_watch_sees_existing_keys_first_then_changes(
    stores: tuple[KeyValueStore, KeyValueStore], prefix: str
) -> None:
    writer, observer = stores
    lease = await writer.grant_lease(TEST_TTL_S)
    await writer.put(prefix + "old1", b"a", lease)
    await writer.put(prefix + "old2", b"b")
    watch = WatchView(observer.watch_prefix(prefix))
    try:
        await watch.wait_for(lambda w: len(w.events) >= 2, 10)
        assert {(e.kind, e.key, e.value) for e in watch.events[:2]} == {
            (PUT, prefix + "old1", b"a"),
            (PUT, prefix + "old2", b"b"),
        }
        await writer.put(prefix + "new", b"c", lease)
        await writer.put("other/" + prefix, b"not mine")
        await writer.put(prefix + "old2", b"b2")
        await writer.delete(prefix + "old1")
        await watch.wait_for(lambda w: prefix + "old1" not in w.view and w.view.get(prefix + "old2") == b"b2", 10)
        assert watch.view == {prefix + "new": b"c", prefix + "old2": b"b2"}
        assert all(e.key.startswith(prefix) for e in watch.events)
        assert WatchEvent(DELETE, prefix + "old1", None) in watch.events
    finally:
        await watch.stop()
        await writer.delete("other/" + prefix)
        await writer.delete(prefix + "old2")


async def test_lease_expiry_removes_keys_and_watchers_see_delete(
    make_store: Callable[[], KeyValueStore], stores: tuple[KeyValueStore, KeyValueStore], prefix: str
) -> None:
    _, observer = stores
    holder = make_store()
    await holder.start()
    lease = await holder.grant_lease(TEST_TTL_S)
    await holder.put(prefix + "inst", b"alive", lease)
    await holder.put(prefix + "plain", b"no lease")
    watch = WatchView(observer.watch_prefix(prefix))
    try:
        await watch.wait_for(lambda w: prefix + "inst" in w.view, 10)
        # Keep-alive carries the key past several TTLs.
        await asyncio.sleep(TEST_TTL_S * 2)
        assert await observer.get(prefix + "inst") == b"alive"
        assert not any(e.kind is DELETE for e in watch.events)

        # The holder goes silent without revoking, as a crashed process would.
        await holder.close(revoke=False)  # type: ignore[call-arg]
        await watch.wait_for(lambda w: prefix + "inst" not in w.view, TEST_TTL_S + 5)
        assert WatchEvent(DELETE, prefix + "inst", None) in watch.events
        assert await observer.get(prefix + "inst") is None
        assert await observer.get(prefix + "plain") == b"no lease"  # unleased keys stay
    finally:
        await watch.stop()
        await observer.delete(prefix + "plain")


async def test_revoke_removes_keys_at_once(stores: tuple[KeyValueStore, KeyValueStore], prefix: str) -> None:
    writer, observer = stores
    lease = await writer.grant_lease(TEST_TTL_S)
    other = await writer.grant_lease(TEST_TTL_S)
    await writer.put(prefix + "a", b"1", lease)
    await writer.put(prefix + "b", b"2", lease)
    await writer.put(prefix + "c", b"3", other)
    watch = WatchView(observer.watch_prefix(prefix))
    try:
        await watch.wait_for(lambda w: len(w.view) == 3, 10)
        await writer.revoke_lease(lease)
        await watch.wait_for(lambda w: set(w.view) == {prefix + "c"}, 10)
        assert await observer.get_prefix(prefix) == {prefix + "c": b"3"}
        with pytest.raises(DiscoveryError):
            await writer.put(prefix + "d", b"4", lease)
    finally:
        await watch.stop()


async def test_close_revokes_leases_and_ends_watches(
    make_store: Callable[[], KeyValueStore], stores: tuple[KeyValueStore, KeyValueStore], prefix: str
) -> None:
    _, observer = stores
    holder = make_store()
    await holder.start()
    lease = await holder.grant_lease(TEST_TTL_S)
    await holder.put(prefix + "k", b"v", lease)
    own_watch = WatchView(holder.watch_prefix(prefix))
    await own_watch.wait_for(lambda w: prefix + "k" in w.view, 10)
    await holder.close()
    await own_watch.wait_for(lambda w: w.ended, 10)
    assert await observer.get(prefix + "k") is None
    with pytest.raises(DiscoveryError):
        await holder.get(prefix + "k")


async def test_put_on_unknown_lease_is_an_error(stores: tuple[KeyValueStore, KeyValueStore], prefix: str) -> None:
    writer, _ = stores
    with pytest.raises(DiscoveryError):
        await writer.put(prefix + "k", b"v", lease_id=0x5EED)
    assert await writer.get(prefix + "k") is None


async def test_rewriting_a_key_moves_it_to_the_new_lease(
    stores: tuple[KeyValueStore, KeyValueStore], prefix: str
) -> None:
    writer, observer = stores
    first = await writer.grant_lease(TEST_TTL_S)
    second = await writer.grant_lease(TEST_TTL_S)
    await writer.put(prefix + "k", b"v1", first)
    await writer.put(prefix + "k", b"v2", second)
    await writer.revoke_lease(first)
    assert await observer.get(prefix + "k") == b"v2"
    await writer.revoke_lease(second)
    assert await observer.get(prefix + "k") is None
