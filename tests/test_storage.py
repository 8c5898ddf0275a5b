"""Storage recovery after crashes, and the offline ``verify`` command."""

import json
import subprocess
import sys

from polykit_cache.storage import Storage
from support import KEY, OTHER_KEY, call, key_for, new_app, pack_tree, sha


def test_recover_removes_temporaries_and_repairs_half_published_artifacts(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    blob = pack_tree(tmp_path, {"a": b"x"})
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", blob).status == 201
    (store / "tmp" / "upload-stale.part").write_bytes(b"half an upload")
    path = app.storage.artifact_path(KEY)
    path.with_suffix(".json").unlink()  # a crash between the link and the metadata write
    orphan = app.storage.artifact_path(OTHER_KEY).with_suffix(".json")
    orphan.parent.mkdir(parents=True)
    orphan.write_text("{}")  # metadata without its artifact

    storage = Storage(store)
    storage.recover()
    assert not any((store / "tmp").iterdir())
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == sha(blob)
    assert not orphan.exists()
    assert storage.totals() == (1, len(blob), 0)


def test_verify_quarantines_corrupt_artifacts(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    good, bad = key_for("good"), key_for("bad")
    for key in (good, bad):
        assert call(app, "PUT", f"/v1/artifacts/{key}", pack_tree(tmp_path, {"a": b"x" * 1000}, key=key)).status == 201
    cmd = [sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "verified 2 artifacts: 2 good, 0 quarantined" in out.stdout

    path = app.storage.artifact_path(bad)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit on disk
    path.write_bytes(bytes(data))
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1
    assert "1 quarantined" in out.stdout and bad in out.stderr
    assert (store / "quarantine" / f"{bad}.zst").exists() and not path.exists()
    assert app.storage.lookup(good) is not None
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def test_verify_rebuilds_lost_metadata_instead_of_quarantining(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    blob = pack_tree(tmp_path, {"a": b"x"})
    call(app, "PUT", f"/v1/artifacts/{KEY}", blob)
    app.storage.artifact_path(KEY).with_suffix(".json").unlink()
    out = subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "1 good" in out.stdout
    assert json.loads(app.storage.artifact_path(KEY).with_suffix(".json").read_text())["sha256"] == sha(blob)


def test_a_second_server_on_the_same_storage_is_refused(tmp_path):
    from support import ServerProcess

    first = ServerProcess(tmp_path / "store", tmp_path / "first.log")
    try:
        out = subprocess.run([sys.executable, "-m", "polykit_cache", "--port", "0", "--storage-dir", str(tmp_path / "store")],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "another polykit-cache is serving" in out.stderr
    finally:
        first.stop()


def test_an_artifact_quarantined_beside_a_live_server_can_be_uploaded_again(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    blob = pack_tree(tmp_path, {"a": b"x" * 100})
    path = f"/v1/artifacts/{KEY}"
    assert call(app, "PUT", path, blob).status == 201
    assert call(app, "HEAD", path).status == 200  # its metadata is now cached in memory
    data = bytearray(app.storage.artifact_path(KEY).read_bytes())
    data[len(data) // 2] ^= 0xFF
    app.storage.artifact_path(KEY).write_bytes(bytes(data))
    out = subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert call(app, "HEAD", path).status == 404
    assert app.storage.usage()[:2] == (0, 0)  # forgotten, though its files left together
    assert call(app, "PUT", path, blob).status == 201
    assert call(app, "GET", path).body == blob


def test_verify_checks_other_blobs_against_their_recorded_sha256(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    assert call(app, "PUT", "/kv/ccache/ab/good", b"good entry").status == 201
    assert call(app, "PUT", "/kv/ccache/ab/bad", b"bad entry").status == 201
    path = app.storage.stat("kv", "ccache/ab/bad").path
    with open(path, "r+b") as fh:
        fh.write(b"B")  # one byte changed on disk
    out = subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "verified 2 other blobs: 1 good, 1 quarantined" in out.stdout
    assert call(app, "GET", "/kv/ccache/ab/bad").status == 404
    assert call(app, "GET", "/kv/ccache/ab/good").body == b"good entry"
