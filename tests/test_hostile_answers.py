"""The client's download path against hostile answers: whatever a server sends, one warning and a
local build.

Every row of ANSWERS is sent byte for byte by a bare TCP server on 127.0.0.1 (``serve_raw``).
For each, the backend must return a miss without raising and warn exactly once, and a whole
``polykit build`` against it must end green with the task built locally and one warning line.
The deadline tests end because the client gives up: their servers stop on their own after a
bounded number of bytes, and the tests assert that the client left long before that.
"""

import io
import socket
import threading
import time

import pytest

from polykit_client.deadline import Watchdog
from polykit_client.remote import DEADLINE_RATE, RemoteCache
from polykit_client.workspace import ConfigError, load
from sample import Polykit, make_tools
from support import KEY, serve_raw, sha

BODY = b"x" * 1000
DIGEST = sha(BODY).encode()


def answer(head: bytes, body: bytes = BODY) -> bytes:
    """A status line and headers (CRLF-separated, without the blank line), then the body."""
    return head + b"\r\n\r\n" + body


def good(length: bytes = b"1000", digest: bytes = DIGEST, extra: bytes = b"", body: bytes = BODY) -> bytes:
    return answer(b"HTTP/1.1 200 OK\r\nContent-Type: application/zstd\r\nContent-Length: " + length
                  + b"\r\nX-Artifact-Hash: " + digest + extra, body)


ANSWERS = {
    "garbage instead of HTTP": b"SSH-2.0-OpenSSH_9.6\r\n",
    "closed without a word": b"",
    "a bare body, no status line": BODY,
    "a status code below 100": answer(b"HTTP/1.1 20 OK\r\nContent-Length: 0", b""),
    "a status code of 999": answer(b"HTTP/1.1 999 Nine\r\nContent-Length: 0", b""),
    "a status line over 64 KiB": answer(b"HTTP/1.1 200 " + b"O" * 70_000),
    "a header line over 64 KiB": good(extra=b"\r\nX-Long: " + b"a" * 70_000),
    "101 header fields": good(extra=b"".join(b"\r\nX-Many-%d: 1" % i for i in range(101))),
    "headers cut off": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Artifact-Ha",
    "a line that is not a header": good(extra=b"\r\nthis is not a header"),
    "NUL bytes in a header": good(extra=b"\r\nX-Nul: a\x00b"),
    "Content-Length: \u00b2 (superscript two)": good(length="\u00b2".encode("latin-1")),
    "Content-Length: -1000": good(length=b"-1000"),
    "Content-Length: +1000": good(length=b"+1000"),
    "Content-Length: 1_000": good(length=b"1_000"),
    "Content-Length of 40 digits": good(length=b"9" * 40),
    "Content-Length given twice, differently": good(extra=b"\r\nContent-Length: 999"),
    "Content-Length beside chunked framing": good(extra=b"\r\nTransfer-Encoding: chunked", body=b"zz\r\n" + BODY),
    "chunked framing with a bad chunk size": answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                                     b"X-Artifact-Hash: " + DIGEST, b"zz\r\n" + BODY),
    "no Content-Length at all": answer(b"HTTP/1.1 200 OK\r\nX-Artifact-Hash: " + DIGEST),
    "a non-ASCII digest": good(digest="\u00e9".encode("latin-1") * 64),
    "a digest of other bytes": good(digest=sha(b"other").encode()),
    "two different digests": good(extra=b"\r\nX-Artifact-Hash: " + sha(b"other").encode()),
    "a body cut short": good(body=BODY[:400]),
    "a body longer than announced": good(digest=sha(BODY + b"tail").encode(), body=BODY + b"tail"),
    "a redirect": answer(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0", b""),
    "100 Continue, then nothing": b"HTTP/1.1 100 Continue\r\n\r\n",
    "a thousand 100 Continue": b"HTTP/1.1 100 Continue\r\n\r\n" * 1000,
    "101 Switching Protocols": answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket", b"\x81\x05hello"),
    "103 Early Hints, then close": answer(b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload", b""),
    "500 with deeply nested JSON": answer(b"HTTP/1.1 500 Oops\r\nContent-Length: 60000", b"[" * 60_000),
    "500 with 2 MB of JSON": answer(b"HTTP/1.1 500 Oops\r\nContent-Length: 2000040",
                                    b'{"error": "x", "message": "' + b"a" * 2_000_000 + b'", "pad": "xxxxxx"}'),
    "400 with a binary reason and body": answer(b"HTTP/1.1 400 \xff\xfe\x00bad\r\nContent-Length: 4", b"\xff\x00\x1b["),
}


def remote_for(port: int, warnings: list, **options) -> RemoteCache:
    return RemoteCache(f"http://127.0.0.1:{port}", warn=warnings.append, timeout=5, environ={}, **options)


def test_the_fixture_serves_a_well_formed_answer_as_a_hit():
    """The rows fail because of what each one changes, not because of the fixture."""
    warnings: list = []
    with serve_raw(good()) as server:
        dest = io.BytesIO()
        assert remote_for(server.port, warnings).fetch(KEY, dest) is True
    assert dest.getvalue() == BODY and warnings == []
    assert server.heads[0].startswith(f"GET /v1/artifacts/{KEY} HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("raw", list(ANSWERS.values()), ids=list(ANSWERS))
def test_a_hostile_answer_is_a_miss_and_one_warning(raw):
    warnings: list = []
    with serve_raw(raw) as server:
        remote = remote_for(server.port, warnings)
        assert remote.fetch(KEY, io.BytesIO()) is False
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{server.port}" in warnings[0] and "built locally" in warnings[0]
    assert "\n" not in warnings[0] and len(warnings[0]) < 4100
    assert remote.bytes_down == 0 and remote.enabled


def one_task_workspace(root):
    """One package with one build task, so a build makes exactly one remote request."""
    (root / "packages" / "web" / "src").mkdir(parents=True)
    (root / "polykit.toml").write_text('[workspace]\npackages_dir = "packages"\n[remote_cache]\ntimeout = 5\n')
    (root / "packages" / "web" / "polykit.toml").write_text(
        'name = "web"\n[tasks]\nbuild = { command = "mkdir -p dist && echo local > dist/app.js '
        '&& echo web:build >> \\"$POLYKIT_TEST_MARKER\\"", outputs = ["dist/**"], inputs = ["src/**"] }\n')
    (root / "packages" / "web" / "src" / "index.js").write_text("src\n")
    return root


@pytest.fixture(scope="module")
def one_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return Polykit(one_task_workspace(root / "ws"), make_tools(root / "tools"), root / "marker")


@pytest.mark.parametrize("raw", list(ANSWERS.values()), ids=list(ANSWERS))
def test_a_build_against_a_hostile_answer_builds_locally_with_one_warning(one_task, raw):
    import shutil

    shutil.rmtree(one_task.workspace / ".polykit", ignore_errors=True)
    shutil.rmtree(one_task.workspace / "packages" / "web" / "dist", ignore_errors=True)
    with serve_raw(raw) as server:
        out = one_task.run("build", "--remote-cache-readonly", "--remote-cache-url", f"http://127.0.0.1:{server.port}")
    # One batch query, which warns about nothing; the task's own GET (retried) is what warns.
    posts = [head for head in server.heads if head.startswith(b"POST /v1/artifacts HTTP/1.1\r\n")]
    gets = [head for head in server.heads if head.startswith(b"GET /v1/artifacts/")]
    assert len(posts) == 1 and gets and len(posts) + len(gets) == len(server.heads)
    assert one_task.ran() == ["web:build"]
    assert [line for line in out.stdout.splitlines() if line.startswith("web:build")] == ["web:build  miss"]
    assert (one_task.workspace / "packages" / "web" / "dist" / "app.js").read_text() == "local\n"
    warnings = out.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: remote cache http://127.0.0.1:"), out.stderr
    assert "0 remote hits, 1 misses, 0 failed" in out.stdout


# Answers to the batch query (POST /v1/artifacts) that are HTTP but not a usable answer.
QUERY_ANSWERS = {
    **ANSWERS,
    "200 with a body that is not JSON": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000"),
    "200 with JSON of another shape": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2", b"[]"),
    "200 with artifacts not an object": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 17", b'{"artifacts": []}'),
    "200 with an entry of the wrong type": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 88",
                                                  b'{"artifacts": {"' + KEY.encode() + b'": 1}}'.ljust(88)),
    "200 with deeply nested JSON": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 60000", b"[" * 60_000),
    "200 with 2 MB of JSON": answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2000020",
                                    b'{"artifacts": {}, "pad": "' + b"a" * 2_000_000 + b'"}'[:2_000_020]),
}


@pytest.mark.parametrize("raw", list(QUERY_ANSWERS.values()), ids=list(QUERY_ANSWERS))
def test_a_hostile_answer_to_the_batch_query_is_no_answer_and_no_warning(raw):
    """The batch query only saves round trips: the task's own GET is asked next, and warns."""
    warnings: list = []
    with serve_raw(raw) as server:
        remote = remote_for(server.port, warnings)
        assert remote.which([KEY]) is None
    assert warnings == [] and remote.enabled
    assert len(server.heads) == 1 and server.heads[0].startswith(b"POST /v1/artifacts HTTP/1.1\r\n")


# --- the deadline of a transfer -------------------------------------------------------------


def trickle(header: bytes, count: int, pause: float, sent: list):
    """An answer that sends ``header`` and then one byte every ``pause`` seconds, at most
    ``count`` of them; ``sent`` gets how many the client took before it hung up."""

    def send(conn: socket.socket, head: bytes) -> None:
        conn.sendall(header)
        n = 0
        try:
            for n in range(1, count + 1):
                time.sleep(pause)
                conn.sendall(b"x")
        except OSError:
            n -= 1
        finally:
            sent.append(n)

    return send


def wait_for(result: list) -> None:
    """Until the server has seen the client hang up (bounded: its answer ends by itself anyway)."""
    for _ in range(400):
        if result:
            return
        time.sleep(0.05)


def test_a_trickling_body_ends_at_the_deadline():
    """One byte every 0.1 s never trips a 2 s read timeout; the 1 s deadline does."""
    body = b"x" * 300
    sent: list = []
    header = b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\nX-Artifact-Hash: " + sha(body).encode() + b"\r\n\r\n"
    warnings: list = []
    with serve_raw(trickle(header, 300, 0.1, sent)) as server:
        remote = RemoteCache(f"http://127.0.0.1:{server.port}", timeout=2, deadline=1, environ={}, warn=warnings.append)
        assert remote.fetch(KEY, io.BytesIO()) is False
        assert len(server.heads) == 1  # running out of time is not retried
        wait_for(sent)
    assert sent and sent[0] < 150, sent  # the client hung up long before the body's end
    assert len(warnings) == 1 and "longer than its deadline of 1 s" in warnings[0], warnings


def test_a_trickling_bundle_ends_at_the_deadline_and_its_tasks_build():
    """A bundle is one transfer under one deadline; a server that slow would be as slow per GET,
    so the keys it did not reach are built (``done`` False), not fetched again one by one."""
    other = "cd" * 32
    head = f"{KEY} 300 {sha(b'x' * 300)}\n".encode()
    header = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(head) + head + b"12c\r\n"
    sent: list = []
    outcomes: list = []
    warnings: list = []
    with serve_raw(trickle(header, 300, 0.1, sent)) as server:
        remote = RemoteCache(f"http://127.0.0.1:{server.port}", timeout=2, deadline=1, environ={}, warn=warnings.append)
        rest = remote.fetch_bundle([KEY, other], 300, lambda key: (io.BytesIO(), None),
                                   lambda key, ok: outcomes.append((key, ok)))
        assert rest == [] and outcomes == [(KEY, False), (other, False)]
        assert len(server.heads) == 1  # no retry, and no GET
        wait_for(sent)
    assert sent and sent[0] < 150, sent
    assert len(warnings) == 1 and "deadline of 1 s" in warnings[0] and "built locally" in warnings[0], warnings


def test_endless_interim_answers_end_at_the_deadline():
    """``100 Continue`` after ``100 Continue``: no body ever starts, yet the transfer ends."""
    sent: list = []
    warnings: list = []

    def interim(conn, head):
        n = 0
        try:
            for n in range(1, 400):
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                time.sleep(0.05)
        except OSError:
            pass
        sent.append(n)

    with serve_raw(interim) as server:
        remote = RemoteCache(f"http://127.0.0.1:{server.port}", timeout=2, deadline=1, environ={}, warn=warnings.append)
        assert remote.exists(KEY) is False
        wait_for(sent)
    assert sent and sent[0] < 200, sent
    assert len(warnings) == 1 and "deadline of 1 s" in warnings[0]


def test_an_upload_the_server_reads_slowly_ends_at_the_deadline(tmp_path):
    path = tmp_path / "artifact.zst"
    path.write_bytes(b"z" * (8 << 20))
    warnings: list = []

    def slow_reader(conn, head):
        if head.startswith(b"HEAD "):
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            for _ in range(400):  # 64 KiB every 0.1 s, for 40 s at most: never a read timeout
                if not conn.recv(65536):
                    break
                time.sleep(0.1)
        except OSError:
            pass

    with serve_raw(slow_reader) as server:
        remote = RemoteCache(f"http://127.0.0.1:{server.port}", timeout=2, deadline=1, environ={}, warn=warnings.append)
        assert remote.store(KEY, path) is False
        assert [h.split(b" ", 1)[0] for h in server.heads] == [b"HEAD", b"PUT"]  # and no retry
    assert len(warnings) == 1 and "deadline of 1 s" in warnings[0], warnings


def test_a_deadline_beyond_what_a_wait_can_take_leaves_the_watchdog_running():
    # deadline = 1e10 is a valid setting; waiting that long overflows the platform's time_t.
    errors = []
    previous, threading.excepthook = threading.excepthook, errors.append
    try:
        watchdog = Watchdog()
        far = watchdog.start(1e10)
        near = watchdog.start(0.05)
        for _ in range(400):  # bounded: until the watchdog expires the near deadline
            if near.expired:
                break
            time.sleep(0.05)
        far.close()
    finally:
        threading.excepthook = previous
    assert near.expired and not far.expired and errors == []


def test_one_watchdog_thread_serves_transfers_that_follow_one_another():
    # A run's downloads are many and short: a thread started (and ended) for each would cost more
    # than the transfer. The thread stays while transfers come, and is woken for none of them.
    watchdog = Watchdog()
    first = watchdog.start(30)
    thread = watchdog._thread
    first.close()
    wakes = []
    notify = watchdog.lock.notify
    watchdog.lock.notify = lambda *args: (wakes.append(args), notify(*args))
    for _ in range(50):
        watchdog.start(30).close()
        assert watchdog._thread is thread and thread.is_alive()
    assert wakes == []
    near = watchdog.start(0.01)  # sooner than anything the thread waits for: it is woken for this one
    for _ in range(400):  # bounded: until the watchdog expires it
        if near.expired:
            break
        time.sleep(0.05)
    assert near.expired and len(wakes) == 1


def test_the_default_deadline_scales_with_the_size_of_the_body():
    remote = RemoteCache("http://127.0.0.1:1", timeout=2, environ={})
    assert remote.deadline_for(0) == 6
    assert remote.deadline_for(100 * DEADLINE_RATE) == 106
    fixed = RemoteCache("http://127.0.0.1:1", timeout=2, deadline=30, environ={})
    assert fixed.deadline_for(0) == fixed.deadline_for(1 << 40) == 30
    with pytest.raises(ValueError):
        RemoteCache("http://127.0.0.1:1", deadline=0, environ={})


def test_the_deadline_comes_from_the_file_or_the_environment(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "polykit.toml").write_text('[remote_cache]\nurl = "http://c:1"\ndeadline = 900\n')
    assert load(root, {}).remote.deadline == 900
    assert load(root, {"POLYKIT_REMOTE_CACHE_DEADLINE": "60.5"}).remote.deadline == 60.5
    with pytest.raises(ConfigError, match="POLYKIT_REMOTE_CACHE_DEADLINE: must be a positive number of seconds"):
        load(root, {"POLYKIT_REMOTE_CACHE_DEADLINE": "soon"})
    (root / "polykit.toml").write_text('[remote_cache]\nurl = "http://c:1"\n')
    assert load(root, {}).remote.deadline is None
    for bad in ("0", "-1", "inf", '"10"', "1e10", "604801"):
        (root / "polykit.toml").write_text(f'[remote_cache]\ndeadline = {bad}\n')
        with pytest.raises(ConfigError, match="polykit.toml:2: deadline must be a positive number of seconds"):
            load(root, {})
    (root / "polykit.toml").write_text('[remote_cache]\ndeadline = 604800\n')
    assert load(root, {}).remote.deadline == 604800
    with pytest.raises(ConfigError, match="at most 604800"):
        load(root, {"POLYKIT_REMOTE_CACHE_DEADLINE": "1e10"})


@pytest.mark.parametrize("bad", ["inf", "1e10", "nan", "0"])
def test_a_timeout_a_socket_cannot_take_is_a_config_error(tmp_path, bad):
    # socket.settimeout(1e10) raises OverflowError: every transfer would fail with that.
    (tmp_path / "polykit.toml").write_text(f'[remote_cache]\ntimeout = {bad}\n')
    with pytest.raises(ConfigError, match="polykit.toml:2: timeout must be a positive number of seconds, at most 604800"):
        load(tmp_path, {})


# --- the runner's last safety net -------------------------------------------------------------


class Unforeseen:
    """A backend that breaks its promise never to raise. No real server can make the real one
    do that (the table above shows), so this fake stands in for the bug the net is there for."""

    read_only = False
    enabled = True
    bytes_down = bytes_up = 0

    def fetch(self, key, dest, progress=None):
        raise RuntimeError("unforeseen\nin two lines")

    def store(self, key, path, progress=None, ask_first=True):
        raise RuntimeError("unforeseen upload")


def build_in_process(root, remote_factory):
    """One ``build`` through the runner itself, with the given remote backend."""
    from polykit_client.cachekey import KeyMaker
    from polykit_client.graph import plan, run_graph
    from polykit_client.localcache import LocalCache
    from polykit_client.runner import Console, Summary, TaskRunner

    ws = load(root, {})
    order, deps = plan(ws, "build", [])
    keys = KeyMaker(ws, {}).compute(order, deps)
    out, err = io.StringIO(), io.StringIO()
    runner = TaskRunner(ws, keys, Console(False, out, err), local=LocalCache(ws.cache_dir, ws.cache_max_size),
                        remote_factory=remote_factory, summary=Summary())
    outcome = run_graph(order, deps, runner.run, 1, False)
    runner.finish_packing()
    if runner.uploader is not None:
        runner.uploader.finish(30)
    return outcome, out.getvalue(), err.getvalue()


def test_an_exception_from_the_backend_is_one_warning_and_a_local_build(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYKIT_TEST_MARKER", str(tmp_path / "marker"))
    root = one_task_workspace(tmp_path / "ws")
    outcome, out, err = build_in_process(root, Unforeseen)
    assert "failed" not in outcome.values()
    assert out.splitlines()[0] == "web:build  miss" and "hit" not in out
    assert (tmp_path / "marker").read_text().split() == ["web:build"]
    assert err.splitlines() == [
        "warning: web:build: the remote cache failed unexpectedly (RuntimeError: unforeseen in two lines); building locally",
        "warning: upload of web:build failed (RuntimeError: unforeseen upload)",
    ]


def test_a_backend_that_cannot_be_made_is_one_warning_and_a_build_without_it(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYKIT_TEST_MARKER", str(tmp_path / "marker"))
    root = one_task_workspace(tmp_path / "ws")

    def factory():
        raise RuntimeError("no backend")

    outcome, out, err = build_in_process(root, factory)
    assert "failed" not in outcome.values() and out.splitlines()[0] == "web:build  miss"
    assert err.splitlines() == ["warning: the remote cache cannot be used (RuntimeError: no backend); building without it"]


def test_a_local_entry_with_a_deeply_nested_manifest_is_one_warning_and_a_local_build(tmp_path):
    from support import member, raw_tar, zst

    pk = Polykit(one_task_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    key = pk.keys()["web:build"]
    entry = pk.workspace / ".polykit" / "cache" / key[:2] / f"{key}.zst"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(zst(raw_tar([member("polykit-artifact.json", b"[" * 100_000)])))
    out = pk.run("build", "--no-remote-cache")
    assert pk.ran() == ["web:build"]
    assert [line for line in out.stdout.splitlines() if line.startswith("web:build")] == ["web:build  miss"]
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("warning: web:build: the local cache")
    assert "Traceback" not in out.stderr
