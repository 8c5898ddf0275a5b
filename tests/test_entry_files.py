"""One file per entry on disk: its metadata attribute, the file beside it where an attribute is
refused, storage folders of earlier versions, and when an upload is made durable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import threading

import pytest

from polykit_cache.entryfile import META_ATTR, EntryStaged, read_meta
from polykit_cache.storage import Storage, blob_id
from support import KEY, call, key_for, new_app, pack_tree, sha

ART = f"/v1/artifacts/{KEY}"
LAYOUTS = {"attribute": {}, "file beside": {"setxattr": None, "unnamed_temps": False}}


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_upload_is_synced_before_its_name_appears_and_its_name_before_the_answer(tmp_path, layout):
    """Each sync records what it syncs and whether the entry was visible then."""
    blob = pack_tree(tmp_path, {"a": b"x"})
    store = tmp_path / "store"
    final = store / KEY[:2] / KEY[2:4] / f"{KEY}.zst"
    syncs = []

    def fsync(fd: int) -> None:
        syncs.append(("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file", final.exists()))
        os.fsync(fd)

    app = new_app(store, {**LAYOUTS[layout], "fsync": fsync})
    assert call(app, "PUT", ART, blob).status == 201
    # The bytes (and a metadata file, where there is one) before the name; the folder after it.
    files = 1 if layout == "attribute" else 2
    assert syncs == [("file", False)] * files + [("folder", True)]
    assert call(app, "GET", ART).body == blob
    assert not any((store / "tmp").iterdir())  # a named temporary is removed once linked


def test_a_failed_sync_refuses_the_upload_and_leaves_nothing(tmp_path):
    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    blob = pack_tree(tmp_path, {"a": b"x"})
    store = tmp_path / "store"
    app = new_app(store, {"fsync": full_disk})
    reply = call(app, "PUT", ART, blob)
    assert reply.status == 507 and reply.json()["error"] == "storage_full"
    assert not list(store.rglob("*.zst")) and not any((store / "tmp").iterdir())
    assert call(app, "HEAD", ART).status == 404


def test_metadata_goes_beside_the_entry_where_the_filesystem_refuses_attributes(tmp_path):
    calls = []

    def unsupported(target, name, value):
        calls.append(name)
        raise OSError(errno.ENOTSUP, "Operation not supported")

    app = new_app(tmp_path / "store", {"setxattr": unsupported})
    keys = [key_for(f"f{i}") for i in range(2)]
    for key in keys:
        blob = pack_tree(tmp_path, {"a": key.encode()}, key=key)
        assert call(app, "PUT", f"/v1/artifacts/{key}", blob).status == 201
        path = app.storage.artifact_path(key)
        assert json.loads(path.with_suffix(".json").read_text())["sha256"] == sha(blob)
        assert call(app, "GET", f"/v1/artifacts/{key}").headers["x-artifact-hash"] == sha(blob)
    assert call(app, "PUT", "/kv/ccache/ab/c", b"blob").status == 201
    assert call(app, "GET", "/kv/ccache/ab/c").body == b"blob"
    assert len(calls) == 1  # a filesystem without attributes is not asked again
    assert not any((app.storage.root / "tmp").iterdir())


def test_metadata_too_large_for_an_attribute_goes_beside_that_entry_alone(tmp_path):
    """ext4 keeps a file's attributes in its inode or one block: a large turbo tag may not fit."""

    def small_only(target, name, value):
        if len(value) > 300:
            raise OSError(errno.E2BIG, "Argument list too long")
        os.setxattr(target, name, value)

    app = new_app(tmp_path / "store", {"setxattr": small_only})
    tag = "t" * 1000
    assert call(app, "PUT", "/v8/artifacts/big?team=t", b"x", headers={"x-artifact-tag": tag}).status == 202
    assert call(app, "PUT", "/v8/artifacts/small?team=t", b"y", headers={"x-artifact-tag": "s"}).status == 202
    assert call(app, "GET", "/v8/artifacts/big?team=t").headers["x-artifact-tag"] == tag
    assert call(app, "GET", "/v8/artifacts/small?team=t").headers["x-artifact-tag"] == "s"
    sidecars = [f for f in files_under(app.storage.root / "objects") if f.endswith(".json")]
    assert len(sidecars) == 1  # the large one's; the small one's is its attribute


def test_a_storage_folder_of_an_earlier_version_is_served_counted_and_evicted(tmp_path):
    """Entries written by hand the way earlier versions did: a file, and its metadata in a
    ``.json`` beside it (artifacts under their key, blobs under the hash of their name)."""
    store = tmp_path / "store"
    old_key = key_for("old")
    old = pack_tree(tmp_path, {"a": b"old"}, key=old_key)
    path = store / old_key[:2] / old_key[2:4] / f"{old_key}.zst"
    path.parent.mkdir(parents=True)
    path.write_bytes(old)
    path.with_suffix(".json").write_text(json.dumps({"size": len(old), "sha256": sha(old), "created": 1.0}))
    name = "kv/ccache/ab/old"
    blob_path = store / "objects" / blob_id(name)
    blob_path.parent.mkdir(parents=True)
    blob_path.write_bytes(b"old blob")
    (store / "objects" / (blob_id(name) + ".json")).write_text(json.dumps(
        {"name": name, "sha256": hashlib.sha256(b"old blob").hexdigest(), "created": 1.0}))

    app = new_app(store)
    reply = call(app, "GET", f"/v1/artifacts/{old_key}")
    assert reply.status == 200 and reply.body == old and reply.headers["x-artifact-hash"] == sha(old)
    assert call(app, "GET", "/kv/ccache/ab/old").body == b"old blob"
    count, size, _ = app.storage.totals()
    assert count == 2 and size == len(old) + len(b"old blob")
    new = pack_tree(tmp_path, {"a": b"new"})
    assert call(app, "PUT", ART, new).status == 201
    assert read_meta(str(app.storage.artifact_path(KEY)), "/nonexistent")["sha256"] == sha(new)  # the attribute
    assert call(app, "PUT", f"/v1/artifacts/{old_key}", old).status == 409  # still first write wins

    assert len(app.storage.evict(limit=0)) == 3
    assert not [f for f in files_under(store) if f.endswith((".zst", ".json")) or f.startswith("objects/")]


def test_a_blob_replaced_in_the_action_cache_carries_its_own_metadata(tmp_path):
    app = new_app(tmp_path / "store")
    digest = "1" * 64
    for body in (b"first result", b"second result"):
        assert call(app, "PUT", f"/ac/{digest}", body).status in (200, 201)
        assert call(app, "GET", f"/ac/{digest}").body == body
    stat_ = app.storage.stat("bazel-ac", digest)
    assert stat_.sha256 == hashlib.sha256(b"second result").hexdigest()
    assert not any((app.storage.root / "tmp").iterdir())


def test_the_attribute_is_the_metadata_of_the_file_it_is_on(tmp_path):
    app = new_app(tmp_path / "store")
    blob = pack_tree(tmp_path, {"a": b"x"})
    assert call(app, "PUT", ART, blob).status == 201
    meta = json.loads(os.getxattr(app.storage.artifact_path(KEY), META_ATTR))
    assert meta == {"size": len(blob), "sha256": sha(blob), "created": meta["created"]}


class WatchedLock:
    """A store's layout lock, telling ``waiting`` whenever a thread asks for it once ``armed`` is set."""

    def __init__(self, inner, armed: threading.Event, waiting: threading.Event) -> None:
        self._inner = inner
        self._armed, self._waiting = armed, waiting

    def __enter__(self) -> None:
        if self._armed.is_set():
            self._waiting.set()
        self._inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


def stored(store: Storage, space: str, name: str, data: bytes) -> bool:
    staged = store.stage()
    staged.write(data)
    staged.finish()
    return store.commit(space, name, staged)


@pytest.mark.parametrize("read", ["open", "stat"])
@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_a_reader_never_pairs_a_replaced_blob_with_the_metadata_of_another(tmp_path, monkeypatch, read, mode):
    """Without attributes, a replace in Bazel's action cache renames the new metadata file in,
    then the new blob. A reader in between gets one whole version, not the old blob with the
    new blob's size and SHA-256: in another thread, or in another worker process's store (its
    layout lock is a lock on a file, held by the writer's store meanwhile)."""
    root = tmp_path / "store"
    writer_store = Storage(root, setxattr=None)
    writer_store.recover()
    reader_store = writer_store
    if mode == "workers":
        writer_store.publish_index(tmp_path / "state.sqlite3")
        reader_store = Storage(root, setxattr=None)
        for store in (writer_store, reader_store):
            store.share(tmp_path / "state.sqlite3")
    digest = "1" * 64
    old, new = b"first result", b"second result"  # the same size: only the pairing tells them apart
    assert stored(writer_store, "bazel-ac", digest, old)

    between, progress, go = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(reader_store, "_layout_lock", WatchedLock(reader_store._layout_lock, between, progress))
    real_replace = EntryStaged.replace

    def paused_replace(self, final):  # the writer holds the layout lock here
        between.set()
        go.wait()
        real_replace(self, final)

    monkeypatch.setattr(EntryStaged, "replace", paused_replace)
    answers = []
    writer = threading.Thread(target=lambda: answers.append(stored(writer_store, "bazel-ac", digest, new)))
    writer.start()
    between.wait()
    seen = {}

    def reader():
        try:
            if read == "open":
                found, fh = reader_store.open("bazel-ac", digest)
            else:
                found = reader_store.stat("bazel-ac", digest)
                fh = open(found.path, "rb")
            with fh:
                seen["pair"] = (found.sha256, found.size, hashlib.sha256(fh.read()).hexdigest())
        finally:
            progress.set()

    thread = threading.Thread(target=reader)
    thread.start()
    progress.wait()  # the reader is done, or waits for the layout lock the writer holds
    go.set()
    thread.join()
    writer.join()
    assert answers == [True]
    claimed, size, actual = seen["pair"]
    assert claimed == actual == sha(new) and size == len(new)


def test_metadata_beside_entries_of_a_copied_folder_is_taken_and_renamed_to_the_new_files(tmp_path):
    """A copy (backup, move to a new disk) gives every file a new inode number: the metadata
    files still belong to their entries, and are rewritten to name the new files."""
    app = new_app(tmp_path / "store", {"setxattr": None})
    blob = pack_tree(tmp_path, {"a": b"x"})
    assert call(app, "PUT", ART, blob).status == 201
    assert call(app, "PUT", "/kv/ccache/ab/c", b"blob").status == 201
    shutil.copytree(tmp_path / "store", tmp_path / "copy", ignore=shutil.ignore_patterns("lock", "layout.lock"))
    copy = new_app(tmp_path / "copy", {"setxattr": None})
    assert call(copy, "GET", ART).headers["x-artifact-hash"] == sha(blob)
    got = call(copy, "GET", "/kv/ccache/ab/c")
    assert got.body == b"blob"
    entry = copy.storage.artifact_path(KEY)
    assert json.loads(entry.with_suffix(".json").read_text())["inode"] == entry.stat().st_ino
    assert copy.storage.stat("kv", "ccache/ab/c").sha256 == sha(b"blob")
