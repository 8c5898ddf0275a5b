"""The disk store's index, in memory and in the workers' shared database: one contract."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from polykit_cache.lru import MAX_PENDING_USES, PERSIST_USE_NS, MemoryIndex, SharedIndex
from support import KEY, OTHER_KEY, ROOT, sha


def cost(size: int) -> int:
    return size + 10


@pytest.fixture(params=["memory", "shared"])
def index(request, tmp_path):
    if request.param == "memory":
        return MemoryIndex(cost)
    return SharedIndex(tmp_path / "state.sqlite3", cost)


def test_totals_follow_adds_replacements_and_removals(index):
    index.load([("a", 1, 100), ("b", 2, 200)])
    assert index.totals() == (2, 300, 0) and index.total_cost() == 320
    index.add("c", 50, 3)
    index.add("a", 10, 4)  # replaced (an action-cache entry)
    assert index.totals() == (3, 260, 0) and index.total_cost() == 290
    assert index.remove("b") and not index.remove("b")
    assert index.totals() == (2, 60, 0) and index.contains("a") and not index.contains("b")
    assert index.use_range() == (3, 4)


def test_eviction_takes_the_least_recently_used_until_within_the_bound(index):
    index.load([("a", 1, 100), ("b", 2, 100), ("c", 3, 100)])
    index.touch("missing", 9)  # nothing to order
    index.touch("a", 10)  # now b is the oldest, then c
    assert index.take_victims(330) == []
    assert index.take_victims(219) == [("b", 100), ("c", 100)]
    assert index.totals() == (1, 100, 2) and index.total_cost() == 110


def test_a_workers_uses_are_written_in_one_batch_and_its_own_evictions_count_them(tmp_path):
    path = tmp_path / "state.sqlite3"
    one, other = SharedIndex(path, cost), SharedIndex(path, cost)
    one.load([("a", 0, 1), ("b", 0, 1), ("c", 0, 1)])
    one.touch("a", 10)
    one.touch("a", 20)
    assert other.use_range() == (0, 0)  # gathered, not yet written
    one.flush()
    assert other.use_range() == (0, 20)  # one write, the latest use
    other.touch("b", 15)
    one.touch("c", 30)
    # The evicting worker's own uses count before it chooses: c stays; b's use was not written yet.
    assert one.take_victims(2 * 11) == [("b", 1)]
    other.flush()  # a late batch changes nothing it must not: b is gone, a use is never moved back
    one.touch("a", 5)
    one.flush()
    assert one.use_range() == (20, 30) and one.totals() == (2, 2, 1)


def test_the_uses_a_worker_gathers_are_bounded(tmp_path):
    path = tmp_path / "state.sqlite3"
    one, other = SharedIndex(path, cost), SharedIndex(path, cost)
    one.load([(f"k{n}", 0, 1) for n in range(MAX_PENDING_USES)])
    for n in range(MAX_PENDING_USES - 1):
        one.touch(f"k{n}", 1 + n)
    assert other.use_range() == (0, 0)
    one.touch(f"k{MAX_PENDING_USES - 1}", MAX_PENDING_USES)  # the last one the memory holds: all written
    assert other.use_range() == (1, MAX_PENDING_USES)


def test_a_use_is_written_to_the_files_mtime_when_that_is_older_than_a_minute(tmp_path):
    from polykit_cache.storage import Storage

    storage = Storage(tmp_path / "store")
    storage.recover()
    staged = storage.stage()
    staged.write(b"x" * 10)
    staged.finish()
    assert storage.commit("polykit", KEY, staged)
    path = storage.artifact_path(KEY)
    recent = time.time_ns() - PERSIST_USE_NS // 2
    os.utime(path, ns=(recent, recent))
    assert storage.stat("polykit", KEY, use=True) is not None
    assert path.stat().st_mtime_ns == recent  # used within the minute: no write
    old = time.time_ns() - 2 * PERSIST_USE_NS
    os.utime(path, ns=(old, old))
    before = time.time_ns()
    assert storage.open("polykit", KEY)[1].close() is None
    assert path.stat().st_mtime_ns >= before  # the use survives a restart


WORKER = """
import sys
from polykit_cache.lru import SharedIndex
index = SharedIndex(sys.argv[1], lambda size: size + 10)
start = int(sys.argv[2])
for n in range(start, start + 50):
    index.add(f"k{n}", 10, n)
    index.take_victims(20 * 20)
"""


def test_workers_share_one_bound_and_one_order(tmp_path):
    path = tmp_path / "state.sqlite3"
    SharedIndex(path, cost).load([])
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(start)], cwd=ROOT) for start in (0, 1000)]
    for p in procs:
        assert p.wait(60) == 0
    index = SharedIndex(path, cost)
    count, size, evictions = index.totals()
    assert index.total_cost() <= 400 and count == 20 and size == 200 and evictions == 80
    # What is left is the most recently used of both workers' entries.
    low, _ = index.use_range()
    assert all(index.contains(f"k{n}") for n in range(1040, 1050))
    assert not index.contains("k0") and low >= 30


def test_workers_never_answer_from_metadata_another_worker_made_stale(tmp_path):
    """A key evicted by one worker and stored anew by another with other bytes: a third sees the new ones."""
    from polykit_cache.storage import Storage, disk_cost

    def put(storage: Storage, key: str, data: bytes) -> bool:
        staged = storage.stage()
        staged.write(data)
        staged.finish()
        return storage.commit("polykit", key, staged)

    root, state = tmp_path / "store", tmp_path / "state.sqlite3"
    first = Storage(root, max_storage=disk_cost(100))
    first.recover()
    first.publish_index(state)
    reader, evicting, writing = (Storage(root, max_storage=disk_cost(100)) for _ in range(3))
    for worker in (reader, evicting, writing):
        worker.share(state)
    assert put(writing, KEY, b"a" * 10)
    assert reader.stat("polykit", KEY).sha256 == sha(b"a" * 10)
    assert put(evicting, OTHER_KEY, b"o" * 100)  # one entry fits: the first one is evicted (the reader never looks)
    assert put(writing, KEY, b"b" * 20)  # stored anew, with other bytes
    found, fh = reader.open("polykit", KEY)
    with fh:
        assert found.sha256 == sha(b"b" * 20) and found.size == 20 and fh.read() == b"b" * 20
    assert reader.usage() == (1, 20, 2)
