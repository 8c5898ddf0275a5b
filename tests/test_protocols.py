"""Other build tools' protocols on the same storage: Bazel's HTTP cache and the key-value cache."""

import hashlib
import json
import os

import pytest

from polykit_cache.storage import blob_id, disk_cost
from support import call, key_for, new_app, pack_tree

BLOB = os.urandom(5000)
DIGEST = hashlib.sha256(BLOB).hexdigest()


@pytest.mark.parametrize("prefix", ["", "/main-instance", "/team/project"])
def test_bazel_cas_round_trip_with_an_optional_instance(app, prefix):
    path = f"{prefix}/cas/{DIGEST}"
    assert call(app, "GET", path).status == 404
    put = call(app, "PUT", path, BLOB)
    assert put.status == 200
    get = call(app, "GET", path)
    assert get.status == 200 and get.body == BLOB and get.headers["content-length"] == str(len(BLOB))
    head = call(app, "HEAD", path)
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(len(BLOB))
    assert call(app, "PUT", path, BLOB).status == 200  # again: still 2xx


def test_instances_do_not_see_each_other(app):
    call(app, "PUT", f"/one/cas/{DIGEST}", BLOB)
    assert call(app, "GET", f"/two/cas/{DIGEST}").status == 404
    assert call(app, "GET", f"/cas/{DIGEST}").status == 404


def test_a_cas_upload_whose_hash_differs_is_refused_and_not_stored(app):
    wrong = "0" * 64
    reply = call(app, "PUT", f"/cas/{wrong}", BLOB)
    assert reply.status == 400 and reply.json()["error"] == "hash_mismatch"
    assert call(app, "HEAD", f"/cas/{wrong}").status == 404
    assert not any((app.storage.root / "tmp").iterdir())


def test_action_cache_entries_may_be_replaced(app):
    key = key_for("action")
    assert call(app, "PUT", f"/ac/{key}", b"first result").status == 200
    assert call(app, "PUT", f"/ac/{key}", b"second result").status == 200
    assert call(app, "GET", f"/ac/{key}").body == b"second result"
    assert app.storage.totals()[:2] == (1, len(b"second result"))


@pytest.mark.parametrize("path", [f"/../cas/{DIGEST}", f"/a/../cas/{DIGEST}", f"/.hidden/cas/{DIGEST}"])
def test_bad_instance_names_are_400(app, path):
    assert call(app, "PUT", path, BLOB).status == 400


def test_key_value_cache_first_write_wins_and_2xx_when_it_exists(app):
    path = "/kv/ccache/ab/cdef0123456789"
    assert call(app, "HEAD", path).status == 404
    assert call(app, "PUT", path, b"object one").status == 201
    assert call(app, "PUT", path, b"object two").status == 200
    assert call(app, "GET", path).body == b"object one"
    assert call(app, "HEAD", path).headers["content-length"] == "10"


@pytest.mark.parametrize("path", ["/kv/ns/../x", "/kv/ns/a//b", "/kv/../x", "/kv/ns/a/./b", "/kv/ns/..", "/kv/ns/a b"])
def test_key_value_paths_are_checked(app, path):
    assert call(app, "PUT", path, b"x").status in (400, 404)
    assert not (app.storage.root.parent / "x").exists()


def test_limits_tokens_and_eviction_apply_to_blobs(tmp_path):
    limited = new_app(tmp_path / "s1", max_artifact_size=100)
    reply = call(limited, "PUT", "/kv/gradle/key1", b"x" * 101)
    assert reply.status == 413 and reply.json()["error"] == "too_large"
    bound = 2 * disk_cost(1000) + 500  # two entries of 1,000 bytes, as they cost on disk
    evicting = new_app(tmp_path / "s2", max_storage=bound)
    for i in range(3):
        assert call(evicting, "PUT", f"/kv/gradle/k{i}", os.urandom(1000)).status == 201
    assert [call(evicting, "HEAD", f"/kv/gradle/k{i}").status for i in range(3)] == [404, 200, 200]
    assert evicting.storage.totals()[2] == 1
    restarted = new_app(tmp_path / "s2", max_storage=bound)  # blobs are counted at start-up too
    assert restarted.storage.totals()[:2] == (2, 2000)


def test_a_blob_is_never_served_as_an_artifact_nor_the_other_way_round(app, tmp_path):
    key = key_for("shared-key")
    artifact = pack_tree(tmp_path, {"a": b"x"}, key=key)
    assert call(app, "PUT", f"/v1/artifacts/{key}", artifact).status == 201
    assert call(app, "GET", f"/cas/{key}").status == 404
    assert call(app, "GET", f"/ac/{key}").status == 404
    assert call(app, "PUT", f"/ac/{DIGEST}", b"not an artifact").status == 200
    assert call(app, "GET", f"/v1/artifacts/{DIGEST}").status == 404


def test_read_tokens_cannot_write_blobs(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read reader-token-1\nread-write writer-token-1\n")
    app = new_app(tmp_path / "s", token_file=tokens)
    assert call(app, "PUT", f"/cas/{DIGEST}", BLOB).status == 401
    assert call(app, "PUT", f"/cas/{DIGEST}", BLOB, headers={"Authorization": "Bearer reader-token-1"}).status == 403
    assert call(app, "PUT", f"/cas/{DIGEST}", BLOB, headers={"Authorization": "Bearer writer-token-1"}).status == 200
    assert call(app, "GET", f"/cas/{DIGEST}", headers={"Authorization": "Bearer reader-token-1"}).body == BLOB


def test_turbo_artifacts_by_team_with_duration_and_tag(app):
    path = "/v8/artifacts/0123456789abcdef"
    assert call(app, "GET", "/v8/artifacts/status").json() == {"status": "enabled"}
    assert call(app, "GET", path + "?slug=team-a").status == 404
    put = call(app, "PUT", path + "?slug=team-a", b"turbo tarball",
               headers={"x-artifact-duration": "5120", "x-artifact-tag": "c2lnbmF0dXJl"})
    assert put.status == 202
    got = call(app, "GET", path + "?slug=team-a")
    assert got.body == b"turbo tarball"
    assert got.headers["x-artifact-duration"] == "5120" and got.headers["x-artifact-tag"] == "c2lnbmF0dXJl"
    head = call(app, "HEAD", path + "?teamId=team-a")  # the same team, named as turbo may name it
    assert head.status == 200 and head.headers["x-artifact-duration"] == "5120"
    assert call(app, "GET", path + "?slug=team-b").status == 404
    assert call(app, "PUT", path + "?slug=team-a", b"another").status == 202  # 2xx, first blob kept
    assert call(app, "GET", path + "?slug=team-a").body == b"turbo tarball"
    assert call(app, "POST", "/v8/artifacts/events?slug=team-a", b'[{"event": "HIT"}]').status == 200


def test_turbo_batch_query_and_bad_headers(app):
    call(app, "PUT", "/v8/artifacts/aaaa?team=t", b"1234")
    reply = call(app, "POST", "/v8/artifacts?team=t", b'{"hashes": ["aaaa", "bbbb"]}')
    assert reply.json() == {"aaaa": {"size": 4, "taskDurationMs": 0, "tag": None}, "bbbb": None}
    assert call(app, "POST", "/v8/artifacts?team=t", b"nope").status == 400
    bad = call(app, "PUT", "/v8/artifacts/cccc?team=t", b"x", headers={"x-artifact-duration": "soon"})
    assert bad.status == 400 and bad.json()["error"]["code"] == "bad_request"


def test_turbo_errors_have_turbo_s_shape(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read turbo-reader-1\n")
    app = new_app(tmp_path / "s", token_file=tokens)
    denied = call(app, "GET", "/v8/artifacts/status")
    assert denied.status == 401 and set(denied.json()["error"]) == {"code", "message"}
    forbidden = call(app, "PUT", "/v8/artifacts/abcd", b"x", headers={"Authorization": "Bearer turbo-reader-1"})
    assert forbidden.status == 403 and forbidden.json()["error"]["code"] == "forbidden"


def test_nx_records_are_never_overridden_and_errors_are_plain_text(tmp_path, app):
    assert call(app, "PUT", "/v1/cache/nxhash123", b"nx output").status == 200
    conflict = call(app, "PUT", "/v1/cache/nxhash123", b"other")
    assert conflict.status == 409 and conflict.headers["content-type"].startswith("text/plain")
    assert call(app, "GET", "/v1/cache/nxhash123").body == b"nx output"
    assert call(app, "GET", "/v1/cache/missing1").status == 404
    tokens = tmp_path / "tokens"
    tokens.write_text("read nx-reader-token\n")
    secured = new_app(tmp_path / "s", token_file=tokens)
    denied = call(secured, "GET", "/v1/cache/nxhash123")
    # Nx reads the body of a 401 only when Content-Type is exactly text/plain, no parameters.
    assert denied.status == 401 and denied.headers["content-type"] == "text/plain"
    assert denied.body.decode().startswith("This cache needs a token")
    assert call(secured, "PUT", "/v1/cache/x1", b"x", headers={"Authorization": "Bearer nx-reader-token"}).status == 403


def test_metrics_are_labelled_by_protocol(app):
    call(app, "PUT", f"/cas/{DIGEST}", BLOB)
    call(app, "GET", f"/cas/{DIGEST}")
    call(app, "GET", "/kv/gradle/missing")
    call(app, "GET", "/v8/artifacts/abcd?team=t")
    lines = call(app, "GET", "/metrics").body.decode().splitlines()
    assert 'polykit_cache_requests_total{protocol="bazel",method="PUT",status="200"} 1' in lines
    assert 'polykit_cache_hits_total{protocol="bazel"} 1' in lines
    assert 'polykit_cache_misses_total{protocol="kv"} 1' in lines
    assert 'polykit_cache_misses_total{protocol="turbo"} 1' in lines
    by_protocol = call(app, "GET", "/v1/stats").json()["by_protocol"]
    assert by_protocol["bazel"] == {"requests": 2, "hits": 1, "misses": 0}


def test_verify_rehashes_bazel_cas_blobs(app, tmp_path):
    import subprocess
    import sys

    call(app, "PUT", f"/cas/{DIGEST}", BLOB)
    other = os.urandom(100)
    other_digest = hashlib.sha256(other).hexdigest()
    call(app, "PUT", f"/inst/cas/{other_digest}", other)
    store = app.storage.root
    run = lambda: subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)],
                                 capture_output=True, text=True, timeout=60)
    out = run()
    assert out.returncode == 0 and "verified 2 content-addressed blobs: 2 good" in out.stdout
    blob = store / "objects" / blob_id(f"bazel/_/cas/{DIGEST[:2]}/{DIGEST}")
    blob.write_bytes(b"flipped" + blob.read_bytes()[7:])
    out = run()
    assert out.returncode == 1 and "1 quarantined" in out.stdout
    assert not blob.exists() and call(app, "GET", f"/cas/{DIGEST}").status == 404
    assert app.storage.totals()[:2] == (1, len(other))  # the server's own count follows
    assert call(app, "GET", f"/inst/cas/{other_digest}").body == other


EMPTY = hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("prefix", ["", "/some-instance"])
def test_the_empty_cas_blob_is_always_present(app, prefix):
    get, head = call(app, "GET", f"{prefix}/cas/{EMPTY}"), call(app, "HEAD", f"{prefix}/cas/{EMPTY}")
    assert get.status == head.status == 200 and get.body == head.body == b""
    assert get.headers["content-length"] == "0"
    assert call(app, "GET", f"{prefix}/ac/{EMPTY}").status == 404  # an action result is never implied
    assert call(app, "PUT", f"{prefix}/cas/{EMPTY}", b"").status == 200
    assert app.storage.totals()[0] == 0  # nothing to keep for it
    assert call(app, "PUT", f"{prefix}/cas/{EMPTY}", b"x").status == 400  # its hash is still checked


def test_names_that_are_folders_of_other_names_are_all_stored(app):
    assert call(app, "PUT", "/kv/ns/f", b"file").status == 201
    assert call(app, "PUT", "/kv/ns/f/g", b"under it").status == 201
    assert call(app, "PUT", "/kv/ns/d/e", b"deeper").status == 201
    assert call(app, "PUT", "/kv/ns/d", b"above it").status == 201
    for path, body in (("/kv/ns/f", b"file"), ("/kv/ns/f/g", b"under it"), ("/kv/ns/d/e", b"deeper"), ("/kv/ns/d", b"above it")):
        assert call(app, "GET", path).body == body
    h = hashlib.sha256(b"cas").hexdigest()
    z = hashlib.sha256(b"z").hexdigest()
    # A namespace's parts are never a protocol's root: the leftmost root decides the protocol.
    assert call(app, "PUT", f"/i/cas/{h[:2]}/{h}/cas/{z}", b"z").status == 404
    assert call(app, "PUT", f"/i/cas/{h}", b"cas").status == 200
    assert call(app, "GET", f"/i/cas/{h}").body == b"cas"
    assert call(app, "PUT", f"/j/ac/{h[:2]}/{h}/ac/{'2' * 64}", b"z").status == 404
    assert call(app, "PUT", f"/j/ac/{h}", b"ac").status == 200 and call(app, "GET", f"/j/ac/{h}").body == b"ac"


def test_deep_names_are_refused_clearly_and_never_make_folders(app):
    deep = call(app, "PUT", "/kv/deep/" + "/".join(["d"] * 40), b"x")
    assert deep.status == 400 and "at most 32 parts" in deep.json()["message"]
    assert call(app, "PUT", "/kv/deep/" + "/".join(["d"] * 1100), b"x").status == 414
    assert call(app, "PUT", "/kv/ok/" + "/".join(["d"] * 20), b"x").status == 201
    folders = [p for p in app.storage.root.rglob("*") if p.is_dir()]
    assert max(len(p.relative_to(app.storage.root).parts) for p in folders) <= 3  # objects/kv/<shard>


def test_max_storage_counts_what_entries_cost_on_disk_and_removes_empty_folders(tmp_path):
    bound = 10 * disk_cost(0)
    app = new_app(tmp_path / "s", max_storage=bound)
    for i in range(200):
        assert call(app, "PUT", f"/kv/empty/e{i}", b"").status == 201
    count, size, evictions = app.storage.totals()
    assert count == 10 and size == 0 and evictions == 190
    assert app.storage.cost <= bound
    shards = [p for p in (app.storage.root / "objects" / "kv").iterdir()]
    assert len(shards) <= 10 and all(any(p.iterdir()) for p in shards)  # emptied folders were removed
    on_disk = sum(1 for p in (app.storage.root / "objects").rglob("*") if p.is_file())
    assert on_disk == count  # each blob, its metadata in its attribute, nothing left behind


def test_blobs_of_the_former_layout_are_moved_at_start_up(tmp_path):
    store = tmp_path / "s"
    (store / "blobs" / "kv" / "ns" / "a").mkdir(parents=True)
    (store / "blobs" / "kv" / "ns" / "a" / "b").write_bytes(b"old entry")
    (store / "blobs" / "turbo" / "t" / "ab").mkdir(parents=True)
    (store / "blobs" / "turbo" / "t" / "ab" / "abcd").write_bytes(b"old turbo")
    (store / "blob-meta" / "turbo" / "t" / "ab").mkdir(parents=True)
    (store / "blob-meta" / "turbo" / "t" / "ab" / "abcd.json").write_text('{"duration": 7, "tag": "sig"}')
    app = new_app(store)
    assert call(app, "GET", "/kv/ns/a/b").body == b"old entry"
    turbo = call(app, "GET", "/v8/artifacts/abcd?team=t")
    assert turbo.body == b"old turbo" and turbo.headers["x-artifact-duration"] == "7" and turbo.headers["x-artifact-tag"] == "sig"
    assert not (store / "blobs").exists() and not (store / "blob-meta").exists()
    assert app.storage.totals()[:2] == (2, len(b"old entry") + len(b"old turbo"))


@pytest.mark.parametrize("options", [{}, {"setxattr": None}], ids=["attribute", "file beside"])
def test_a_turbo_blob_is_published_after_its_metadata(tmp_path, options):
    """A probe in the storage's one publishing step records what a reader sees the moment the
    blob becomes visible (its metadata in its attribute, or in the file beside it)."""
    from polykit_cache.storage import Storage

    seen = []

    class Probe(Storage):
        def _retry_in_folder(self, path, operation):
            super()._retry_in_folder(path, operation)
            if not path.endswith(".json"):
                seen.append(self.blob_meta("turbo/t/ab/abcd"))  # the blob has just become visible

    app = new_app(tmp_path / "s", options)
    app.storage.__class__ = Probe
    reply = call(app, "PUT", "/v8/artifacts/abcd?team=t", b"x", headers={"x-artifact-duration": "5", "x-artifact-tag": "t1"})
    assert reply.status == 202 and seen == [{"duration": 5, "tag": "t1"}]
    again = call(app, "PUT", "/v8/artifacts/abcd?team=t", b"y", headers={"x-artifact-tag": "other"})
    assert again.status == 202 and call(app, "GET", "/v8/artifacts/abcd?team=t").headers["x-artifact-tag"] == "t1"


def test_turbo_inputs_are_bounded(app):
    too_many = json.dumps({"hashes": [f"h{i}" for i in range(1001)]}).encode()
    reply = call(app, "POST", "/v8/artifacts?team=t", too_many)
    assert reply.status == 400 and "at most 1000 hashes" in reply.json()["error"]["message"]
    huge = b"[" + b"0," * (1 << 20) + b"0]"
    assert call(app, "POST", "/v8/artifacts/events", huge).status == 413
    assert call(app, "POST", "/v8/artifacts?team=t", huge).status == 413
    nested = b'{"hashes": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"  # under the 1 MiB bound
    assert call(app, "POST", "/v8/artifacts?team=t", nested).status == 400
    assert call(app, "POST", "/v8/artifacts?team=t", b'{"hashes": ' + b"[" * 100_000).status == 400
    fields = "&".join(f"x{i}=1" for i in range(17))
    assert call(app, "GET", f"/v8/artifacts/abcd?{fields}").status == 400
    assert call(app, "POST", "/v8/artifacts?team=t", json.dumps({"hashes": ["abcd"] * 1000}).encode()).status == 200
    for duration in ("١٢", "+5", "5 5", "9" * 16):
        reply = call(app, "PUT", "/v8/artifacts/abcd?team=t", b"x", headers={"x-artifact-duration": duration})
        assert reply.status == 400 and reply.json()["error"]["code"] == "bad_request", duration


def test_webdav_folders_for_sccache(tmp_path):
    """OpenDAL's WebDAV service: PROPFIND (depth 0) a parent folder, MKCOL what is missing, then PUT."""
    app = new_app(tmp_path / "open")
    for folder in ("/kv/sccache/", "/kv/sccache/6/8/7/", "/cache-v2/kv/sccache/a/", "/kv/"):
        found = call(app, "PROPFIND", folder, b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>',
                     headers={"Depth": "0"})
        assert found.status == 207 and found.headers["content-type"].startswith("application/xml")
        text = found.body.decode()
        assert f"<D:href>{folder}</D:href>" in text and "<D:collection/>" in text and "<D:getlastmodified>" in text
        assert call(app, "MKCOL", folder).status == 201
    assert call(app, "PUT", "/kv/sccache/.sccache_check", b"ok").status == 201
    assert call(app, "GET", "/kv/sccache/.sccache_check").body == b"ok"
    for bad in ("/kv/sccache/./", "/kv/sccache/../", "/kv/a b/"):
        assert call(app, "PROPFIND", bad).status == 400, bad
        assert call(app, "MKCOL", bad).status == 400, bad
    assert call(app, "MKCOL", "/kv/sccache/x/", b"body").status == 413  # MKCOL takes no body (RFC 4918 9.3)
    assert call(app, "PROPFIND", "/kv/sccache/entry").status == 405  # no listing or properties of entries
    tokens = tmp_path / "tokens"
    tokens.write_text("read dav-reader-token\nread-write dav-writer-token\n")
    secured = new_app(tmp_path / "secured", token_file=tokens)
    assert call(secured, "PROPFIND", "/kv/sccache/").status == 401
    assert call(secured, "PROPFIND", "/kv/sccache/", headers={"Authorization": "Bearer dav-reader-token"}).status == 207
    assert call(secured, "MKCOL", "/kv/sccache/a/", headers={"Authorization": "Bearer dav-reader-token"}).status == 403
    assert call(secured, "MKCOL", "/kv/sccache/a/", headers={"Authorization": "Bearer dav-writer-token"}).status == 201


def test_turbo_preflight_answers_as_turbo_reads_it(tmp_path):
    """turbo --preflight: OPTIONS on the artifact's URL; it sends Authorization only if allowed."""
    tokens = tmp_path / "tokens"
    tokens.write_text("read-write turbo-token-1\n")
    app = new_app(tmp_path / "s", token_file=tokens)
    answer = call(app, "OPTIONS", "/v8/artifacts/abc123?team=t",
                  headers={"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "Authorization"})
    assert answer.status == 204 and answer.body == b""
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert "PUT" in answer.headers["access-control-allow-methods"]
    assert "location" not in answer.headers  # the real request goes to the same URL
    assert call(app, "OPTIONS", "/cache-v2/v8/artifacts/abc123").status == 204
    assert call(app, "OPTIONS", "/v1/artifacts/" + "ab" * 32).status == 405
