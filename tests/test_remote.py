"""The client's remote cache backend against the real server, and against small broken servers.

The broken servers are fixtures that imitate failures the real one should never produce (a 500,
a corrupt body, a hang, a dropped connection); they listen on 127.0.0.1 only and stop at the
end of each test.
"""

import http.server
import io
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from polykit_client.remote import BadRemoteURL, RemoteCache, default_warn
from support import KEY, OTHER_KEY, key_for, pack_tree, request, serve_handler, sha, thread_server

TOKEN = "s3cret-Token.value"


def remote_for(port: int, warnings: list, **options) -> RemoteCache:
    return RemoteCache(f"http://127.0.0.1:{port}", warn=warnings.append, **options)


def artifact_file(tmp_path: Path, key: str = KEY, size: int = 50_000) -> tuple[Path, bytes]:
    blob = pack_tree(tmp_path, {"dist/app.js": os.urandom(size)}, key=key)
    path = tmp_path / f"{key}.zst"
    path.write_bytes(blob)
    return path, blob


def puts(app) -> int:
    return sum(n for (_, method, _), n in app.metrics.requests.items() if method == "PUT")


# --- fixtures imitating broken servers --------------------------------------------------------


@contextmanager
def fake_server(respond):
    """A stdlib HTTP server; ``respond(handler)`` answers every request, all are recorded."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_one_request(self):
            try:
                super().handle_one_request()
            except (ConnectionError, TimeoutError):
                self.close_connection = True

        def answer(self):
            self.server.seen.append((self.command, self.path, dict(self.headers)))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            respond(self)

        do_GET = do_HEAD = do_PUT = answer

        def log_message(self, *args):
            pass

    with serve_handler(Handler, seen=[]) as server:
        yield server


def send(handler, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def send_json(handler, status: int, payload: dict):
    send(handler, status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


@contextmanager
def counting_listener(accept: bool = True):
    """A bare listening socket: counts connections and drops them (or never accepts at all)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.05)
    accepted = [0]
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted[0] += 1
            conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    if accept:
        thread.start()
    try:
        yield sock.getsockname()[1], accepted
    finally:
        stop.set()
        if accept:
            thread.join(5)
        sock.close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- against the real server ------------------------------------------------------------------


def test_store_then_fetch_round_trip(tmp_path):
    path, blob = artifact_file(tmp_path, size=700_000)  # several 256 KiB chunks each way
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings)
        assert remote.exists(KEY) is False
        up: list = []
        assert remote.store(KEY, path, progress=lambda done, total: up.append((done, total))) is True
        assert remote.exists(KEY) is True
        down: list = []
        dest = io.BytesIO()
        assert remote.fetch(KEY, dest, progress=lambda done, total: down.append((done, total))) is True
        assert dest.getvalue() == blob
        assert (remote.bytes_up, remote.bytes_down) == (len(blob), len(blob))
        assert up[-1] == (len(blob), len(blob)) and down[-1] == (len(blob), len(blob))
        assert len(down) > 1
        assert app.metrics.stats()["uploads"] == 1
        assert app.storage.lookup(KEY).sha256 == sha(blob)
    assert warnings == []


def test_a_miss_is_silent(tmp_path):
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings)
        dest = io.BytesIO()
        assert remote.fetch(KEY, dest) is False
        assert remote.exists(KEY) is False
        assert dest.getvalue() == b"" and remote.bytes_down == 0
        assert app.metrics.requests[("polykit", "GET", 404)] == 1
    assert warnings == [] and remote.enabled


def test_storing_what_the_server_has_sends_no_body(tmp_path):
    path, _ = artifact_file(tmp_path)
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings)
        assert remote.store(KEY, path) is True
        assert remote.store(KEY, path) is False  # HEAD found it: no second PUT at all
        assert puts(app) == 1 and remote.bytes_up == path.stat().st_size
    assert warnings == []


def test_a_409_from_a_concurrent_upload_is_silent(tmp_path):
    """Another machine uploads between our HEAD and our PUT: first write wins, we say nothing."""
    path, blob = artifact_file(tmp_path, size=600_000)
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings)
        raced: list = []

        def other_machine_first(done, total):
            if not raced:  # the HEAD has answered 404; our body is being sent now
                raced.append(request(port, "PUT", f"/v1/artifacts/{KEY}", blob)[0])

        assert remote.store(KEY, path, progress=other_machine_first) is False
        assert raced == [201]
        assert app.metrics.requests[("polykit", "PUT", 409)] == 1
        assert remote.bytes_up == 0 and remote.enabled
    assert warnings == []


def test_read_only_never_uploads(tmp_path):
    path, blob = artifact_file(tmp_path)
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        reader = remote_for(port, warnings, read_only=True)
        assert reader.store(KEY, path) is False
        assert sum(app.metrics.requests.values()) == 0  # not even a HEAD
        assert request(port, "PUT", f"/v1/artifacts/{KEY}", blob)[0] == 201
        dest = io.BytesIO()
        assert reader.fetch(KEY, dest) is True and dest.getvalue() == blob
        stats = json.loads(request(port, "GET", "/v1/stats")[2])
        assert stats["uploads"] == 1  # the direct one only
        assert puts(app) == 1
    assert warnings == []


def test_over_the_client_size_limit_is_skipped_without_network(tmp_path):
    path, blob = artifact_file(tmp_path)
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings, max_artifact_size=len(blob) - 1)
        assert remote.store(KEY, path) is False
        assert sum(app.metrics.requests.values()) == 0
        exact = remote_for(port, warnings, max_artifact_size=len(blob))
        assert exact.store(KEY, path) is True  # exactly the limit is allowed, as on the server
    assert len(warnings) == 1
    assert "max_artifact_size" in warnings[0] and str(len(blob)) in warnings[0]


def test_a_download_over_the_client_size_limit_is_refused(tmp_path):
    path, blob = artifact_file(tmp_path)
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        assert remote_for(port, warnings).store(KEY, path) is True
        small = remote_for(port, warnings, max_artifact_size=100)
        assert small.fetch(KEY, io.BytesIO()) is False
    assert len(warnings) == 1 and "max_artifact_size" in warnings[0] and "built locally" in warnings[0]


@pytest.mark.parametrize("size", [3_000, 6_000_000], ids=["small", "large"])
def test_a_server_side_413_warns_and_does_not_hang(tmp_path, size):
    """The large body is refused from its headers and the connection closed while we send."""
    path, _ = artifact_file(tmp_path, size=size)
    warnings: list = []
    with thread_server(tmp_path / "store", max_artifact_size=1000) as (port, app):
        remote = remote_for(port, warnings, timeout=5)
        started = time.monotonic()
        assert remote.store(KEY, path) is False
        assert time.monotonic() - started < 4
        assert app.storage.lookup(KEY) is None
    assert len(warnings) == 1, warnings
    assert "HTTP 413 too_large" in warnings[0] and "artifact size limit" in warnings[0]
    assert remote.enabled  # a refusal is not a network failure


def test_a_422_warns_with_the_servers_message(tmp_path):
    junk = tmp_path / "junk.zst"
    junk.write_bytes(b"this is not an artifact" * 100)
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings)
        assert remote.store(KEY, junk) is False
        assert app.metrics.requests[("polykit", "PUT", 422)] == 1  # a refusal is not retried
    assert len(warnings) == 1
    assert "HTTP 422 verification_failed: The artifact was refused" in warnings[0]
    assert "\n" not in warnings[0] and f"127.0.0.1:{port}" in warnings[0]


def test_concurrent_stores_from_threads(tmp_path):
    keys = [key_for(str(i)) for i in range(6)]
    paths = [artifact_file(tmp_path / str(i), key=k, size=100_000)[0] for i, k in enumerate(keys)]
    warnings: list = []
    with thread_server(tmp_path / "store") as (port, app):
        remote = remote_for(port, warnings)
        results: list = [None] * len(keys)

        def upload(i):
            results[i] = remote.store(keys[i], paths[i])

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(keys))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [True] * len(keys)
        assert remote.bytes_up == sum(p.stat().st_size for p in paths)
        assert app.metrics.stats()["uploads"] == len(keys)
    assert warnings == []


# --- tokens and URLs --------------------------------------------------------------------------


def test_the_token_is_sent_and_never_shown(tmp_path):
    path, _ = artifact_file(tmp_path)

    def respond(handler):
        if handler.command == "PUT":
            send_json(handler, 201, {"key": KEY})
        else:
            send_json(handler, 404, {"error": "not_found", "message": "no"})

    with fake_server(respond) as server:
        warnings: list = []
        remote = RemoteCache(f"http://127.0.0.1:{server.server_port}/team/cache/", token=TOKEN + "\n",
                             warn=warnings.append)
        assert remote.store(KEY, path) is True
        assert [(m, p) for m, p, _ in server.seen] == [
            ("HEAD", f"/team/cache/v1/artifacts/{KEY}"), ("PUT", f"/team/cache/v1/artifacts/{KEY}")]
        assert {h.get("Authorization") for _, _, h in server.seen} == {f"Bearer {TOKEN}"}
        put_headers = server.seen[1][2]
        assert put_headers["Content-Length"] == str(path.stat().st_size)
        assert put_headers["X-Artifact-Hash"] == sha(path.read_bytes())
        assert TOKEN not in repr(remote) and warnings == []

    def refuse(handler):
        send_json(handler, 401, {"error": "unauthorized", "message": "bad token"})

    with fake_server(refuse) as server:
        remote = RemoteCache(f"http://127.0.0.1:{server.server_port}", token=TOKEN, warn=warnings.append,
                             max_failures=1)
        assert remote.fetch(KEY, io.BytesIO()) is False
        assert remote.store(KEY, path) is False
        assert len(server.seen) == 2  # a 4xx is not retried, nor counted as a network failure
    remote = RemoteCache(f"http://127.0.0.1:{unused_port()}", token=TOKEN, warn=warnings.append, retries=0,
                         max_failures=1)
    assert remote.exists(KEY) is False
    assert len(warnings) == 4
    assert "HTTP 401 unauthorized: bad token" in warnings[0]
    assert all(TOKEN not in w for w in warnings), warnings


def test_a_token_that_cannot_be_a_header_is_refused_without_echoing_it():
    with pytest.raises(ValueError) as err:
        RemoteCache("http://127.0.0.1:1", token="abc\r\nX-Evil: 1")
    assert "abc" not in str(err.value) and "Evil" not in str(err.value)


@pytest.mark.parametrize("url", ["ftp://x", "http://", "not a url", "", "http://host:99999",
                                 "http://host/cache?x=1", "https://:8080"])
def test_a_bad_url_is_refused_by_name(url):
    with pytest.raises(BadRemoteURL) as err:
        RemoteCache(url)
    assert repr(url) in str(err.value)


def test_credentials_in_the_url_are_refused_and_not_repeated():
    with pytest.raises(BadRemoteURL) as err:
        RemoteCache("http://me:hunter2@cache.example:8080")
    assert "hunter2" not in str(err.value) and "cache.example" in str(err.value)


def test_a_key_that_is_not_a_sha256_is_a_programming_error(tmp_path):
    remote = RemoteCache("http://127.0.0.1:1")
    for bad in ("AB" * 32, "ab" * 31, "../" + "a" * 61):
        with pytest.raises(ValueError):
            remote.exists(bad)
        with pytest.raises(ValueError):
            remote.fetch(bad, io.BytesIO())
        with pytest.raises(ValueError):
            remote.store(bad, tmp_path / "x")


def test_default_warn_prints_one_warning_line(capsys):
    default_warn("remote cache http://h:1 is slow")
    assert capsys.readouterr().err == "warning: remote cache http://h:1 is slow\n"


# --- failures, retries and the circuit breaker ------------------------------------------------


def test_a_stopped_server_warns_once_per_operation_then_switches_off(tmp_path):
    path, _ = artifact_file(tmp_path)
    port = unused_port()
    warnings: list = []
    remote = remote_for(port, warnings, retries=1, max_failures=3)
    assert remote.exists(KEY) is False
    assert remote.fetch(KEY, io.BytesIO()) is False
    assert len(warnings) == 2 and remote.enabled
    assert remote.store(KEY, path) is False
    assert remote.enabled is False
    assert len(warnings) == 4
    assert all(f"http://127.0.0.1:{port}" in w and "\n" not in w for w in warnings)
    assert "connection refused" in warnings[0]
    assert "built locally" in warnings[1]
    assert warnings[3] == f"remote cache http://127.0.0.1:{port} switched off for the rest of this run after 3 failures"
    started = time.monotonic()
    for _ in range(20):
        assert remote.exists(OTHER_KEY) is False
        assert remote.fetch(OTHER_KEY, io.BytesIO()) is False
        assert remote.store(OTHER_KEY, path) is False
    assert time.monotonic() - started < 0.1
    assert len(warnings) == 4


def test_once_switched_off_no_connection_is_attempted(tmp_path):
    path, _ = artifact_file(tmp_path)
    warnings: list = []
    with counting_listener() as (port, accepted):
        remote = remote_for(port, warnings, retries=1, max_failures=2)
        assert remote.exists(KEY) is False
        assert remote.fetch(KEY, io.BytesIO()) is False
        assert remote.enabled is False
        assert wait_for(lambda: accepted[0] == 4)  # two operations, each tried twice
        for _ in range(5):
            remote.exists(KEY), remote.fetch(KEY, io.BytesIO()), remote.store(KEY, path)
        time.sleep(0.2)
        assert accepted[0] == 4
    assert len(warnings) == 3 and "switched off" in warnings[-1]


def test_a_success_resets_the_failure_count():
    broken = [True]

    def respond(handler):
        if broken[0]:
            send_json(handler, 503, {"error": "unavailable", "message": "restarting"})
        else:
            send(handler, 404)

    warnings: list = []
    with fake_server(respond) as server:
        remote = remote_for(server.server_port, warnings, retries=0, max_failures=3)
        assert remote.exists(KEY) is False and remote.exists(KEY) is False
        broken[0] = False
        assert remote.exists(KEY) is False  # a clean miss: the server is back
        broken[0] = True
        assert remote.exists(KEY) is False and remote.exists(KEY) is False
        assert remote.enabled
        assert remote.exists(KEY) is False
        assert remote.enabled is False
    assert len(warnings) == 6 and "HTTP 503" in warnings[0]


def test_a_500_is_retried_then_warned(tmp_path):
    def respond(handler):
        send_json(handler, 500, {"error": "internal_error", "message": "disk on fire"})

    warnings: list = []
    with fake_server(respond) as server:
        remote = remote_for(server.server_port, warnings, retries=2)
        started = time.monotonic()
        assert remote.fetch(KEY, io.BytesIO()) is False
        assert time.monotonic() - started < 1.5
        assert [m for m, _, _ in server.seen] == ["GET"] * 3
    assert len(warnings) == 1
    assert "HTTP 500 internal_error: disk on fire" in warnings[0] and "built locally" in warnings[0]


def test_a_body_with_the_wrong_hash_is_refused_and_not_retried():
    data = b"z" * 5000

    def respond(handler):
        send(handler, 200, data, {"X-Artifact-Hash": sha(b"something else")})

    warnings: list = []
    with fake_server(respond) as server:
        remote = remote_for(server.server_port, warnings)
        assert remote.fetch(KEY, io.BytesIO()) is False
        assert len(server.seen) == 1
    assert remote.bytes_down == 0 and remote.enabled
    assert len(warnings) == 1 and "X-Artifact-Hash" in warnings[0] and "built locally" in warnings[0]


def test_a_body_cut_short_is_retried_from_the_start_then_refused():
    data = os.urandom(1000)

    def respond(handler):
        send(handler, 200, data[:400], {"X-Artifact-Hash": sha(data)}, length=len(data))
        handler.close_connection = True

    warnings: list = []
    with fake_server(respond) as server:
        remote = remote_for(server.server_port, warnings, retries=2)
        dest = io.BytesIO()
        dest.write(b"kept")  # the caller's own bytes before the download are left alone
        assert remote.fetch(KEY, dest) is False
        assert len(server.seen) == 3
        assert dest.getvalue() == b"kept" + data[:400]  # rewound before each retry
    assert len(warnings) == 1 and "400 of 1000 bytes" in warnings[0]


def test_an_answer_without_a_hash_is_not_trusted():
    def respond(handler):
        send(handler, 200, b"x" * 10)

    warnings: list = []
    with fake_server(respond) as server:
        assert remote_for(server.server_port, warnings).fetch(KEY, io.BytesIO()) is False
    assert len(warnings) == 1 and "X-Artifact-Hash" in warnings[0]


def test_a_server_that_never_answers_times_out():
    warnings: list = []
    with counting_listener(accept=False) as (port, _):
        remote = remote_for(port, warnings, timeout=0.3, retries=0)
        started = time.monotonic()
        assert remote.fetch(KEY, io.BytesIO()) is False
        assert time.monotonic() - started < 2
    assert len(warnings) == 1 and "no answer within 0.3 s" in warnings[0]


def test_a_redirect_is_not_followed_and_says_where_it_points():
    def respond(handler):
        send(handler, 301, headers={"Location": "https://cache.example/"})

    warnings: list = []
    with fake_server(respond) as server:
        assert remote_for(server.server_port, warnings).exists(KEY) is False
        assert len(server.seen) == 1
    assert len(warnings) == 1 and "HTTP 301" in warnings[0] and "https://cache.example/" in warnings[0]
