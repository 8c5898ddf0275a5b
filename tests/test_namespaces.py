"""Namespaces by URL: any path before a protocol's root names a cache of its own, for every protocol."""

import hashlib
import json
import subprocess
import sys

import pytest

from polykit_cache.metrics import MAX_NAMESPACE_LABELS
from support import KEY, call, craft, new_app, pack_tree, request, thread_server

BLOB = b"some build output"
DIGEST = hashlib.sha256(BLOB).hexdigest()

# (protocol, path of one entry, answer to its first PUT)
ENTRIES = [
    ("polykit", f"/v1/artifacts/{KEY}", 201),
    ("turbo", "/v8/artifacts/abc123?team=t", 202),
    ("nx", "/v1/cache/nxhash1", 200),
    ("kv", "/kv/ccache/ab/cdef", 201),
    ("bazel", f"/cas/{DIGEST}", 200),
    ("bazel", f"/ac/{DIGEST}", 200),
]


def body_for(protocol: str, tmp_path) -> bytes:
    return pack_tree(tmp_path, {"dist/a.js": b"x"}) if protocol == "polykit" else BLOB


@pytest.mark.parametrize("protocol,path,created", ENTRIES)
def test_an_entry_under_a_namespace_is_never_a_hit_elsewhere(app, tmp_path, protocol, path, created):
    body = body_for(protocol, tmp_path)
    assert call(app, "PUT", "/cache-v2" + path, body).status == created
    assert call(app, "GET", "/cache-v2" + path).body == body
    assert call(app, "HEAD", "/cache-v2" + path).status == 200
    for elsewhere in ("", "/cache-v1", "/team/cache-v2", "/cache-v2/more"):
        assert call(app, "GET", elsewhere + path).status == 404, elsewhere
        assert call(app, "HEAD", elsewhere + path).status == 404, elsewhere
    # The same entry stored without a namespace is its own, and the namespaced one is unchanged.
    assert call(app, "PUT", path, body).status == created
    assert call(app, "GET", "/cache-v2" + path).body == body


def test_a_namespaced_artifact_is_verified_immutable_and_served_with_its_headers(app, tmp_path):
    blob = pack_tree(tmp_path, {"dist/a.js": b"x"})
    path = f"/cache-v2/v1/artifacts/{KEY}"
    bad = call(app, "PUT", path, craft({"a": b"x"}, meta={"format": 1}))
    assert bad.status == 422 and bad.json()["error"] == "verification_failed"
    assert call(app, "GET", path).status == 404  # nothing unverified is kept
    stored = call(app, "PUT", path, blob)
    assert stored.status == 201 and stored.headers["location"] == path
    assert call(app, "PUT", path, blob).status == 409
    got = call(app, "GET", path)
    sha = hashlib.sha256(blob).hexdigest()
    assert got.headers["x-artifact-hash"] == sha and got.headers["content-type"] == "application/zstd"
    assert call(app, "GET", path, headers={"If-None-Match": f'"{sha}"'}).status == 304
    assert call(app, "PUT", f"/cache-v2/v1/artifacts/{'ef' * 32}", blob).status == 422  # the key is checked too


@pytest.mark.parametrize("path,status", [
    ("/a b/v1/artifacts/" + KEY, 400),
    ("/../v1/artifacts/" + KEY, 400),
    ("/.hidden/v1/artifacts/" + KEY, 400),
    ("/" + "/".join(["n"] * 40) + "/v1/artifacts/" + KEY, 400),
    ("/cache-v2/nothing-here", 404),
    ("/cache-v2", 404),
])
def test_namespaces_are_validated_like_keys(app, path, status):
    reply = call(app, "GET", path)
    assert reply.status == status and reply.json()["error"] == ("bad_key" if status == 400 else "not_found")


def test_service_endpoints_answer_under_a_namespace(app):
    """A reverse proxy that keeps its sub-path can health-check and scrape through it."""
    assert call(app, "GET", "/cache-v2/healthz").json() == {"status": "ok"}
    assert call(app, "GET", "/cache-v2/metrics").status == 200
    assert call(app, "GET", "/cache-v2/v1/stats").status == 200


def test_lookups_are_counted_by_namespace_with_bounded_labels(app, tmp_path):
    call(app, "PUT", "/cache-v2/kv/gradle/k1", BLOB)
    call(app, "GET", "/cache-v2/kv/gradle/k1")
    call(app, "GET", "/cache-v2/kv/gradle/k2")
    call(app, "GET", "/kv/gradle/k1")
    lines = call(app, "GET", "/metrics").body.decode().splitlines()
    assert 'polykit_cache_namespace_lookups_total{namespace="/cache-v2",result="hit"} 1' in lines
    assert 'polykit_cache_namespace_lookups_total{namespace="/cache-v2",result="miss"} 1' in lines
    assert 'polykit_cache_namespace_lookups_total{namespace="/",result="miss"} 1' in lines
    assert call(app, "GET", "/v1/stats").json()["by_namespace"]["/cache-v2"] == {"hits": 1, "misses": 1}
    for i in range(MAX_NAMESPACE_LABELS + 20):
        call(app, "GET", f"/n{i}/kv/gradle/k1")
    by_namespace = call(app, "GET", "/v1/stats").json()["by_namespace"]
    assert len(by_namespace) == MAX_NAMESPACE_LABELS + 1 and by_namespace["other"]["misses"] == 22


def test_stats_command_lists_namespaces(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", pack_tree(tmp_path, {"a": b"x"})).status == 201
    assert call(app, "PUT", f"/cache-v2/v1/artifacts/{KEY}", pack_tree(tmp_path, {"a": b"x"})).status == 201
    assert call(app, "PUT", "/cache-v2/kv/gradle/k1", BLOB).status == 201
    assert call(app, "PUT", f"/team/a/cas/{DIGEST}", BLOB).status == 200
    run = lambda *args: subprocess.run([sys.executable, "-m", "polykit_cache", "stats", *args, "--storage-dir", str(store)],
                                       capture_output=True, text=True, timeout=60)
    figures = json.loads(run("--json").stdout)
    assert figures["namespaces"] == {"/": 1, "/cache-v2": 2, "/team/a": 1}
    assert "namespaces: / (1 entries), /cache-v2 (2 entries), /team/a (1 entries)" in run().stdout


def test_a_polykit_client_url_with_a_path_is_its_own_namespace(tmp_path):
    """What the product's guide promises: changing the URL's path is the invalidation."""
    from polykit_client.remote import RemoteCache

    blob = pack_tree(tmp_path, {"dist/a.js": b"x"})
    with thread_server(tmp_path / "store") as (port, app):
        v2 = RemoteCache(f"http://127.0.0.1:{port}/cache-v2")
        (tmp_path / "artifact.zst").write_bytes(blob)
        assert v2.store(KEY, tmp_path / "artifact.zst")
        assert request(port, "GET", f"/cache-v2/v1/artifacts/{KEY}")[0] == 200
        assert request(port, "GET", f"/v1/artifacts/{KEY}")[0] == 404
        assert v2.exists(KEY)
        assert not RemoteCache(f"http://127.0.0.1:{port}/cache-v1").exists(KEY)
        assert not RemoteCache(f"http://127.0.0.1:{port}").exists(KEY)


def test_verify_reverifies_artifacts_in_namespaces(tmp_path):
    from polykit_cache.storage import blob_id

    store = tmp_path / "store"
    app = new_app(store)
    good, bad = pack_tree(tmp_path, {"a": b"x"}), pack_tree(tmp_path, {"b": b"y"}, key="ef" * 32)
    assert call(app, "PUT", f"/cache-v2/v1/artifacts/{KEY}", good).status == 201
    assert call(app, "PUT", f"/team/a/v1/artifacts/{'ef' * 32}", bad).status == 201
    run = lambda: subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)],
                                 capture_output=True, text=True, timeout=60)
    out = run()
    assert out.returncode == 0 and "verified 2 artifacts: 2 good, 0 quarantined" in out.stdout, out.stdout + out.stderr
    damaged = store / "objects" / blob_id(f"polykit/@team:a/{'ef' * 32}")
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"xyz")
    out = run()
    assert out.returncode == 1 and "verified 2 artifacts: 1 good, 1 quarantined" in out.stdout
    assert not damaged.exists() and call(app, "GET", f"/team/a/v1/artifacts/{'ef' * 32}").status == 404
    assert call(app, "GET", f"/cache-v2/v1/artifacts/{KEY}").body == good
