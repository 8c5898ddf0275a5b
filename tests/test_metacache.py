"""Entry metadata kept in memory is used only for the very file it was read from.

Two apps on one storage folder stand for two worker processes: what one changes, the other
must never answer from its copy.
"""

import os
import time

import pytest

from polykit_cache import storage as storage_module
from polykit_cache.metacache import SETTLE_NS, IdentityCache
from polykit_cache.storage import INFO_CACHE_SIZE, KEPT_BODIES_BYTES, KEPT_BODY_SIZE
from support import KEY, call, key_for, new_app, pack_tree


def test_the_cache_is_bounded_and_drops_its_oldest_copies(tmp_path):
    files = []
    for i in range(5):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * i)
        files.append(os.stat(path))
    cache = IdentityCache(3)
    for i, st in enumerate(files):
        cache.put(f"k{i}", st, i)
    assert len(cache) == 3
    assert [cache.get(f"k{i}", st) for i, st in enumerate(files)] == [None, None, 2, 3, 4]
    cache.put("k2", files[2], 20)  # a key put again is not counted twice
    assert len(cache) == 3 and cache.get("k2", files[2]) == 20


def test_a_copy_is_never_returned_for_another_file(tmp_path):
    path = tmp_path / "entry"
    path.write_bytes(b"first")
    cache = IdentityCache(10)
    cache.put("k", os.stat(path), "first")
    assert cache.get("k", os.stat(path)) == "first"
    replacement = tmp_path / "new"
    replacement.write_bytes(b"other")  # same size, another inode
    os.replace(replacement, path)
    assert cache.get("k", os.stat(path)) is None
    cache.put("k", os.stat(path), "second")
    cache.pop("k")
    assert cache.get("k", os.stat(path)) is None and "k" not in cache


def test_kept_bytes_stay_within_their_bound(tmp_path):
    files = []
    for i in range(4):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * 40)
        files.append(os.stat(path))
    cache = IdentityCache(10, max_bytes=100)
    for i, st in enumerate(files):
        cache.put(f"k{i}", st, b"x" * 40)
        assert cache.bytes <= 100
    assert [cache.get(f"k{i}", st) is not None for i, st in enumerate(files)] == [False, False, True, True]
    cache.put("big", files[0], b"x" * 101)  # over the whole bound: not kept, nothing dropped for it
    assert "big" not in cache and cache.bytes == 80
    cache.pop("k2")
    assert cache.bytes == 40
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


class _CoarseStat:
    """A stat whose ctime is the filesystem clock's last tick, however the file changed since."""

    def __init__(self, st: os.stat_result, tick_ns: int) -> None:
        self._st = st
        self.st_ctime_ns = tick_ns
        self.st_ctime = tick_ns / 1e9

    def __getattr__(self, name: str):
        return getattr(self._st, name)


class _CoarseClockOs:
    """The ``os`` module as the storage sees it on a filesystem whose clock has not ticked since
    ``tick_ns`` (whole seconds on some filesystems; the kernel's coarse clock otherwise)."""

    def __init__(self, tick_ns: int) -> None:
        self.tick_ns = tick_ns

    def stat(self, path, *args, **kwargs):
        return _CoarseStat(os.stat(path, *args, **kwargs), self.tick_ns)

    def fstat(self, fd):
        return _CoarseStat(os.fstat(fd), self.tick_ns)

    def __getattr__(self, name: str):
        return getattr(os, name)


@pytest.mark.parametrize("protocol", ["bazel-ac", "kv"])
def test_an_entry_rewritten_within_one_tick_of_the_filesystem_clock_is_never_answered_from_kept_bytes(
        tmp_path, monkeypatch, protocol):
    """A file rewritten in place (or a new file on a reused inode) within one tick keeps its
    identity: its bytes must not have been kept (they carry no digest a client checks)."""
    app = new_app(tmp_path / "store")
    path, space, name = ((f"/ac/{key_for('action')}", "bazel-ac", key_for("action")) if protocol == "bazel-ac"
                         else ("/kv/gradle/k", "kv", "gradle/k"))
    assert call(app, "PUT", path, b"first result").status in (200, 201)
    tick = time.time_ns()
    monkeypatch.setattr(storage_module, "os", _CoarseClockOs(tick))
    app.storage._clock = lambda: tick + SETTLE_NS // 2  # read within the settling time
    for _ in range(2):
        assert call(app, "GET", path).body == b"first result"
    with open(app.storage.stat(space, name).path, "r+b") as fh:
        fh.write(b"other result")  # the same size, the same inode, the same (coarse) ctime
    assert call(app, "GET", path).body == b"other result"
    assert len(app.storage._bodies) == 0
    app.storage._clock = lambda: tick + SETTLE_NS + 1  # once settled, the bytes are kept
    for _ in range(2):
        assert call(app, "GET", path).body == b"other result"
    assert len(app.storage._bodies) == 1


def test_the_bytes_of_small_entries_are_kept_and_bounded(tmp_path):
    app = new_app(tmp_path / "store")
    app.storage._clock = lambda: time.time_ns() + SETTLE_NS + 1  # entries read once settled
    assert app.storage._bodies._max_bytes == KEPT_BODIES_BYTES
    app.storage._bodies = IdentityCache(INFO_CACHE_SIZE, max_bytes=3 * 1000)
    bodies = {f"/kv/gradle/k{i}": os.urandom(1000) for i in range(5)}
    large = os.urandom(KEPT_BODY_SIZE + 1)
    for path, body in [*bodies.items(), ("/kv/gradle/large", large)]:
        assert call(app, "PUT", path, body).status == 201
    for _ in range(2):  # the second round is answered from the bytes kept, as far as they go
        for path, body in bodies.items():
            reply = call(app, "GET", path)
            assert reply.status == 200 and reply.body == body and reply.headers["content-length"] == "1000"
            assert app.storage._bodies.bytes <= 3 * 1000
        assert call(app, "GET", "/kv/gradle/large").body == large
    assert len(app.storage._bodies) == 3  # the large entry is never kept
    artifact = pack_tree(tmp_path, {"a": b"x"})
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", artifact).status == 201
    for _ in range(2):
        assert call(app, "GET", f"/v1/artifacts/{KEY}").body == artifact
    assert KEY in app.storage._bodies


def test_an_artifact_deleted_and_stored_again_by_another_worker_is_answered_anew(tmp_path):
    first, second = new_app(tmp_path / "store"), new_app(tmp_path / "store")
    first.storage._clock = lambda: time.time_ns() + SETTLE_NS + 1  # entries read once settled
    path = f"/v1/artifacts/{KEY}"
    one = pack_tree(tmp_path / "one", {"a": b"one"})
    assert call(first, "PUT", path, one).status == 201
    for _ in range(2):  # the second answer comes from the bytes kept
        assert call(first, "GET", path).body == one
    with open(first.storage.artifact_path(KEY), "rb"):  # held open: the new file gets another inode
        assert second.storage.delete("polykit", KEY)
        assert call(first, "GET", path).status == 404
        two = pack_tree(tmp_path / "two", {"a": b"two"})
        assert call(second, "PUT", path, two).status == 201
    got = call(first, "GET", path)
    assert got.body == two and got.headers["x-artifact-hash"] == call(second, "HEAD", path).headers["x-artifact-hash"]


def test_the_storage_keeps_a_bounded_number_of_copies(tmp_path):
    app = new_app(tmp_path / "store")
    assert app.storage._info._limit == INFO_CACHE_SIZE
    app.storage._info = IdentityCache(3)
    for i in range(5):
        assert call(app, "PUT", f"/kv/gradle/k{i}", b"x" * i).status == 201
    for _ in range(2):
        for i in range(5):
            reply = call(app, "GET", f"/kv/gradle/k{i}")
            assert reply.status == 200 and reply.body == b"x" * i
            assert len(app.storage._info) <= 3


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_turbo_entry_deleted_and_stored_again_by_another_worker_is_answered_anew(tmp_path, method):
    first, second = new_app(tmp_path / "store"), new_app(tmp_path / "store")
    path = "/v8/artifacts/abc123?team=t"
    first.storage._clock = lambda: time.time_ns() + SETTLE_NS + 1  # entries read once settled
    body = os.urandom(4096)
    assert call(first, "PUT", path, body, headers={"x-artifact-duration": "7", "x-artifact-tag": "one"}).status == 202
    for _ in range(2):  # the second answer comes from the copy
        reply = call(first, method, path)
        assert reply.status == 200 and reply.headers["x-artifact-duration"] == "7"
        assert reply.headers["x-artifact-tag"] == "one"
    # The deleted file is held open, so the new one cannot take its inode number: of the same
    # size, only the file's identity tells the two entries apart.
    with open(first.storage.stat("turbo", "t/abc123").path, "rb"):
        assert second.storage.delete("turbo", "t/abc123")
        assert call(first, method, path).status == 404
        again = os.urandom(4096)
        assert call(second, "PUT", path, again, headers={"x-artifact-duration": "9", "x-artifact-tag": "two"}).status == 202
    reply = call(first, method, path)
    assert reply.status == 200 and reply.headers["x-artifact-duration"] == "9" and reply.headers["x-artifact-tag"] == "two"
    assert reply.headers["content-length"] == "4096"
    if method == "GET":
        assert reply.body == again


def test_a_replaced_action_cache_entry_is_never_answered_from_the_copy(tmp_path):
    first, second = new_app(tmp_path / "store"), new_app(tmp_path / "store")
    path = f"/ac/{key_for('action')}"
    assert call(first, "PUT", path, b"first result").status == 200
    assert call(first, "GET", path).body == b"first result"
    assert call(first, "HEAD", path).headers["content-length"] == "12"
    assert call(second, "PUT", path, b"second result, longer").status == 200
    assert call(first, "HEAD", path).headers["content-length"] == "21"
    assert call(first, "GET", path).body == b"second result, longer"
    assert call(second, "PUT", path, b"third result, longerr").status == 200  # the same size
    assert call(first, "GET", path).body == b"third result, longerr"


def test_a_namespaced_artifact_stored_again_after_eviction_has_its_new_metadata(tmp_path):
    first, second = new_app(tmp_path / "store"), new_app(tmp_path / "store")
    path = f"/team-a/v1/artifacts/{KEY}"
    one = pack_tree(tmp_path / "one", {"a": b"one"})
    assert call(first, "PUT", path, one).status == 201
    assert call(first, "HEAD", path).headers["x-artifact-hash"] == call(first, "GET", path).headers["etag"].strip('"')
    assert second.storage.delete("polykit", f"@team-a/{KEY}")
    assert call(first, "GET", path).status == 404
    two = pack_tree(tmp_path / "two", {"a": b"two, longer"})
    assert call(second, "PUT", path, two).status == 201
    got = call(first, "GET", path)
    assert got.body == two and got.headers["content-length"] == str(len(two))
    assert call(first, "HEAD", path).headers["x-artifact-hash"] == got.headers["x-artifact-hash"]


def test_the_paths_kept_per_blob_name_stay_small_whatever_names_a_peer_asks_for(tmp_path):
    app = new_app(tmp_path / "store")
    long_name = "/".join(["p" * 255] * 7)  # near the longest path a request may name (2 KiB)
    assert call(app, "PUT", f"/kv/gradle/{long_name}", b"long").status == 201
    for i in range(50):  # a flood of distinct long names, every one a miss
        assert call(app, "HEAD", f"/kv/gradle/{i:03d}{long_name[3:]}").status == 404
    for _ in range(2):
        assert call(app, "GET", f"/kv/gradle/{long_name}").body == b"long"
        assert call(app, "GET", f"/ac/{key_for('short')}").status == 404
    kept = app.storage._paths
    assert ("bazel-ac", key_for("short")) in kept  # a digest's path is kept
    assert sum(len(name) + sum(map(len, paths)) for (_, name), paths in kept.items()) < 1024


class _ReplacedAfterStat:
    """The ``os`` module as the storage sees it when another worker replaces an entry just after
    this worker's ``stat`` of it (once): the interleaving a real race takes by chance."""

    def __init__(self, path: str, replace) -> None:
        self.entry, self.replace = path, replace

    def stat(self, path, *args, **kwargs):
        st = os.stat(path, *args, **kwargs)
        if path == self.entry and self.replace is not None:
            replace, self.replace = self.replace, None
            replace()
        return st

    def __getattr__(self, name: str):
        return getattr(os, name)


def test_kept_bytes_are_answered_with_the_metadata_of_their_own_file_only(tmp_path, monkeypatch):
    """The metadata read for kept bytes must be that very file's: a turbo entry's tag signs its
    body, and the one of a replacement read by path beside the old bytes fails the client's check."""
    first, second = new_app(tmp_path / "store"), new_app(tmp_path / "store")
    first.storage._clock = lambda: time.time_ns() + SETTLE_NS + 1  # entries read once settled
    path = "/v8/artifacts/abc123?team=t"
    one, two = b"1" * 4096, b"2" * 4096
    assert call(first, "PUT", path, one, headers={"x-artifact-tag": "signs-one"}).status == 202
    for _ in range(2):
        assert call(first, "GET", path).headers["x-artifact-tag"] == "signs-one"
    first.storage._info.clear()  # its metadata copy pushed out by others' (its bytes still kept)
    entry = first.storage.stat("turbo", "t/abc123").path
    first.storage._info.clear()

    def replace():  # evicted (or deleted) and uploaded anew, by another worker
        assert second.storage.delete("turbo", "t/abc123")
        assert call(second, "PUT", path, two, headers={"x-artifact-tag": "signs-two"}).status == 202

    monkeypatch.setattr(storage_module, "os", _ReplacedAfterStat(entry, replace))
    reply = call(first, "GET", path)
    assert (reply.body, reply.headers["x-artifact-tag"]) in ((one, "signs-one"), (two, "signs-two"))
