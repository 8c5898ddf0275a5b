"""The connection layer on a real waitress server on 127.0.0.1: refusals before the body, bounded
connections, a full spool disk, and waitress's own answers seen by metrics and the access log.

Every socket has a timeout, every loop a bound; nothing asserts on durations.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time

import pytest

from contextlib import contextmanager

from polykit_cache import channel
from polykit_cache.app import HTTPError, make_app
from polykit_cache.auth import Access
from polykit_cache.config import Config
from polykit_cache.server import Server
from polykit_cache.storage import Storage
from support import KEY, ServerProcess, new_app, pack_tree, request, thread_server

TOKEN = "writer-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ART = f"/v1/artifacts/{KEY}"
MIB = 1 << 20


def token_settings(tmp_path) -> dict:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read-write {TOKEN}\n")
    return {"token_file": tokens}


@contextmanager
def running(app, config: Config):
    """The real server around ``app`` on a free loopback port, in a thread: yields the port."""
    server = Server(app, config)
    thread = threading.Thread(target=server.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield server.port
    finally:
        server.close()
        thread.join(10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_answer(sock: socket.socket) -> tuple[bytes, dict, bytes]:
    """One HTTP answer from a raw socket: (status line, headers in lower case, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
        assert len(data) < MIB
    head, _, body = data.partition(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (line.partition(b":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of an answer"
        body += chunk
    return first, headers, body


def wait_closed(sock: socket.socket) -> bool:
    """True once the server closed the connection (reads until EOF; bounded by the timeout)."""
    try:
        for _ in range(10_000):
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    return False


def put_head(path: str, length: int, headers: dict | None = None, expect: bool = False) -> bytes:
    lines = [f"PUT {path} HTTP/1.1", "Host: cache", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- refusals decided by the head ---------------------------------------------------------------


def test_expect_continue_gets_the_refusal_not_an_invitation(tmp_path):
    with thread_server(tmp_path / "store", max_artifact_size=MIB, **token_settings(tmp_path)) as (port, _):
        cases = [
            (put_head(ART, 50 * MIB, AUTH, expect=True), b"413", "too_large"),
            (put_head(ART, 1000, expect=True), b"401", "unauthorized"),
            (put_head("/nowhere/at/all", 1000, AUTH, expect=True), b"404", "not_found"),
        ]
        for head, status, word in cases:
            with connect(port) as sock:
                sock.sendall(head)
                first, headers, body = read_answer(sock)
                assert first.startswith(b"HTTP/1.1 " + status), first
                assert json.loads(body)["error"] == word
                assert headers["connection"] == "close"
        # Within the limit and with a token, the body is invited as before.
        with connect(port) as sock:
            sock.sendall(put_head(ART, 1000, AUTH, expect=True))
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")


def test_a_refusal_comes_in_the_protocol_error_shape(tmp_path):
    with thread_server(tmp_path / "store", **token_settings(tmp_path)) as (port, _):
        with connect(port) as sock:
            sock.sendall(put_head("/v8/artifacts/abc123", 1000, expect=True))
            first, _, body = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 401")
        assert json.loads(body)["error"]["code"] == "unauthorized"  # turbo's {"error": {"code", "message"}}
        with connect(port) as sock:
            sock.sendall(put_head("/v1/cache/abc123", 1000, expect=True))
            first, headers, body = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 401") and headers["content-type"].startswith("text/plain")  # Nx


def chunked_put(port: int, path: str, body: bytes, headers: dict) -> tuple[bytes, bytes]:
    """PUT ``body`` chunked over a raw socket (waitress spools it itself); (status line, answer body)."""
    with connect(port) as sock:
        lines = [f"PUT {path} HTTP/1.1", "Host: cache", "Transfer-Encoding: chunked"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for start in range(0, len(body), MIB):
            piece = body[start:start + MIB]
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        first, _, answer = read_answer(sock)
    return first, answer


def test_unauthenticated_bodies_never_reach_the_spool(tmp_path, monkeypatch):
    """With the spool folder missing, any body that waitress spooled would fail there (a 500, as
    the chunked control upload shows); a refused body is never spooled, nor written to the store
    (which takes admitted bodies with a length), so its answer stays a 401."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-spool"))
    body = b"\0" * (3 * MIB)  # well over waitress's 512 KiB kept in memory
    with thread_server(tmp_path / "store", **token_settings(tmp_path)) as (port, app):
        spooled = []
        store_spool = app.storage.spool
        monkeypatch.setattr(app.storage, "spool", lambda: spooled.append(1) or store_spool())
        status, _, answer = request(port, "PUT", ART, body)  # http.client sends it all, then reads
        assert status == 401 and json.loads(answer)["error"] == "unauthorized"
        status, _, answer = request(port, "PUT", "/kv/gradle/entry", body, {"Authorization": "Bearer wrong-token-1"})
        assert status == 401
        status, _, answer = request(port, "POST", "/no/route", body, AUTH)
        assert status == 404
        assert spooled == []
        first, answer = chunked_put(port, ART, body, AUTH)  # control: this one is spooled by waitress
        assert first.startswith(b"HTTP/1.1 500") and json.loads(answer)["error"] == "internal_error"
        status, _, answer = request(port, "PUT", ART, body, AUTH)  # control: written into the store
        assert status == 422 and spooled == [1]
        assert app.storage.lookup(KEY) is None


def test_the_refused_body_is_dropped_then_the_connection_closes(tmp_path):
    with thread_server(tmp_path / "store", **token_settings(tmp_path)) as (port, _):
        with connect(port) as sock:
            sock.sendall(put_head(ART, 4 * MIB))
            first, _, _ = read_answer(sock)  # answered before any of the body
            assert first.startswith(b"HTTP/1.1 401")
            sock.sendall(b"\0" * (4 * MIB))  # read and dropped, no reset while it is sent
            assert wait_closed(sock)
        assert request(port, "GET", "/healthz")[0] == 200


def test_a_refusal_without_a_body_keeps_the_connection(tmp_path):
    with thread_server(tmp_path / "store", **token_settings(tmp_path)) as (port, _):
        with connect(port) as sock:
            sock.sendall(f"GET {ART} HTTP/1.1\r\nHost: cache\r\n\r\n".encode())
            first, headers, _ = read_answer(sock)
            assert first.startswith(b"HTTP/1.1 401") and headers.get("connection") != "close"
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: cache\r\n\r\n")
            first, _, body = read_answer(sock)
            assert first.startswith(b"HTTP/1.1 200") and json.loads(body) == {"status": "ok"}


def test_a_full_spool_disk_is_a_json_507(tmp_path, small_tmpfs, monkeypatch):
    """waitress's own spool (a chunked body) on a full disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_tmpfs))
    with thread_server(tmp_path / "store") as (port, app):
        first, body = chunked_put(port, ART, b"\0" * (3 * MIB), {})
        assert first.startswith(b"HTTP/1.1 507") and json.loads(body)["error"] == "storage_full"
        assert request(port, "GET", "/healthz")[0] == 200
        assert app.metrics.requests[("polykit", "PUT", 507)] == 1
        fs = os.statvfs(small_tmpfs)
        assert fs.f_bfree == fs.f_blocks  # the spool file was closed (and so freed) before the answer


def test_the_server_asks_the_admit_callable_it_is_given(tmp_path):
    """The seam between the connection layer and the application: one callable judging heads."""
    seen = []

    def admit(environ: dict) -> HTTPError | None:
        seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("HTTP_X_TEAM")))
        if environ.get("HTTP_X_TEAM") != "blue":
            return HTTPError(403, "forbidden", "Only the blue team may use this cache.")
        return None

    app = new_app(tmp_path / "store")
    server = Server(app, Config(storage_dir=tmp_path / "store", port=0), admit=admit)
    thread = threading.Thread(target=server.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        status, _, body = request(server.port, "PUT", "/kv/gradle/a", b"x" * 10, {"X-Team": "red"})
        assert status == 403 and json.loads(body)["error"] == "forbidden"
        assert request(server.port, "PUT", "/kv/gradle/a", b"x" * 10, {"X-Team": "blue"})[0] == 201
    finally:
        server.close()
        thread.join(10)
    assert seen == [("PUT", "/kv/gradle/a", "red"), ("PUT", "/kv/gradle/a", "blue")]
    assert app.metrics.requests[("kv", "PUT", 403)] == 1


# --- connections ---------------------------------------------------------------------------------


def test_idle_and_half_sent_connections_do_not_lock_others_out(tmp_path):
    with thread_server(tmp_path / "store", max_connections=10, **token_settings(tmp_path)) as (port, _):
        blob = pack_tree(tmp_path, {"a.bin": os.urandom(300_000)})  # incompressible: 100 KB is a third
        upload = connect(port)  # an upload in progress is kept over idle connections
        upload.sendall(put_head(ART, len(blob), AUTH) + blob[:100_000])
        idle = []
        try:
            for _ in range(30):
                sock = connect(port)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
                idle.append(sock)
            assert request(port, "GET", "/healthz", timeout=10)[0] == 200
            upload.sendall(blob[100_000:])
            first, _, body = read_answer(upload)
            assert first.startswith(b"HTTP/1.1 201"), body
            assert wait_closed(idle[0])  # the oldest half-sent ones made room
        finally:
            upload.close()
            for sock in idle:
                sock.close()


def test_anonymous_bodies_kept_busy_never_push_out_an_upload(tmp_path):
    """A public read with a body counts as busy as an upload would, however fresh its activity:
    anonymous connections trickling GET bodies go first at the connection limit."""
    with thread_server(tmp_path / "store", max_connections=6, **token_settings(tmp_path)) as (port, _):
        blob = pack_tree(tmp_path, {"a.bin": os.urandom(300_000)})  # incompressible: 100 KB is a third
        upload = connect(port)
        upload.sendall(put_head(ART, len(blob), AUTH) + blob[:100_000])
        assert request(port, "GET", "/healthz", timeout=10)[0] == 200  # the upload's bytes are read by now
        busy = []
        try:
            for _ in range(12):  # each newer, and so more recently active, than the paused upload
                sock = connect(port)
                busy.append(sock)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\nExpect: 100-continue\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")  # its head is read and admitted
                sock.sendall(b"x" * 10)
            upload.sendall(blob[100_000:])
            first, _, body = read_answer(upload)
            assert first.startswith(b"HTTP/1.1 201"), body
        finally:
            upload.close()
            for sock in busy:
                sock.close()


def test_a_request_head_has_a_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(channel, "HEAD_TIMEOUT", 0.5)
    with thread_server(tmp_path / "store") as (port, _):
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert wait_closed(sock)


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_half_sent_head_after_an_answered_request_has_a_deadline_too(tmp_path, monkeypatch, pipelined):
    """The deadline is watched from each head's first byte: also on a kept-alive connection, and
    for a head that arrived in the same read as the end of the request before it."""
    monkeypatch.setattr(channel, "HEAD_TIMEOUT", 0.5)
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with thread_server(tmp_path / "store") as (port, _):
        with connect(port) as sock:
            if pipelined:
                sock.sendall(first + b"GET /healthz HTTP/1.1\r\nHo")
                assert read_answer(sock)[0].startswith(b"HTTP/1.1 200")
            else:
                sock.sendall(first)
                assert read_answer(sock)[0].startswith(b"HTTP/1.1 200")
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            assert wait_closed(sock)


def test_an_idle_connection_is_closed_after_the_idle_timeout(tmp_path):
    with thread_server(tmp_path / "store", idle_timeout=1) as (port, _):
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(sock)[0].startswith(b"HTTP/1.1 200")
            assert wait_closed(sock)


# --- waitress's own answers ---------------------------------------------------------------------


def test_waitress_errors_are_counted_and_in_the_protocol_shape(tmp_path):
    with thread_server(tmp_path / "store", max_artifact_size=1000) as (port, app):
        with connect(port) as sock:  # waitress's own 413 (admit does not size POSTs): turbo's shape
            sock.sendall(b"POST /v8/artifacts HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
            first, _, body = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 413") and json.loads(body)["error"]["code"] == "too_large"
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
            first, _, body = read_answer(sock)
        # The version is read from the head as received, however TCP cut it into reads.
        assert first.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
        assert json.loads(body)["error"] == "headers_too_large"
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n")
            first, _, body = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 400") and json.loads(body)["error"] == "bad_request"
        counted = {status for (_, _, status) in app.metrics.requests}
        assert {413, 431, 400} <= counted, app.metrics.requests
        assert app.metrics.requests[("turbo", "POST", 413)] == 1


@pytest.mark.parametrize("piece", [None, 1024])
def test_a_head_too_large_is_answered_in_its_own_version_however_it_arrives(tmp_path, piece):
    """waitress gives up on a head in whichever read crosses the limit; the answer must not
    depend on whether the request line came in that read or an earlier one."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    with thread_server(tmp_path / "store") as (port, _):
        with connect(port) as sock:
            if piece is None:
                sock.sendall(head)
            else:
                for start in range(0, len(head), piece):
                    try:
                        sock.sendall(head[start:start + piece])
                    except OSError:
                        break  # answered and closed before the rest: what is under test
                    time.sleep(0.001)
            first, _, body = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 431"), first
        assert json.loads(body)["error"] == "headers_too_large"
        assert request(port, "GET", "/healthz")[0] == 200


def test_the_access_log_sees_answers_waitress_gives(tmp_path):
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log", "--max-artifact-size", "1000")
    try:
        with connect(server.port) as sock:
            sock.sendall(b"PUT /kv/gradle/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
            assert read_answer(sock)[0].startswith(b"HTTP/1.1 400")
        with connect(server.port) as sock:
            sock.sendall(put_head("/kv/gradle/x", 5000))
            assert read_answer(sock)[0].startswith(b"HTTP/1.1 413")
        text_ok = request(server.port, "GET", "/healthz")[0] == 200
    finally:
        server.stop()
    text = (tmp_path / "server.log").read_text()
    assert text_ok
    assert '"PUT /kv/gradle/x HTTP/1.1" 400' in text
    assert '"PUT /kv/gradle/x HTTP/1.1" 413' in text
    assert "uncaptured" not in text and "Traceback" not in text


def chunked(data: bytes, size: int = 64 * 1024) -> bytes:
    """``data`` in the chunked transfer coding (RFC 9112 section 7.1)."""
    parts = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_a_chunked_body_on_a_read_is_refused_before_it_is_spooled(tmp_path):
    """A read's body is bounded by its Content-Length; a chunked one declares none, so waitress
    would spool it up to the artifact size limit, without a token on a public route. The answer
    comes from the head alone (before it, the server waited for the body)."""
    with thread_server(tmp_path / "store", **token_settings(tmp_path)) as (port, _):
        for path, headers in (("/healthz", {}), ("/v1/stats", AUTH), ("/v8/artifacts?teamId=t", AUTH)):
            method = "POST" if path.startswith("/v8") else "GET"
            with connect(port) as sock:
                head = [f"{method} {path} HTTP/1.1", "Host: cache", "Transfer-Encoding: chunked"]
                head += [f"{k}: {v}" for k, v in headers.items()]
                sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
                first, _, answer = read_answer(sock)  # answered before any of the body
                assert first.startswith(b"HTTP/1.1 411"), (path, first, answer)
                assert b"length_required" in answer
        assert request(port, "GET", "/healthz")[0] == 200


def test_a_chunked_upload_is_admitted_and_stored(tmp_path):
    body = pack_tree(tmp_path / "tree", {"a.js": b"x" * 1000})
    with thread_server(tmp_path / "store", **token_settings(tmp_path)) as (port, app):
        with connect(port) as sock:
            head = [f"PUT {ART} HTTP/1.1", "Host: cache", "Transfer-Encoding: chunked", f"Authorization: Bearer {TOKEN}"]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + chunked(body, 300))
            first, _, answer = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 201"), answer
        assert app.storage.lookup(KEY) is not None


def test_a_request_without_a_body_is_admitted_once_and_an_upload_again_after_its_body(tmp_path):
    """A GET or HEAD is complete at its head: the environ admitted there is the one answered, so
    its token is checked once. An upload's token is checked again once its body has come, so a
    token revoked meanwhile stores nothing."""
    checks = []

    class CountingAccess(Access):
        def check(self, header, write):
            checks.append(write)
            return super().check(header, write)

    store = tmp_path / "store"
    settings = token_settings(tmp_path)
    config = Config(storage_dir=store, port=0, **settings)
    storage = Storage(store)
    storage.recover()
    app = make_app(config, storage, access=CountingAccess(settings["token_file"], {}, False))
    blob = pack_tree(tmp_path, {"a": b"x" * 100})
    with running(app, config) as port:
        assert request(port, "PUT", ART, blob, AUTH)[0] == 201
        assert checks == [True, True]
        checks.clear()
        for method in ("GET", "HEAD"):
            status, headers, _ = request(port, method, ART, headers=AUTH)
            assert status == 200 and headers["content-length"] == str(len(blob))
        assert checks == [False, False]
        assert request(port, "GET", ART)[0] == 401  # without the token: refused at the head

        other = f"/v1/artifacts/{'cd' * 32}"
        sock = connect(port)
        with sock:
            sock.sendall(f"PUT {other} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {len(blob)}\r\nExpect: 100-continue\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")  # the head was admitted
            settings["token_file"].write_text("read-write another-token-0123\n")
            app.access.reload()
            sock.sendall(blob)
            first, _, body = read_answer(sock)
        assert first.startswith(b"HTTP/1.1 401") and json.loads(body)["error"] == "unauthorized"
        assert request(port, "HEAD", other, headers={"Authorization": "Bearer another-token-0123"})[0] == 404
