"""Kept-alive connections to the remote cache: reused after a clean exchange, never after a
failed one, and a connection the server closed while idle costs no failure.

The server is a small HTTP/1.1 cache on 127.0.0.1 that counts the connections it accepts and can
misbehave on purpose; the artifacts are real tar+zstd files.
"""

import gc
import http.server
import io
import os
from pathlib import Path

import pytest

from polykit_client.remote import RemoteCache
from support import KEY, OTHER_KEY, pack_tree, serve_handler, sha, thread_server


class CacheHandler(http.server.BaseHTTPRequestHandler):
    """A keep-alive cache: HEAD/GET/PUT of ``server.store``; ``server.accepted`` counts connections.

    ``server.mode`` makes it misbehave: "drop-second" closes a connection, unanswered, when a
    second request arrives on it (the race of a server closing an idle connection);
    "refuse-put" answers 413 to a PUT without reading its body; "short-get" announces a body and
    sends half of it, then waits; "short-second" does so from the second request on a connection.
    """

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.server.accepted += 1
        self.served = 0

    def log_message(self, *args) -> None:
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _first_or_drop(self) -> bool:
        self.served += 1
        if self.server.mode == "drop-second" and self.served > 1:
            self.server.dropped += 1
            self.close_connection = True
            return False
        return True

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        if self._first_or_drop():
            self._artifact(send_body=False)

    def do_GET(self) -> None:
        if self._first_or_drop():
            self._artifact(send_body=True)

    def _artifact(self, send_body: bool) -> None:
        blob = self.server.store.get(self.path.rsplit("/", 1)[-1])
        if blob is None:
            self._send(404, b'{"error": "not_found", "message": "No such artifact."}', send_body=send_body)
        elif send_body and (self.server.mode == "short-get" or (self.server.mode == "short-second" and self.served > 1)):
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.send_header("X-Artifact-Hash", sha(blob))
            self.end_headers()
            self.wfile.write(blob[: len(blob) // 2])
            self.wfile.flush()
            self.rfile.read(1)  # until the client gives up and closes
            self.close_connection = True
        else:
            self._send(200, blob, {"X-Artifact-Hash": sha(blob)}, send_body=send_body)

    def do_PUT(self) -> None:
        if not self._first_or_drop():
            return
        if self.server.mode == "refuse-put":
            # Answered from the headers alone, the body left unread (RFC 9110 section 15.5.14).
            self._send(413, b'{"error": "too_large", "message": "The body is over the limit."}')
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if sha(body) != self.headers.get("X-Artifact-Hash"):
            self._send(400, b'{"error": "bad_hash"}')
            return
        self.server.store[self.path.rsplit("/", 1)[-1]] = body
        self._send(201)


def cache_server(mode: str = "", store: dict | None = None):
    return serve_handler(CacheHandler, accepted=0, dropped=0, mode=mode, store=dict(store or {}))


def remote_for(port: int, warnings: list, **options) -> RemoteCache:
    return RemoteCache(f"http://127.0.0.1:{port}", warn=warnings.append, **options)


def artifact(tmp_path: Path, key: str = KEY) -> tuple[Path, bytes]:
    blob = pack_tree(tmp_path, {"dist/app.js": os.urandom(20_000)}, key=key)
    path = tmp_path / f"{key}.zst"
    path.write_bytes(blob)
    return path, blob


def test_sequential_requests_share_one_connection(tmp_path):
    path, blob = artifact(tmp_path)
    with cache_server(store={OTHER_KEY: blob}) as server:
        warnings: list = []
        remote = remote_for(server.server_address[1], warnings)
        for _ in range(5):
            out = io.BytesIO()
            assert remote.fetch(OTHER_KEY, out) and out.getvalue() == blob
        assert remote.exists(OTHER_KEY)
        assert remote.fetch(KEY, io.BytesIO()) is False  # a 404: its short body is read, the connection kept
        assert remote.store(KEY, path) is True  # HEAD (404) and PUT (201)
        assert server.store[KEY] == blob
        remote.close()
    assert warnings == []
    assert server.accepted == 1


def test_a_connection_the_server_closed_while_idle_costs_no_failure(tmp_path):
    path, blob = artifact(tmp_path)
    with cache_server("drop-second", store={OTHER_KEY: blob}) as server:
        warnings: list = []
        remote = remote_for(server.server_address[1], warnings, retries=0, max_failures=1)
        for _ in range(3):
            out = io.BytesIO()
            assert remote.fetch(OTHER_KEY, out) and out.getvalue() == blob
        # An upload on a dropped connection is sent again in whole: the file is read from its start.
        assert remote.store(KEY, path, ask_first=False) is True
        assert server.store[KEY] == blob
        assert remote.exists(KEY)
    assert warnings == []
    assert remote.enabled
    # Every request after the first went out on the kept connection, was dropped, and was sent
    # again on a new one.
    assert server.dropped == 4
    assert server.accepted == 5


def test_no_reuse_after_a_refused_upload(tmp_path):
    path, blob = artifact(tmp_path)
    with cache_server("refuse-put", store={OTHER_KEY: blob}) as server:
        warnings: list = []
        remote = remote_for(server.server_address[1], warnings, retries=0)
        assert remote.store(KEY, path, ask_first=False) is False
        assert len(warnings) == 1 and "HTTP 413 too_large" in warnings[0]
        out = io.BytesIO()
        # The unread body left on that connection would otherwise be taken for the next request.
        assert remote.fetch(OTHER_KEY, out) and out.getvalue() == blob
    assert server.accepted == 2


def test_no_reuse_after_a_truncated_body(tmp_path):
    _, blob = artifact(tmp_path)
    with cache_server("short-get", store={OTHER_KEY: blob}) as server:
        warnings: list = []
        remote = remote_for(server.server_address[1], warnings, retries=0, timeout=0.5)
        assert remote.fetch(OTHER_KEY, io.BytesIO()) is False
        assert len(warnings) == 1 and "after" in warnings[0]
        assert remote.exists(OTHER_KEY)  # on a new connection: the old one holds half a body
    assert server.accepted == 2


def test_the_deadline_shuts_down_a_reused_connection(tmp_path):
    _, blob = artifact(tmp_path)
    with cache_server("short-second", store={OTHER_KEY: blob}) as server:
        warnings: list = []
        # The per-read timeout alone would wait a minute: only the deadline ends the transfer.
        remote = remote_for(server.server_address[1], warnings, retries=0, timeout=60, deadline=1)
        assert remote.fetch(OTHER_KEY, io.BytesIO())
        assert remote.fetch(OTHER_KEY, io.BytesIO()) is False  # on the kept connection, which stalls
        assert len(warnings) == 1 and "deadline of 1 s" in warnings[0]
    assert server.accepted == 1


def _established_to(port: int) -> int:
    """Connections of this machine to 127.0.0.1:``port`` that their client has not closed (Linux)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if remote.endswith(f":{port:04X}") and state == "01":  # 01: ESTABLISHED
            count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's table of TCP sockets")
def test_a_build_closes_its_kept_alive_connections_when_it_ends(tmp_path, monkeypatch, capsys):
    from polykit_client import cli
    from sample import make_tools, make_workspace

    ws = make_workspace(tmp_path / "ws")
    tools = make_tools(tmp_path / "tools")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("POLYKIT_TEST_MARKER", str(tmp_path / "marker"))
    with thread_server(tmp_path / "store") as (port, _):
        collected = gc.isenabled()
        gc.disable()  # the connections must be closed by the run, not by a collection of its objects
        try:
            assert cli.main(["build", "-C", str(ws), "--remote-cache-url", f"http://127.0.0.1:{port}"]) == 0
            assert "remote" in capsys.readouterr().out
            assert _established_to(port) == 0
        finally:
            if collected:
                gc.enable()
