"""The storage interface's contract, run against every store: disk, memory and S3 (on moto).

Each store is built by a factory that can make a second instance on the same backing, as two
servers share one folder or one bucket.
"""

from __future__ import annotations

import errno
import threading

import pytest

from polykit_cache.memstore import Backing, MemoryStore
from polykit_cache.storage import Storage
from polykit_cache.store import SPACES, StorageFull, entry_name, namespace_of
from store_backends import s3_store_factory
from support import key_for, sha

# One valid name per space, as the protocol modules build them.
NAMES = {
    "polykit": key_for("artifact"),
    "turbo": "team/abc123",
    "nx": "abc123",
    "kv": "ccache/ab/cdef",
    "bazel-ac": "1" * 64,
    "bazel-cas": "@instance:a/" + "2" * 64,  # in the URL namespace instance/a
}


def disk_factory(tmp_path, capacity=None, **options):
    def make():
        store = Storage(tmp_path / "store", capacity, **options)
        return store
    return make


def refuse_xattrs(target, name, value):
    """A filesystem without user extended attributes (some tmpfs, network filesystems)."""
    raise OSError(errno.ENOTSUP, "Operation not supported")


def memory_factory(tmp_path, capacity=None):
    backing = Backing(capacity)
    return lambda: MemoryStore(backing)


@pytest.fixture(params=["disk", "disk-no-xattr", "memory", "s3"])
def factory(request, tmp_path):
    """A function that makes a new store instance on one shared backing."""
    if request.param == "disk":
        return disk_factory(tmp_path)
    if request.param == "disk-no-xattr":  # nor unnamed temporary files: the layout of earlier versions
        return disk_factory(tmp_path, setxattr=refuse_xattrs, unnamed_temps=False)
    if request.param == "memory":
        return memory_factory(tmp_path)
    return s3_store_factory(request, tmp_path)


def put(store, space, name, data, meta=None):
    staged = store.stage()
    staged.write(data)
    staged.finish()
    return store.commit(space, name, staged, meta)


def read(store, space, name):
    found = store.open(space, name)
    assert found is not None, f"{space}/{name} is missing"
    stat, fh = found
    with fh:
        return stat, fh.read()


@pytest.mark.parametrize("space", SPACES)
def test_an_object_round_trips_with_its_size_hash_and_metadata(factory, space):
    store = factory()
    name = NAMES[space]
    assert store.stat(space, name) is None and store.open(space, name) is None
    data = b"x" * 70_000 + space.encode()
    assert put(store, space, name, data, {"duration": 1234, "tag": "abc=="}) is True
    stat, got = read(store, space, name)
    assert got == data
    assert (stat.space, stat.name, stat.size, stat.sha256) == (space, name, len(data), sha(data))
    assert dict(stat.meta) == {"duration": 1234, "tag": "abc=="}
    assert store.stat(space, name).size == len(data)


@pytest.mark.parametrize("space", [s for s in SPACES if s != "bazel-ac"])
def test_first_write_wins_and_a_lost_race_is_an_answer(factory, space):
    first, second = factory(), factory()
    name = NAMES[space]
    assert put(first, space, name, b"first") is True
    assert put(first, space, name, b"again") is False
    assert put(second, space, name, b"second") is False  # another instance on the same backing
    assert read(second, space, name)[1] == b"first"
    assert read(first, space, name)[1] == b"first"


def test_only_the_action_cache_is_replaced(factory):
    store = factory()
    name = NAMES["bazel-ac"]
    assert put(store, "bazel-ac", name, b"old result") is True
    assert put(store, "bazel-ac", name, b"new result") is True
    stat, data = read(factory(), "bazel-ac", name)
    assert data == b"new result" and stat.sha256 == sha(b"new result")


def test_racing_commits_across_two_instances_store_exactly_one(factory):
    stores = [factory(), factory()]
    name = NAMES["kv"]
    results: list = []
    barrier = threading.Barrier(8)

    def race(i):
        store = stores[i % 2]
        staged = store.stage()
        staged.write(f"writer {i}".encode())
        staged.finish()
        barrier.wait()
        results.append((i, store.commit("kv", name, staged)))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [i for i, stored in results if stored]
    assert len(results) == 8 and len(winners) == 1
    for store in stores:
        assert read(store, "kv", name)[1] == f"writer {winners[0]}".encode()


def test_nothing_staged_is_visible_until_committed(factory):
    store = factory()
    staged = store.stage()
    staged.write(b"half an upload")
    assert store.stat("kv", NAMES["kv"]) is None
    assert list(store.scan("kv")) == []
    staged.discard()
    assert store.stat("kv", NAMES["kv"]) is None
    assert store.usage().count == 0


def test_spaces_are_apart(factory):
    store = factory()
    assert put(store, "nx", "abc123", b"nx's") is True
    assert store.stat("kv", "abc123/x") is None
    assert put(store, "turbo", "abc123/abc123", b"turbo's") is True
    assert read(store, "nx", "abc123")[1] == b"nx's"


def test_metadata_may_not_use_the_store_s_own_fields(factory):
    store = factory()
    staged = store.stage()
    staged.write(b"x")
    staged.finish()
    with pytest.raises(ValueError):
        store.commit("kv", NAMES["kv"], staged, {"sha256": "0" * 64})
    assert store.stat("kv", NAMES["kv"]) is None


def test_scan_lists_names_under_a_prefix(factory):
    store = factory()
    for name in ("ccache/ab/one", "ccache/ab/two", "ccache/cd/three", "gradle/four"):
        assert put(store, "kv", name, name.encode()) is True
    assert put(store, "nx", "ccache", b"other space") is True
    assert sorted(s.name for s in store.scan("kv", "ccache/ab/")) == ["ccache/ab/one", "ccache/ab/two"]
    assert sorted(s.name for s in store.scan("kv")) == ["ccache/ab/one", "ccache/ab/two", "ccache/cd/three", "gradle/four"]
    listed = {s.name: s for s in store.scan("kv", "gradle/")}
    assert listed["gradle/four"].size == len(b"gradle/four") and listed["gradle/four"].sha256 == sha(b"gradle/four")
    key = NAMES["polykit"]
    assert put(store, "polykit", key, b"artifact") is True
    assert [s.name for s in store.scan("polykit")] == [key]


def test_delete_removes_and_usage_follows(factory):
    store = factory()
    assert put(store, "kv", NAMES["kv"], b"12345") is True
    assert put(store, "polykit", NAMES["polykit"], b"123") is True
    usage = store.usage()
    assert (usage.count, usage.bytes) == (2, 8)
    assert store.delete("kv", NAMES["kv"]) is True
    assert store.delete("kv", NAMES["kv"]) is False
    assert store.stat("kv", NAMES["kv"]) is None
    assert (store.usage().count, store.usage().bytes) == (1, 3)
    assert put(store, "kv", NAMES["kv"], b"anew") is True  # stored anew after a delete


def test_an_upload_larger_than_the_bound_does_not_fit(request, tmp_path):
    for make in (disk_factory(tmp_path, capacity=64 * 1024), memory_factory(tmp_path, capacity=64 * 1024)):
        store = make()
        assert store.fits(1000) and not store.fits(10 * 1024 * 1024)


def test_a_full_store_refuses_and_keeps_nothing(tmp_path):
    store = memory_factory(tmp_path, capacity=100)()
    assert put(store, "kv", "a/one", b"x" * 60) is True
    with pytest.raises(StorageFull):
        put(store, "kv", "a/two", b"y" * 60)
    assert store.stat("kv", "a/two") is None and store.usage().bytes == 60


def test_recovery_removes_interrupted_uploads(factory):
    store = factory()
    assert put(store, "kv", NAMES["kv"], b"kept") is True
    staged = store.stage()
    staged.write(b"interrupted")  # the process dies here: never committed nor discarded
    restarted = factory()
    restarted.recover()
    assert read(restarted, "kv", NAMES["kv"])[1] == b"kept"
    assert restarted.stat("nx", "abc123") is None
    assert [s.name for s in restarted.scan("kv")] == [NAMES["kv"]]


@pytest.mark.parametrize("space", SPACES)
def test_a_namespace_s_entry_is_its_own(factory, space):
    store = factory()
    name = NAMES[space].rpartition("/")[2] if space in ("polykit", "nx", "bazel-ac", "bazel-cas") else NAMES[space]
    spaced = entry_name("team/a", name)
    assert put(store, space, name, b"outside") is True
    assert put(store, space, spaced, b"inside") is True
    assert read(store, space, name)[1] == b"outside" and read(store, space, spaced)[1] == b"inside"
    assert [s.name for s in store.scan(space, "@")] == [spaced]
    assert namespace_of(spaced) == "team/a" and namespace_of(name) == ""
