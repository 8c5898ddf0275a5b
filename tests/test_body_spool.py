"""An admitted upload's body written once, into the store's temporary, on a real waitress server.

Bodies waitress would spool to a file (with a Content-Length over what it keeps in memory) are
written as they arrive into the disk store's staged upload, hashed on the way in, verified there
and linked; nothing else is. Uploads in progress are named files in ``tmp/`` here
(``unnamed_temps`` off), so what a request leaves behind can be seen. Every socket has a timeout,
every wait a bound; nothing asserts on durations.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time

from polykit_cache import store as store_module
from support import KEY, OTHER_KEY, craft, pack_tree, request, thread_server

MIB = 1 << 20
TOKEN = "writer-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings(tmp_path) -> dict:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read-write {TOKEN}\n")
    return {"token_file": tokens, "storage_options": {"unnamed_temps": False}}


def count_calls(monkeypatch, app) -> dict[str, int]:
    """How often the store was asked for a body's file (spool) and for a copy (stage)."""
    calls = {"spool": 0, "stage": 0}
    for name in calls:
        method = getattr(app.storage, name)

        def counted(method=method, name=name):
            calls[name] += 1
            return method()

        monkeypatch.setattr(app.storage, name, counted)
    return calls


def temporaries(store) -> list[str]:
    return sorted(os.listdir(store / "tmp"))


def wait_until_empty(folder) -> list[str]:
    """What is left in ``folder`` once the server has had a bounded while to clean up."""
    for _ in range(400):
        left = sorted(os.listdir(folder))
        if not left:
            return left
        time.sleep(0.05)
    return left


def test_a_big_upload_is_written_once_into_the_store_and_served_whole(tmp_path, monkeypatch):
    # waitress's own spool folder is missing: a body spooled there would be a 500.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-spool"))
    blob = pack_tree(tmp_path, {"big.bin": os.urandom(3 * MIB)})
    turbo_blob = os.urandom(2 * MIB)
    with thread_server(tmp_path / "store", **settings(tmp_path)) as (port, app):
        calls = count_calls(monkeypatch, app)
        status, _, answer = request(port, "PUT", f"/v1/artifacts/{KEY}", blob, AUTH)
        assert status == 201, answer
        assert json.loads(answer) == {"key": KEY, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        assert request(port, "PUT", "/v8/artifacts/abc123?teamId=t", turbo_blob, AUTH)[0] == 202
        assert calls == {"spool": 2, "stage": 0}  # no second copy
        status, headers, body = request(port, "GET", f"/v1/artifacts/{KEY}", headers=AUTH)
        assert status == 200 and body == blob and headers["x-artifact-hash"] == hashlib.sha256(blob).hexdigest()
        assert request(port, "GET", "/v8/artifacts/abc123?teamId=t", headers=AUTH)[2] == turbo_blob
        assert temporaries(tmp_path / "store") == []


def test_small_and_chunked_bodies_keep_the_copy_path(tmp_path, monkeypatch):
    with thread_server(tmp_path / "store", **settings(tmp_path)) as (port, app):
        calls = count_calls(monkeypatch, app)
        small = pack_tree(tmp_path, {"a.txt": b"small"})
        assert request(port, "PUT", f"/v1/artifacts/{KEY}", small, AUTH)[0] == 201
        assert calls == {"spool": 0, "stage": 1}  # kept in memory by waitress, then staged
        chunked = os.urandom(MIB)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"PUT /kv/gradle/chunked HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {TOKEN}\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            sock.sendall(b"%x\r\n" % len(chunked) + chunked + b"\r\n0\r\n\r\n")
            assert sock.recv(100).split(b"\r\n")[0] in (b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created")
        assert calls == {"spool": 0, "stage": 2}  # its length is known only once waitress has it all
        assert request(port, "GET", "/kv/gradle/chunked", headers=AUTH)[2] == chunked


def test_refused_invalid_or_losing_uploads_leave_nothing_in_the_store(tmp_path, monkeypatch):
    store = tmp_path / "store"
    good = pack_tree(tmp_path, {"big.bin": os.urandom(2 * MIB)})
    with thread_server(store, **settings(tmp_path)) as (port, app):
        calls = count_calls(monkeypatch, app)
        # Without a token: refused on its head, never written anywhere.
        assert request(port, "PUT", f"/v1/artifacts/{KEY}", good)[0] == 401
        assert calls["spool"] == 0
        # Invalid artifacts: written into the store's file, refused, the file removed.
        bad = craft({"big.bin": os.urandom(2 * MIB)}, key=OTHER_KEY)  # its manifest names another key
        status, _, answer = request(port, "PUT", f"/v1/artifacts/{KEY}", bad, AUTH)
        assert status == 422 and json.loads(answer)["reason"] == "key_mismatch"
        status, _, answer = request(port, "PUT", f"/v1/artifacts/{KEY}", good, {**AUTH, "X-Artifact-Hash": "0" * 64})
        assert status == 422 and json.loads(answer)["reason"] == "body_hash_mismatch"
        # A content-addressed blob whose bytes are not its name.
        assert request(port, "PUT", "/cas/" + "0" * 64, os.urandom(MIB), AUTH)[0] == 400
        assert calls["spool"] == 3 and temporaries(store) == []
        # Stored, then a second upload of the key: the first write wins, the loser's file goes.
        assert request(port, "PUT", f"/v1/artifacts/{KEY}", good, AUTH)[0] == 201
        assert request(port, "PUT", f"/v1/artifacts/{KEY}", good, AUTH)[0] == 409
        assert wait_until_empty(store / "tmp") == []  # removed as the request ends, after its answer
        assert request(port, "GET", f"/v1/artifacts/{KEY}", headers=AUTH)[2] == good


def test_a_body_cut_off_leaves_nothing_in_the_store(tmp_path):
    store = tmp_path / "store"
    with thread_server(store, **settings(tmp_path)) as (port, app):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"PUT /v1/artifacts/{KEY} HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {4 * MIB}\r\n\r\n".encode())
            sock.sendall(b"\0" * MIB)
            for _ in range(400):  # the body is being written into the store's file
                if temporaries(store):
                    break
                time.sleep(0.05)
            assert temporaries(store)
        assert wait_until_empty(store / "tmp") == []
        assert app.storage.lookup(KEY) is None
        assert request(port, "GET", "/healthz")[0] == 200


def test_a_full_storage_disk_while_a_body_arrives_is_a_json_507(tmp_path, small_tmpfs):
    """The store's file cannot grow: the connection layer answers 507 and frees the file at once."""
    with thread_server(small_tmpfs, **settings(tmp_path)) as (port, app):
        free_before = os.statvfs(small_tmpfs).f_bfree
        status, _, body = request(port, "PUT", f"/v1/artifacts/{KEY}", b"\0" * (3 * MIB), AUTH)
        assert status == 507 and json.loads(body)["error"] == "storage_full"
        assert app.metrics.requests[("polykit", "PUT", 507)] == 1
        assert temporaries(small_tmpfs) == []
        assert os.statvfs(small_tmpfs).f_bfree == free_before
        assert request(port, "GET", "/healthz")[0] == 200


def test_writeback_starts_while_the_body_arrives(tmp_path, monkeypatch):
    """Each WRITEBACK_STEP of a body starts its disk write as it comes, so the sync before the
    answer waits for the tail only (the durability order itself is tested in test_storage)."""
    starts = []
    original = store_module.Staged._start_writeback

    def recorded(self):
        starts.append(self.size)
        original(self)

    monkeypatch.setattr(store_module.Staged, "_start_writeback", recorded)
    monkeypatch.setattr(store_module, "WRITEBACK_STEP", MIB)
    blob = os.urandom(3 * MIB + 1000)
    with thread_server(tmp_path / "store", **settings(tmp_path)) as (port, app):
        assert request(port, "PUT", "/v8/artifacts/big1?teamId=t", blob, AUTH)[0] == 202
    assert len(starts) >= 2 and all(later - earlier >= MIB for earlier, later in zip([0, *starts], starts))
