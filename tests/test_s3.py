"""N servers on one S3-compatible bucket: real server processes on a real moto server, on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from polykit_cache.s3client import Body
from s3support import KEYS, enable_auth, moto_server
from sample import Polykit, make_tools, make_workspace
from support import KEY, ServerProcess, key_for, pack_tree, request, sha

ART = f"/v1/artifacts/{KEY}"


def start(moto, bucket, tmp_path, name, *args, env=None) -> ServerProcess:
    """A polykit-cache process on the bucket, with its own tier folder."""
    return ServerProcess(tmp_path / f"tier-{name}", tmp_path / f"{name}.log", "--storage", f"s3://{bucket}/cache",
                         "--s3-endpoint", moto.url, *args, env={**KEYS, **(env or {})})


@contextmanager
def servers(tmp_path, *args, count=2):
    with moto_server(tmp_path) as moto:
        bucket = moto.make_bucket()
        started = []
        try:
            for i in range(count):
                started.append(start(moto, bucket, tmp_path, f"s{i}", *args))
            yield moto, bucket, started
        finally:
            for server in started:
                server.stop()


def test_an_artifact_uploaded_through_one_server_is_served_by_the_other(tmp_path):
    blob = pack_tree(tmp_path, {"dist/app.js": os.urandom(50_000)})
    with servers(tmp_path) as (moto, bucket, (a, b)):
        assert request(b.port, "HEAD", ART)[0] == 404
        assert request(a.port, "PUT", ART, blob)[0] == 201
        status, headers, body = request(b.port, "GET", ART)
        assert status == 200 and body == blob and headers["x-artifact-hash"] == sha(blob)
        assert request(b.port, "HEAD", ART)[0] == 200
        assert request(b.port, "PUT", ART, blob)[0] == 409  # first write wins across servers
        stored = moto.client(bucket).request("HEAD", f"cache/polykit/{KEY}")
        assert stored.headers["x-amz-meta-sha256"] == sha(blob)


@pytest.mark.parametrize("size", [20_000, 6 << 20], ids=["single-put", "multipart"])
def test_an_eight_way_race_across_both_servers_has_one_winner(tmp_path, size):
    bodies = [pack_tree(tmp_path / f"w{i}", {"out.bin": os.urandom(size)}) for i in range(8)]
    with servers(tmp_path, "--s3-multipart-threshold", "5M", "--s3-part-size", "5M") as (moto, bucket, pair):
        results = []
        barrier = threading.Barrier(8)

        def upload(i):
            barrier.wait()
            results.append((i, request(pair[i % 2].port, "PUT", ART, bodies[i])[0]))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(status for _, status in results)
        assert statuses == [201] + [409] * 7, results
        winner = bodies[next(i for i, status in results if status == 201)]
        for server in pair:
            assert request(server.port, "GET", ART)[2] == winner


def test_nothing_is_visible_before_a_multipart_upload_completes(tmp_path):
    with servers(tmp_path, count=1) as (moto, bucket, (a,)):
        client = moto.client(bucket)
        started = client.request("POST", f"cache/polykit/{KEY}", params=[("uploads", "")])
        upload_id = started.body.decode().split("<UploadId>")[1].split("</UploadId>")[0]
        part = os.urandom(6 << 20)
        import io

        client.request("PUT", f"cache/polykit/{KEY}", params=[("partNumber", "1"), ("uploadId", upload_id)],
                       body=Body(io.BytesIO(part), 0, len(part)), payload_hash=sha(part))
        assert request(a.port, "HEAD", ART)[0] == 404
        assert request(a.port, "GET", ART)[0] == 404
        blob = pack_tree(tmp_path, {"a": b"x"})
        assert request(a.port, "PUT", ART, blob)[0] == 201  # the unfinished upload holds nothing


def test_a_stopped_bucket_is_a_503_and_builds_stay_green(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    blob = pack_tree(tmp_path, {"a": b"kept"})
    with servers(tmp_path, count=1) as (moto, bucket, (a,)):
        assert request(a.port, "PUT", ART, blob)[0] == 201
        moto.stop()
        assert request(a.port, "GET", ART)[2] == blob  # a tier hit is still served
        assert request(a.port, "HEAD", f"/v1/artifacts/{key_for('missing')}")[0] == 503
        status, _, body = request(a.port, "PUT", f"/v1/artifacts/{key_for('new')}", pack_tree(tmp_path, {"b": b"y"}, key=key_for("new")))
        assert status == 503 and json.loads(body)["error"] == "unavailable"
        out = pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{a.port}")
        assert out.returncode == 0 and "shared-utils:build" in pk.ran()


def test_start_up_refuses_a_wrong_secret_an_unknown_key_and_a_missing_bucket(tmp_path):
    with moto_server(tmp_path) as moto:
        bucket = moto.make_bucket()
        creds = enable_auth(moto, bucket)
        good = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}
        cases = {
            "wrong secret": ({**good, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, bucket, "secret access key is wrong"),
            "unknown key": ({**good, "AWS_ACCESS_KEY_ID": "AKIANOTAKNOWNKEY0000"}, bucket, "access key is not known"),
            "missing bucket": (good, "no-such-bucket", "'no-such-bucket' does not exist"),
        }
        for case, (env, name, sentence) in cases.items():
            out = subprocess.run([sys.executable, "-m", "polykit_cache", "--port", "0", "--storage-dir",
                                  str(tmp_path / "tier"), "--storage", f"s3://{name}/cache", "--s3-endpoint", moto.url],
                                 env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
            assert out.returncode == 2 and sentence in out.stderr, (case, out.stderr)
            assert env["AWS_SECRET_ACCESS_KEY"] not in out.stderr
        server = start(moto, bucket, tmp_path, "authorised", env=good)  # the right key starts
        try:
            assert request(server.port, "PUT", ART, pack_tree(tmp_path, {"a": b"x"}))[0] == 201
        finally:
            server.stop()


def test_start_up_refuses_missing_credentials_and_an_unreachable_endpoint(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "polykit_cache", "--port", "0", "--storage-dir", str(tmp_path / "tier"),
            "--storage", "s3://bucket/cache", "--s3-endpoint", f"http://127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = subprocess.run(base, env={**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no S3 credentials" in out.stderr
    out = subprocess.run(base, env={**env, **KEYS}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot reach the S3 endpoint" in out.stderr


def test_an_object_deleted_behind_the_servers_backs_is_healed_from_a_tier(tmp_path):
    blob = pack_tree(tmp_path, {"a": os.urandom(1000)})
    with servers(tmp_path, "--s3-revalidate", "0") as (moto, bucket, (a, b)):
        assert request(a.port, "PUT", ART, blob)[0] == 201
        client = moto.client(bucket)
        client.request("DELETE", f"cache/polykit/{KEY}")
        assert request(a.port, "GET", ART)[2] == blob  # confirmed with a HEAD, found missing, uploaded again
        assert client.request("HEAD", f"cache/polykit/{KEY}").headers["x-amz-meta-sha256"] == sha(blob)
        assert request(b.port, "GET", ART)[2] == blob


def test_a_corrupted_object_is_never_served_and_verify_removes_it(tmp_path):
    blob = pack_tree(tmp_path, {"a": os.urandom(5000)})
    with servers(tmp_path) as (moto, bucket, (a, b)):
        assert request(a.port, "PUT", ART, blob)[0] == 201
        client = moto.client(bucket)
        head = client.request("HEAD", f"cache/polykit/{KEY}").headers
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0xFF
        client.request("PUT", f"cache/polykit/{KEY}", body=bytes(bad),
                       headers={k: v for k, v in head.items() if k.startswith("x-amz-meta-")})
        status, _, body = request(b.port, "GET", ART)  # b has no copy: it downloads, hashes, refuses
        assert status == 404 and body != bytes(bad)
        out = subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage", f"s3://{bucket}/cache",
                              "--s3-endpoint", moto.url], env={**os.environ, **KEYS}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 1 and "1 quarantined" in out.stdout, out.stdout + out.stderr
        assert request(b.port, "PUT", ART, blob)[0] == 201  # uploaded anew


def test_every_protocol_s_blobs_go_through_the_bucket(tmp_path):
    cas = os.urandom(3000)
    with servers(tmp_path) as (moto, bucket, (a, b)):
        assert request(a.port, "PUT", "/v8/artifacts/abc123?team=web", b"turbo blob",
                       {"x-artifact-duration": "1234", "x-artifact-tag": "c2lnbmVk"})[0] == 202
        status, headers, body = request(b.port, "GET", "/v8/artifacts/abc123?team=web")
        assert (status, body, headers["x-artifact-duration"], headers["x-artifact-tag"]) == (200, b"turbo blob", "1234", "c2lnbmVk")
        assert request(a.port, "PUT", "/v1/cache/nxhash", b"nx blob")[0] == 200
        assert request(b.port, "PUT", "/v1/cache/nxhash", b"other")[0] == 409
        assert request(b.port, "GET", "/v1/cache/nxhash")[2] == b"nx blob"
        assert request(a.port, "PUT", "/kv/ccache/ab/cdef", b"kv blob")[0] == 201
        assert request(b.port, "GET", "/kv/ccache/ab/cdef")[2] == b"kv blob"
        assert request(a.port, "PUT", f"/cas/{sha(cas)}", cas)[0] == 200
        assert request(b.port, "GET", f"/cas/{sha(cas)}")[2] == cas
        ac = "/inst/ac/" + "1" * 64
        assert request(a.port, "PUT", ac, b"first result")[0] == 200
        assert request(b.port, "PUT", ac, b"second result")[0] == 200  # the action cache is replaced
        assert request(a.port, "GET", "/v8/artifacts/abc123?team=web")[2] == b"turbo blob"
        listed = moto.client(bucket).request("GET", "", params=[("list-type", "2"), ("prefix", "cache/")]).body.decode()
        for key in ("cache/turbo/web/abc123", "cache/nx/nxhash", "cache/kv/ccache/ab/cdef", f"cache/bazel-cas/{sha(cas)}",
                    "cache/bazel-ac/@inst/" + "1" * 64):
            assert f"<Key>{key}</Key>" in listed


def test_memory_stays_flat_for_a_large_artifact_both_ways(tmp_path):
    files = {f"part{i}.bin": os.urandom(16 << 20) for i in range(6)}  # 96 MiB that zstd cannot shrink
    blob_path = tmp_path / "big.zst"
    blob_path.write_bytes(pack_tree(tmp_path, files))
    del files
    size = blob_path.stat().st_size
    with servers(tmp_path, "--max-artifact-size", "1G") as (moto, bucket, (a, b)):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=300)
        with open(blob_path, "rb") as fh:
            conn.request("PUT", ART, body=fh, headers={"Content-Length": str(size)})
            assert conn.getresponse().status == 201
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", b.port, timeout=300)
        conn.request("GET", ART)
        resp = conn.getresponse()
        digest, got = __import__("hashlib").sha256(), 0
        while block := resp.read(1 << 20):
            digest.update(block)
            got += len(block)
        conn.close()
        assert resp.status == 200 and got == size
        for server in (a, b):
            assert server.peak_rss_kib() < 100 * 1024, server.peak_rss_kib()


def test_a_replaced_action_cache_entry_is_seen_by_the_other_server_after_revalidation(tmp_path):
    ac = "/ac/" + "2" * 64
    with servers(tmp_path, "--s3-revalidate", "0") as (moto, bucket, (a, b)):
        assert request(a.port, "PUT", ac, b"old result")[0] == 200
        assert request(a.port, "GET", ac)[2] == b"old result"  # now in a's tier
        assert request(b.port, "PUT", ac, b"new result")[0] == 200
        assert request(a.port, "GET", ac)[2] == b"new result"  # a's HEAD saw other bytes: its copy was dropped


def test_a_tier_hit_due_for_revalidation_is_served_while_the_bucket_is_down(tmp_path):
    blob = pack_tree(tmp_path, {"a": b"kept"})
    with servers(tmp_path, "--s3-revalidate", "0", count=1) as (moto, bucket, (a,)):
        assert request(a.port, "PUT", ART, blob)[0] == 201
        moto.stop()
        for _ in range(3):
            assert request(a.port, "GET", ART)[2] == blob


def test_stats_and_gc_by_age_on_a_bucket(tmp_path):
    with servers(tmp_path, count=1) as (moto, bucket, (a,)):
        for i in range(3):
            key = key_for(f"gc{i}")
            assert request(a.port, "PUT", f"/v1/artifacts/{key}", pack_tree(tmp_path, {"a": b"x" * i}, key=key))[0] == 201
        assert request(a.port, "PUT", "/kv/ns/entry", b"blob")[0] == 201

        def run(*args):
            return subprocess.run([sys.executable, "-m", "polykit_cache", *args, "--storage", f"s3://{bucket}/cache",
                                   "--s3-endpoint", moto.url], env={**os.environ, **KEYS}, capture_output=True, text=True,
                                  timeout=120)

        out = run("stats", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["artifacts"] == 4, out.stderr
        refused = run("gc", "--max-storage", "1M")
        assert refused.returncode == 2 and "--max-age" in refused.stderr
        assert run("gc", "--max-age", "1d").returncode == 0  # nothing is a day old
        assert json.loads(run("stats", "--json").stdout)["artifacts"] == 4
        out = run("gc", "--max-age", "0")
        assert out.returncode == 0 and "evicted 4 entries" in out.stdout, out.stdout + out.stderr
        assert json.loads(run("stats", "--json").stdout)["artifacts"] == 0
        # The server's verified tier copy is served until its next revalidation uploads it again.
        assert request(a.port, "HEAD", f"/v1/artifacts/{key_for('gc0')}")[0] == 200
