"""The WSGI application called directly (no socket): every status code and JSON error body."""

import io
import json
import os
import tarfile
from contextlib import contextmanager

import pytest

from polykit_cache.entryfile import META_ATTR

from support import (
    KEY, OTHER_KEY, TAR_END, ExplodingInput, call, craft, header, key_for, manifest, new_app, pack_tree, pax_header, sha, tar_member, zst,
)

ART = f"/v1/artifacts/{KEY}"


def assert_error(reply, status, word):
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["error"] == word
    assert isinstance(body["message"], str) and body["message"]
    return body


def test_put_then_get_and_head(app, tmp_path):
    blob = pack_tree(tmp_path, {"dist/a.js": b"x" * 100})
    put = call(app, "PUT", ART, blob)
    assert put.status == 201
    assert put.json() == {"key": KEY, "size": len(blob), "sha256": sha(blob)}
    get = call(app, "GET", ART)
    assert get.status == 200 and get.body == blob
    assert get.headers["content-type"] == "application/zstd"
    assert get.headers["content-length"] == str(len(blob))
    assert get.headers["x-artifact-hash"] == sha(blob)
    assert get.headers["etag"] == f'"{sha(blob)}"'
    head = call(app, "HEAD", ART)
    assert head.status == 200 and head.body == b""
    for name in ("content-type", "content-length", "x-artifact-hash", "etag"):
        assert head.headers[name] == get.headers[name]


def test_first_write_wins(app, tmp_path):
    first = pack_tree(tmp_path, {"a": b"first"})
    second = pack_tree(tmp_path, {"a": b"second"})
    assert call(app, "PUT", ART, first).status == 201
    assert_error(call(app, "PUT", ART, second), 409, "exists")
    assert call(app, "GET", ART).body == first


def test_if_none_match_gives_304(app, tmp_path):
    blob = pack_tree(tmp_path, {"a": b"x"})
    call(app, "PUT", ART, blob)
    reply = call(app, "GET", ART, headers={"If-None-Match": f'"{sha(blob)}"'})
    assert reply.status == 304 and reply.body == b""


def test_missing_artifact_is_404(app):
    assert_error(call(app, "GET", ART), 404, "not_found")
    head = call(app, "HEAD", ART)
    assert head.status == 404 and head.body == b""


@pytest.mark.parametrize("key", ["abc", "AB" * 32, "g" * 64, "ab" * 33, KEY + ".zst", "..%2f" + KEY[5:]])
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT"])
def test_bad_keys_are_400(app, key, method):
    reply = call(app, method, f"/v1/artifacts/{key}", b"x" if method == "PUT" else None)
    assert reply.status == 400
    if method != "HEAD":
        assert_error(reply, 400, "bad_key")


def test_put_without_length_is_411(app):
    assert_error(call(app, "PUT", ART), 411, "length_required")


def test_put_with_a_bad_length_is_400(app):
    assert_error(call(app, "PUT", ART, headers={"Content-Length": "ten"}, body_stream=io.BytesIO(b"")), 400, "bad_length")


def test_limit_is_refused_from_content_length_before_the_body_is_read(tmp_path):
    app = new_app(tmp_path / "s", max_artifact_size=1000)
    reply = call(app, "PUT", ART, headers={"Content-Length": "1001"}, body_stream=ExplodingInput())
    body = assert_error(reply, 413, "too_large")
    assert body["limit"] == 1000


def test_a_body_of_exactly_the_limit_is_accepted(tmp_path):
    blob = pack_tree(tmp_path, {"a": os.urandom(2000)})
    at_limit = new_app(tmp_path / "s1", max_artifact_size=len(blob))
    assert call(at_limit, "PUT", ART, blob).status == 201
    below = new_app(tmp_path / "s2", max_artifact_size=len(blob) - 1)
    assert_error(call(below, "PUT", ART, blob), 413, "too_large")


MALFORMED = {
    "not zstd": b"plain text, not an artifact",
    "zstd but not tar": zst(b"x" * 4096),
    "metadata for another key": craft({"a": b"1"}, meta=manifest({"a": b"1"}, key=OTHER_KEY)),
    "hash mismatch": craft({"a": b"1"}, meta=manifest({"a": b"2"})),
    "symlink out": craft({}, symlinks={"x": "../../../etc/passwd"}),
    "truncated": craft({"a": os.urandom(10_000)})[:-100],
    "empty body": b"",
    "names one filesystem merges": craft({"a/X": b"1", "a/x": b"2"}),
    "a file under a link of another case": craft({"d/a/f": b"1"}, symlinks={"d/A": "."}),
    "no log member": craft({"a": b"1"}, meta={**manifest({"a": b"1"}), "logs": {}}, drop=("logs/output.log",)),
    "a PAX comment": zst(
        tar_member("polykit-artifact.json", json.dumps(manifest({})).encode())
        + pax_header({"comment": b"unchecked"}) + tar_member("logs/output.log") + TAR_END),
    "a PAX header claiming 1 GiB": zst(
        tar_member("polykit-artifact.json", json.dumps(manifest({})).encode())
        + header("././@PaxHeader", 1 << 30, kind=tarfile.XHDTYPE) + b"1073741824 comment="),
    "a manifest nested 100,000 deep": zst(tar_member("polykit-artifact.json", b"[" * 100_000) + TAR_END),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_uploads_are_422_and_nothing_is_stored(app, case):
    body = assert_error(call(app, "PUT", ART, MALFORMED[case]), 422, "verification_failed")
    assert body["reason"]
    assert call(app, "HEAD", ART).status == 404
    store = app.storage.root
    assert not list(store.rglob("*.zst")) and not list(store.rglob("*.json"))
    assert not any((store / "tmp").iterdir())
    stats = call(app, "GET", "/v1/stats").json()
    assert stats["uploads_rejected"] == {body["reason"]: 1}
    assert stats["artifacts"] == 0


def test_x_artifact_hash_on_put_is_checked(app, tmp_path):
    blob = pack_tree(tmp_path, {"a": b"x"})
    body = assert_error(call(app, "PUT", ART, blob, headers={"X-Artifact-Hash": "0" * 64}), 422, "verification_failed")
    assert body["reason"] == "body_hash_mismatch"
    assert call(app, "PUT", ART, blob, headers={"X-Artifact-Hash": sha(blob)}).status == 201


def test_a_body_shorter_than_its_length_is_400(app, tmp_path):
    blob = pack_tree(tmp_path, {"a": os.urandom(5000)})
    reply = call(app, "PUT", ART, headers={"Content-Length": str(len(blob) + 10)}, body_stream=io.BytesIO(blob))
    assert_error(reply, 400, "incomplete_body")
    assert not any((app.storage.root / "tmp").iterdir())


def test_unknown_path_is_404_and_wrong_method_is_405(app):
    assert_error(call(app, "GET", "/v2/nothing"), 404, "not_found")
    reply = call(app, "DELETE", ART)
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, HEAD, PUT"
    assert_error(call(app, "POST", "/healthz", b""), 405, "method_not_allowed")


def test_healthz(app):
    reply = call(app, "GET", "/healthz")
    assert reply.status == 200 and reply.json() == {"status": "ok"}


def test_stats_and_metrics_follow_the_traffic(app, tmp_path):
    blob = pack_tree(tmp_path, {"a": b"x" * 10})
    call(app, "PUT", ART, blob)
    call(app, "GET", ART)
    call(app, "HEAD", ART)
    call(app, "GET", f"/v1/artifacts/{OTHER_KEY}")
    call(app, "PUT", f"/v1/artifacts/{OTHER_KEY}", b"junk")
    stats = call(app, "GET", "/v1/stats").json()
    assert stats["hits"] == 2 and stats["misses"] == 1
    assert stats["hit_rate"] == round(2 / 3, 4)
    assert stats["uploads"] == 1 and stats["uploads_rejected"] == {"bad_zstd": 1}
    assert stats["bytes_out"] == len(blob)
    assert stats["bytes_in"] == len(blob) + 4
    assert stats["artifacts"] == 1 and stats["stored_bytes"] == len(blob)
    assert stats["evictions"] == 0
    text = call(app, "GET", "/metrics")
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = text.body.decode().splitlines()
    assert 'polykit_cache_requests_total{protocol="polykit",method="PUT",status="201"} 1' in lines
    assert 'polykit_cache_requests_total{protocol="polykit",method="GET",status="404"} 1' in lines
    assert 'polykit_cache_hits_total{protocol="polykit"} 2' in lines
    assert 'polykit_cache_misses_total{protocol="polykit"} 1' in lines
    assert 'polykit_cache_uploads_rejected_total{reason="bad_zstd"} 1' in lines
    assert "polykit_cache_stored_artifacts 1" in lines
    assert f"polykit_cache_stored_bytes {len(blob)}" in lines
    assert f"polykit_cache_sent_bytes_total {len(blob)}" in lines
    assert "polykit_cache_evictions_total 0" in lines
    assert any(line.startswith('polykit_cache_request_duration_seconds_bucket{le="+Inf"}') for line in lines)


@pytest.mark.parametrize("layout", ["attribute", "file beside"])
def test_torn_metadata_is_rebuilt_from_the_artifact(tmp_path, layout):
    from polykit_cache.entryfile import read_meta
    from support import new_app

    options = {} if layout == "attribute" else {"setxattr": None}
    app = new_app(tmp_path / "store", options)
    blob = pack_tree(tmp_path, {"a": b"x"})
    call(app, "PUT", ART, blob)
    path = app.storage.artifact_path(KEY)
    # What a power loss can leave of metadata written without a sync.
    if layout == "attribute":
        os.setxattr(path, META_ATTR, b"")
    else:
        path.with_suffix(".json").write_bytes(b"")
    fresh = new_app(app.storage.root, options)
    reply = call(fresh, "HEAD", ART)
    assert reply.status == 200 and reply.headers["x-artifact-hash"] == sha(blob)
    assert read_meta(str(path), str(path.with_suffix(".json")))["sha256"] == sha(blob)


def test_storage_layout_one_file_per_artifact_with_its_metadata_attribute(app, tmp_path):
    key = key_for("layout")
    blob = pack_tree(tmp_path, {"a": b"x"}, key=key)
    assert call(app, "PUT", f"/v1/artifacts/{key}", blob).status == 201
    path = app.storage.root / key[:2] / key[2:4] / f"{key}.zst"
    assert path.read_bytes() == blob
    assert os.listdir(path.parent) == [path.name]  # no metadata file beside it
    meta = __import__("json").loads(os.getxattr(path, META_ATTR))
    assert meta["size"] == len(blob) and meta["sha256"] == sha(blob) and meta["created"] > 0


def test_an_unexpected_error_is_a_json_500_and_the_app_keeps_serving(app, tmp_path, caplog):
    blob = pack_tree(tmp_path, {"a": b"x"})
    call(app, "PUT", ART, blob)
    # Put a folder where the artifact file should be: opening it fails, the error is rendered.
    path = app.storage.artifact_path(KEY)
    meta = os.getxattr(path, META_ATTR)
    path.unlink()
    path.mkdir()
    os.setxattr(path, META_ATTR, meta)  # the metadata is still found
    reply = call(app, "GET", ART)
    assert_error(reply, 500, "internal_error")
    assert "Traceback" not in reply.body.decode()
    assert call(app, "GET", "/healthz").status == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_507_and_leaves_nothing_partial(tmp_path):
    with small_tmpfs(tmp_path / "small", "size=256k") as mount:
        app = new_app(mount)
        blob = pack_tree(tmp_path, {"big": os.urandom(400_000)})
        assert_error(call(app, "PUT", ART, blob), 507, "storage_full")
        assert not list(mount.rglob("*.zst")) and not any((mount / "tmp").iterdir())
        small = pack_tree(tmp_path, {"a": b"x"}, key=OTHER_KEY)
        assert call(app, "PUT", f"/v1/artifacts/{OTHER_KEY}", small).status == 201
        assert call(app, "GET", f"/v1/artifacts/{OTHER_KEY}").body == small


def test_the_access_log_cannot_be_forged_through_the_path(app, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="polykit_cache.access"):
        call(app, "GET", '/v1/artifacts/x"\n127.0.0.1 - - [forged] "GET /admin')
    lines = [r.getMessage() for r in caplog.records if r.name == "polykit_cache.access"]
    assert len(lines) == 1 and "\n" not in lines[0] and '\\"' in lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_no_inode_left_is_507_too(tmp_path):
    with small_tmpfs(tmp_path / "few-inodes", "size=4m,nr_inodes=64") as mount:
        app = new_app(mount)
        filler = mount / "filler"
        filler.mkdir()
        for i in range(1000):
            try:
                (filler / str(i)).touch()
            except OSError:
                break
        else:
            pytest.skip("the inode limit did not apply")
        assert_error(call(app, "PUT", ART, pack_tree(tmp_path, {"a": b"x"})), 507, "storage_full")


@contextmanager
def small_tmpfs(mount, options):
    """A tiny filesystem of our own to fill up; skips where mounting is not permitted."""
    import subprocess

    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]).returncode:
        pytest.skip("tmpfs mount not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_refusal_labels_come_from_a_fixed_set():
    from polykit_cache.outcomes import OUTCOMES, refuse

    assert refuse("verification_failed", "x", reason="made-up-reason").reject == "other"
    assert refuse("verification_failed", "x", reason="bad_zstd").extra["reason"] == "bad_zstd"
    assert refuse("unauthorized", "x", count=False).reject is None
    assert {o.status for o in OUTCOMES.values()} >= {400, 401, 403, 404, 405, 409, 411, 413, 414, 422, 507}


def test_every_verification_reason_of_the_code_has_its_own_label():
    """A refusal reason the verifier can give but the outcomes table does not list would be counted as "other"."""
    import re

    from polykit_cache.outcomes import VERIFICATION_REASONS
    from support import ROOT

    source = "".join(p.read_text() for p in (ROOT / "polykit_client").glob("*.py"))
    reasons = set(re.findall(r'ArtifactError\(\s*"([a-z_]+)"', source))
    assert reasons and reasons <= VERIFICATION_REASONS, reasons - VERIFICATION_REASONS


QUERY = "/v1/artifacts"


def test_batch_query_answers_which_keys_are_stored(app, tmp_path):
    blob = pack_tree(tmp_path, {"dist/a.js": b"x"})
    assert call(app, "PUT", ART, blob).status == 201
    reply = call(app, "POST", QUERY, json.dumps({"keys": [KEY, OTHER_KEY, KEY]}).encode())
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json() == {"artifacts": {KEY: {"size": len(blob), "sha256": sha(blob)}, OTHER_KEY: None}}
    assert call(app, "POST", QUERY, b'{"keys": []}').json() == {"artifacts": {}}
    assert call(app, "GET", QUERY).status == 405 and call(app, "GET", QUERY).headers["allow"] == "POST"


@pytest.mark.parametrize("body, word", [
    (b"", "bad_request"), (b"nope", "bad_request"), (b"[]", "bad_request"), (b'{"hashes": []}', "bad_request"),
    (b'{"keys": "' + KEY.encode() + b'"}', "bad_request"), (b'{"keys": [1]}', "bad_request"),
    (b'{"keys": [[]]}', "bad_request"), (b'{"keys": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "bad_request"),
    (b'{"keys": ["' + KEY.upper().encode() + b'"]}', "bad_key"), (b'{"keys": ["../x"]}', "bad_key"),
])
def test_batch_query_refuses_bad_bodies(app, body, word):
    assert_error(call(app, "POST", QUERY, body), 400, word)


def test_batch_query_is_bounded(app):
    keys = [key_for(str(i)) for i in range(1000)]
    reply = call(app, "POST", QUERY, json.dumps({"keys": keys}).encode())
    assert reply.status == 200 and set(reply.json()["artifacts"]) == set(keys)
    body = assert_error(call(app, "POST", QUERY, json.dumps({"keys": keys + [KEY]}).encode()), 400, "bad_request")
    assert "at most 1000 keys" in body["message"]
    # Refused from Content-Length, before the body is read.
    huge = call(app, "POST", QUERY, headers={"Content-Length": str(128 * 1024 + 1)}, body_stream=ExplodingInput())
    assert_error(huge, 413, "too_large")


def test_batch_query_is_a_read(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read reader-token-1\n")
    app = new_app(tmp_path / "s", token_file=tokens)
    body = json.dumps({"keys": [KEY]}).encode()
    assert_error(call(app, "POST", QUERY, body), 401, "unauthorized")
    reply = call(app, "POST", QUERY, body, headers={"Authorization": "Bearer reader-token-1"})
    assert reply.status == 200 and reply.json() == {"artifacts": {KEY: None}}
    anonymous = new_app(tmp_path / "t", token_file=tokens, allow_anonymous_read=True)
    assert call(anonymous, "POST", QUERY, body).status == 200


def test_batch_query_answers_for_the_namespace_it_is_asked_in(app, tmp_path):
    blob = pack_tree(tmp_path, {"dist/a.js": b"x"})
    assert call(app, "PUT", f"/team-a/v1/artifacts/{KEY}", blob).status == 201
    body = json.dumps({"keys": [KEY]}).encode()
    assert call(app, "POST", "/team-a/v1/artifacts", body).json() == {"artifacts": {KEY: {"size": len(blob), "sha256": sha(blob)}}}
    assert call(app, "POST", "/team-b/v1/artifacts", body).json() == {"artifacts": {KEY: None}}
    assert call(app, "POST", QUERY, body).json() == {"artifacts": {KEY: None}}
