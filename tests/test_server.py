"""The real waitress server on a loopback port: the wire, concurrency, crashes and big artifacts."""

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from polykit_client import artifact
from support import KEY, ServerProcess, key_for, pack_tree, race_uploads, request, running_server, sha, thread_server

ART = f"/v1/artifacts/{KEY}"


def test_round_trip_over_a_socket(tmp_path):
    blob = pack_tree(tmp_path, {"dist/app.js": os.urandom(70_000)})
    with thread_server(tmp_path / "store") as (port, _):
        status, _, body = request(port, "PUT", ART, blob)
        assert status == 201, body
        status, headers, body = request(port, "GET", ART)
        assert status == 200 and body == blob
        assert headers["x-artifact-hash"] == sha(blob) and headers["content-length"] == str(len(blob))
        status, headers, body = request(port, "HEAD", ART)
        assert status == 200 and body == b"" and headers["content-length"] == str(len(blob))
        status, _, body = request(port, "PUT", ART, blob)
        assert status == 409 and json.loads(body)["error"] == "exists"
        status, _, body = request(port, "GET", "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_over_limit_is_a_json_413_from_the_headers_alone(tmp_path):
    with thread_server(tmp_path / "store", max_artifact_size=1000) as (port, _):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("PUT", ART)
        conn.putheader("Content-Length", str(10 << 30))  # 10 GiB promised, none sent
        conn.endheaders()
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 413
        assert resp.getheader("Content-Type") == "application/json"
        assert body["error"] == "too_large" and body["limit"] == 1000 and "1000 bytes" in body["message"]
        # A body of exactly the limit passes waitress's check (it refuses at >= its setting).
        status, _, body = request(port, "PUT", ART, b"x" * 1000)
        assert status == 422  # reached the application, which verified it


def test_a_malformed_request_gets_a_json_400_and_the_server_keeps_serving(tmp_path):
    with thread_server(tmp_path / "store") as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"PUT /v1/artifacts/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400")
        assert json.loads(body)["error"] == "bad_request"
        assert request(port, "GET", "/healthz")[0] == 200


def test_eight_concurrent_uploads_of_one_key_give_exactly_one_201(tmp_path):
    blobs = [pack_tree(tmp_path / str(i), {"a": os.urandom(300_000)}) for i in range(8)]
    with thread_server(tmp_path / "store", threads=8) as (port, _):
        statuses = race_uploads(port, ART, blobs)
        assert sorted(statuses) == [201] + [409] * 7
        winner = blobs[statuses.index(201)]
        assert request(port, "GET", ART)[2] == winner
    assert not any((tmp_path / "store" / "tmp").iterdir())


def stream_upload(port: int, path: str, file: Path) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300, blocksize=256 * 1024)
    try:
        with open(file, "rb") as fh:
            conn.request("PUT", path, body=fh, headers={"Content-Length": str(file.stat().st_size)})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def stream_download(port: int, path: str) -> tuple[int, str, str]:
    """Download without keeping the body: (size, sha256 of the body, X-Artifact-Hash)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        digest, size = hashlib.sha256(), 0
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest(), resp.getheader("X-Artifact-Hash")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def big_artifact(tmp_path_factory):
    """A 300 MiB incompressible artifact on disk (never in memory)."""
    root = tmp_path_factory.mktemp("big")
    src = root / "src"
    (src / "dist").mkdir(parents=True)
    with open(src / "dist" / "blob.bin", "wb") as fh:
        for _ in range(300):
            fh.write(os.urandom(1 << 20))
    key = key_for("big")
    out = root / "big.zst"
    with open(out, "wb") as fh:
        artifact.pack(fh, src, ["dist"], {"package": "big", "task": "build"}, log=b"", cache_key=key)
    (src / "dist" / "blob.bin").unlink()
    return key, out


def test_a_300_mib_artifact_round_trips_with_flat_server_memory(tmp_path, big_artifact):
    key, blob = big_artifact
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log")
    try:
        path = f"/v1/artifacts/{key}"
        assert stream_upload(server.port, path, blob) == 201
        size, digest, claimed = stream_download(server.port, path)
        expected = hashlib.sha256(blob.read_bytes()).hexdigest()
        assert size == blob.stat().st_size and digest == expected == claimed
        assert (tmp_path / "store" / key[:2] / key[2:4] / f"{key}.zst").read_bytes() == blob.read_bytes()
        peak = server.peak_rss_kib()
        assert peak < 100 * 1024, f"server peak RSS {peak} KiB"
    finally:
        server.stop()


def _open_files_in(pid: int, folder: Path) -> list[str]:
    """The files of ``folder`` a process has open, named or not (``/proc/<pid>/fd``)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{folder}/"):
            found.append(target)
    return found


def test_sigkill_during_an_upload_leaves_nothing_and_the_key_can_be_uploaded_again(tmp_path, big_artifact):
    key, blob = big_artifact
    store = tmp_path / "store"
    path = f"/v1/artifacts/{key}"
    server = ServerProcess(store, tmp_path / "server.log")
    uploader = threading.Thread(target=lambda: _ignore_errors(stream_upload, server.port, path, blob), daemon=True)
    uploader.start()
    # The body is written as it arrives into the store's temporary file (an unnamed file in tmp/,
    # seen among the server's open files); kill once it is open, in the middle of the upload.
    deadline = time.monotonic() + 60
    while not _open_files_in(server.proc.pid, store / "tmp"):
        assert time.monotonic() < deadline, "the upload never reached the application"
        time.sleep(0.005)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    server.log.close()
    uploader.join(30)
    assert not (store / key[:2] / key[2:4] / f"{key}.zst").exists()

    restarted = ServerProcess(store, tmp_path / "server2.log")
    try:
        assert not any((store / "tmp").iterdir()), "stale temporary files survived the restart"
        assert request(restarted.port, "HEAD", path)[0] == 404
        assert stream_upload(restarted.port, path, blob) == 201
        assert request(restarted.port, "HEAD", path)[0] == 200
    finally:
        restarted.stop()


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass


def test_sigterm_stops_the_server_cleanly(tmp_path):
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log")
    assert request(server.port, "GET", "/healthz")[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    server.log.close()
    assert "stopped" in (tmp_path / "server.log").read_text()


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server still sends, until it closes the connection (bounded generously)."""
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_closing_the_server_closes_an_idle_kept_alive_connection(tmp_path):
    # A client keeps connections alive between requests; an idle one must not hold the stop up
    # until the idle timeout (60 s by default).
    with running_server(tmp_path / "store", idle_timeout=3600) as (server, thread):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Connection") is None  # kept alive
        resp.read()
        server.close()
        thread.join(60)
        assert not thread.is_alive(), "the server still runs after its drain bound"
        assert _read_to_eof(conn.sock) == b""  # closed by the server, nothing more sent
        conn.close()


def test_closing_the_server_lets_a_request_in_progress_finish(tmp_path):
    blob = pack_tree(tmp_path, {"dist/app.js": os.urandom(50_000)})
    with running_server(tmp_path / "store") as (server, thread):
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"PUT {ART} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(blob)}\r\n\r\n".encode()
                         + blob[:1000])
            server.close()
            with pytest.raises(OSError):  # no new connection is taken once it stops
                for _ in range(100):  # the I/O thread closes the listening socket at its next turn
                    socket.create_connection(("127.0.0.1", server.port), timeout=60).close()
                    time.sleep(0.05)
            sock.sendall(blob[1000:])
            answer = _read_to_eof(sock)
        thread.join(60)
        assert not thread.is_alive()
    assert answer.startswith(b"HTTP/1.1 201 ") and b"\r\nConnection: close\r\n" in answer


def test_a_request_that_never_finishes_cannot_hold_the_stop_up(tmp_path):
    with running_server(tmp_path / "store", drain_seconds=0.2) as (server, thread):
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"PUT {ART} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf".encode())
            server.close()
            thread.join(60)
            assert not thread.is_alive(), "a half-sent upload held the server past its drain bound"
            try:
                answer = _read_to_eof(sock)
            except ConnectionResetError:
                answer = b""
    assert answer == b""  # closed unanswered: nothing of the upload was stored
    assert not list((tmp_path / "store").rglob("*.zst"))


def test_sigterm_drains_a_request_in_progress_and_idle_connections(tmp_path):
    blob = pack_tree(tmp_path, {"dist/app.js": os.urandom(50_000)})
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log")
    try:
        idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        idle.request("GET", "/healthz")
        idle.getresponse().read()
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"PUT {ART} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(blob)}\r\n\r\n".encode()
                         + blob[:1000])
            server.proc.send_signal(signal.SIGTERM)
            for _ in range(600):  # until the server says it stops (bounded: 30 s)
                if "stopping: no new connections" in server.log_path.read_text():
                    break
                time.sleep(0.05)
            assert _read_to_eof(idle.sock) == b""  # the idle connection is closed at once
            sock.sendall(blob[1000:])
            answer = _read_to_eof(sock)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 201 ") and b"\r\nConnection: close\r\n" in answer
    assert request_status_after_restart(tmp_path) == 200


def request_status_after_restart(tmp_path) -> int:
    """The upload that finished during the drain is stored: a new server on the same folder serves it."""
    with thread_server(tmp_path / "store") as (port, _):
        return request(port, "GET", ART)[0]


def test_start_up_logs_the_settings_and_an_access_line_per_request(tmp_path):
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log", "--max-size", "5M")
    try:
        request(server.port, "GET", f"/v1/artifacts/{KEY}")
    finally:
        server.stop()
    text = (tmp_path / "server.log").read_text()
    assert f"max_artifact_size={5 << 20}" in text
    assert "no access tokens are configured" in text
    assert f'"GET /v1/artifacts/{KEY} HTTP/1.1" 404' in text


def test_json_access_log_shows_the_client_behind_a_trusted_proxy_and_no_token(tmp_path):
    forwarded = {"X-Forwarded-For": "203.0.113.7", "Authorization": "Bearer very-secret-token-1"}
    trusting = ServerProcess(tmp_path / "s1", tmp_path / "trusting.log", "--access-log-format", "json",
                             "--trusted-proxy", "127.0.0.1")
    plain = ServerProcess(tmp_path / "s2", tmp_path / "plain.log")
    try:
        request(trusting.port, "GET", f"/v1/artifacts/{KEY}", headers=forwarded)
        request(plain.port, "GET", f"/v1/artifacts/{KEY}", headers=forwarded)
    finally:
        trusting.stop()
        plain.stop()
    lines = [json.loads(line) for line in (tmp_path / "trusting.log").read_text().splitlines() if line.startswith("{")]
    entry = [e for e in lines if e["path"] == f"/v1/artifacts/{KEY}"][0]
    assert entry["remote"] == "203.0.113.7" and entry["status"] == 404 and entry["method"] == "GET"
    assert isinstance(entry["duration_ms"], float)
    plain_log = (tmp_path / "plain.log").read_text()
    assert '127.0.0.1 - - [' in plain_log and "203.0.113.7" not in plain_log  # untrusted headers are dropped
    for log in (tmp_path / "trusting.log", tmp_path / "plain.log"):
        assert "very-secret-token-1" not in log.read_text()


def test_access_log_off(tmp_path):
    server = ServerProcess(tmp_path / "s", tmp_path / "server.log", "--access-log-format", "off")
    try:
        request(server.port, "GET", "/healthz")
    finally:
        server.stop()
    assert "/healthz" not in (tmp_path / "server.log").read_text()
