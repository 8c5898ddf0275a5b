"""--max-storage: least recently used eviction, its counters, and the offline gc and stats commands."""

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time

from polykit_cache.storage import disk_cost
from support import call, key_for, new_app, pack_tree, request, thread_server

SIZE = 20_000


def artifact(tmp_path, name):
    key = key_for(name)
    return key, pack_tree(tmp_path / name, {"a": os.urandom(SIZE)}, key=key)


def stored(app, key):
    return call(app, "HEAD", f"/v1/artifacts/{key}").status == 200


def test_the_least_recently_used_artifact_is_evicted(tmp_path):
    blobs = [artifact(tmp_path, f"a{i}") for i in range(4)]
    limit = sum(disk_cost(len(b)) for _, b in blobs[:3]) + 100
    app = new_app(tmp_path / "store", max_storage=limit)
    for key, blob in blobs[:3]:
        assert call(app, "PUT", f"/v1/artifacts/{key}", blob).status == 201
    call(app, "GET", f"/v1/artifacts/{blobs[0][0]}")  # a0 is now the most recently used
    call(app, "HEAD", f"/v1/artifacts/{blobs[2][0]}")
    assert call(app, "PUT", f"/v1/artifacts/{blobs[3][0]}", blobs[3][1]).status == 201
    assert [stored(app, k) for k, _ in blobs] == [True, False, True, True]
    stats = call(app, "GET", "/v1/stats").json()
    assert stats["evictions"] == 1 and stats["artifacts"] == 3 and stats["stored_bytes"] <= limit
    assert "polykit_cache_evictions_total 1" in call(app, "GET", "/metrics").body.decode()
    assert not app.storage.artifact_path(blobs[1][0]).with_suffix(".json").exists()


def test_order_is_kept_below_a_second(tmp_path):
    blobs = [artifact(tmp_path, f"b{i}") for i in range(3)]
    app = new_app(tmp_path / "store", max_storage=sum(disk_cost(len(b)) for _, b in blobs) - 1)
    for key, blob in blobs[:2]:
        call(app, "PUT", f"/v1/artifacts/{key}", blob)
    # Both uses fall within the same second; the order between them still decides.
    call(app, "HEAD", f"/v1/artifacts/{blobs[1][0]}")
    call(app, "HEAD", f"/v1/artifacts/{blobs[0][0]}")
    call(app, "PUT", f"/v1/artifacts/{blobs[2][0]}", blobs[2][1])
    assert [stored(app, k) for k, _ in blobs] == [True, False, True]


def test_totals_and_order_are_known_at_start_up_without_reading_artifacts(tmp_path):
    blobs = [artifact(tmp_path, f"c{i}") for i in range(3)]
    app = new_app(tmp_path / "store")
    for key, blob in blobs:
        call(app, "PUT", f"/v1/artifacts/{key}", blob)
    now = time.time()
    for age, (key, _) in zip((10, 300, 200), blobs):  # c1 is the least recently used on disk
        os.utime(app.storage.artifact_path(key), (now - age, now - age))
    total = sum(len(b) for _, b in blobs)
    restarted = new_app(tmp_path / "store", max_storage=sum(disk_cost(len(b)) for _, b in blobs) - 1)
    assert [stored(restarted, k) for k, _ in blobs] == [True, False, True]
    assert restarted.storage.totals()[:2] == (2, total - len(blobs[1][1]))


def test_an_artifact_larger_than_the_whole_cache_is_507(tmp_path):
    key, blob = artifact(tmp_path, "huge")
    app = new_app(tmp_path / "store", max_storage=len(blob) - 1)
    reply = call(app, "PUT", f"/v1/artifacts/{key}", blob)
    assert reply.status == 507 and reply.json()["error"] == "storage_full"


def test_eviction_never_breaks_a_download_in_progress(tmp_path):
    big_key = key_for("big")
    big = pack_tree(tmp_path / "big", {"a": os.urandom(4 << 20)}, key=big_key)
    others = [artifact(tmp_path, f"d{i}") for i in range(3)]
    with thread_server(tmp_path / "store", max_storage=disk_cost(len(big)) + 2 * disk_cost(20_500)) as (port, app):
        assert request(port, "PUT", f"/v1/artifacts/{big_key}", big)[0] == 201
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/v1/artifacts/{big_key}")
        resp = conn.getresponse()
        digest = hashlib.sha256(resp.read(65536))
        for key, blob in others:  # these push the big artifact out
            assert request(port, "PUT", f"/v1/artifacts/{key}", blob)[0] == 201
        assert request(port, "HEAD", f"/v1/artifacts/{big_key}")[0] == 404
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
        conn.close()
        assert digest.hexdigest() == hashlib.sha256(big).hexdigest()
        assert app.storage.totals()[2] >= 1


def test_gc_and_stats_commands(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    blobs = [artifact(tmp_path, f"e{i}") for i in range(4)]
    for key, blob in blobs:
        call(app, "PUT", f"/v1/artifacts/{key}", blob)
    (store / "tmp" / "upload-in-flight.part").write_bytes(b"another process's upload")
    run = lambda *args: subprocess.run([sys.executable, "-m", "polykit_cache", *args, "--storage-dir", str(store)],
                                       capture_output=True, text=True, timeout=60)
    out = run("stats", "--json")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["artifacts"] == 4 and figures["bytes"] == sum(len(b) for _, b in blobs)
    out = run("gc", "--max-storage", str(2 * disk_cost(len(blobs[0][1])) + 100))
    assert out.returncode == 0 and "evicted 2 entries" in out.stdout
    assert json.loads(run("stats", "--json").stdout)["artifacts"] == 2
    assert (store / "tmp" / "upload-in-flight.part").exists()  # maintenance leaves uploads alone
    missing = run("gc")
    assert missing.returncode == 2 and "--max-storage" in missing.stderr
    assert "2 artifacts" in run("stats").stdout


def test_gc_refuses_beside_a_live_server_on_the_same_storage(tmp_path):
    from support import ServerProcess

    store = tmp_path / "store"
    server = ServerProcess(store, tmp_path / "server.log")
    try:
        blobs = [artifact(tmp_path, f"g{i}") for i in range(3)]
        for key, blob in blobs:
            assert request(server.port, "PUT", f"/v1/artifacts/{key}", blob)[0] == 201
        out = subprocess.run([sys.executable, "-m", "polykit_cache", "gc", "--storage-dir", str(store), "--max-storage", "1"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "a polykit-cache server is serving" in out.stderr
        assert all(request(server.port, "HEAD", f"/v1/artifacts/{key}")[0] == 200 for key, _ in blobs)
        assert json.loads(request(server.port, "GET", "/v1/stats")[2])["artifacts"] == 3
    finally:
        server.stop()
    out = subprocess.run([sys.executable, "-m", "polykit_cache", "gc", "--storage-dir", str(store), "--max-storage", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "evicted 3 entries" in out.stdout  # once the server has stopped


def test_stats_and_verify_never_evict_even_with_a_bound_in_the_environment(tmp_path):
    store = tmp_path / "store"
    app = new_app(store)
    blobs = [artifact(tmp_path, f"s{i}") for i in range(3)]
    for key, blob in blobs:
        call(app, "PUT", f"/v1/artifacts/{key}", blob)
    env = {**os.environ, "POLYKIT_CACHE_MAX_STORAGE": "1"}
    for command in (["stats", "--json"], ["verify"]):
        out = subprocess.run([sys.executable, "-m", "polykit_cache", *command, "--storage-dir", str(store)],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
    assert all(stored(app, key) for key, _ in blobs)
