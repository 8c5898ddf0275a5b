"""Cache I/O ahead of the tasks: one batch query per run, downloads started at once, uploads that
do not ask again what the batch query answered."""

import http.server
import os
import threading
from pathlib import Path

import pytest

from polykit_client.cli import DEFAULT_PARALLEL, default_parallel
from polykit_client.localcache import LocalCache
from polykit_client.prefetch import ABSENT, UNKNOWN, Prefetcher
from polykit_client.remote import QUERY_BATCH, RemoteCache
from polykit_client.workspace import load
from sample import Polykit, copy_workspace, make_tools, make_workspace
from support import KEY, OTHER_KEY, call, key_for, pack_tree, serve_handler, thread_server

BUILDS = ["api-server:build", "shared-utils:build", "web:build"]


def polykit_requests(app, before: dict | None = None) -> dict:
    """(method, status) -> count of the polykit protocol's requests so far (since ``before``, a previous answer)."""
    now = {(method, status): n for (protocol, method, status), n in app.metrics.requests.items() if protocol == "polykit"}
    return {k: n - (before or {}).get(k, 0) for k, n in now.items() if n - (before or {}).get(k, 0)}


def test_a_build_asks_once_and_a_fresh_checkout_downloads_without_asking_per_task(tmp_path):
    pk = Polykit(make_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    with thread_server(tmp_path / "store") as (port, app):
        url = f"http://127.0.0.1:{port}"
        pk.run("build", "--remote-cache-url", url)
        assert pk.ran() == BUILDS
        # One batch query; a task that starts before its answer asks for itself (a GET), and an
        # upload the answer covers does not ask again (no HEAD): at most one question per task.
        seen = polykit_requests(app)
        assert seen.pop(("POST", 200)) == 1 and seen.pop(("PUT", 201)) == 3
        assert set(seen) <= {("GET", 404), ("HEAD", 404)} and sum(seen.values()) <= 6
        before = polykit_requests(app)

        other = copy_workspace(pk.workspace, tmp_path / "second")
        hits = app.metrics.stats()["hits"]
        out = pk.run("build", "--remote-cache-url", url, cwd=other)
        assert pk.ran() == [] and "3 remote hits, 0 misses" in out.stdout and out.stderr == ""
        # The batch query, then one bundle of every hit, except a key a task asked for itself
        # before the answer came (a GET): each artifact fetched once.
        seen = polykit_requests(app, before)
        assert seen.pop(("POST", 200)) == 1 + (seen.get(("GET", 200), 0) < 3) and set(seen) <= {("GET", 200)}
        assert app.metrics.stats()["hits"] - hits == 3
        before = polykit_requests(app)

        # A build of local hits does not touch the network at all.
        pk.run("build", "--remote-cache-url", url, cwd=other)
        assert polykit_requests(app, before) == {}


def test_the_batch_query_goes_in_slices_and_answers_for_each_key(tmp_path):
    with thread_server(tmp_path / "store") as (port, app):
        assert call(app, "PUT", f"/v1/artifacts/{KEY}", pack_tree(tmp_path, {"a": b"1"})).status == 201
        keys = [key_for(str(i)) for i in range(2 * QUERY_BATCH + 5)] + [KEY]
        remote = RemoteCache(f"http://127.0.0.1:{port}", environ={})
        found = remote.which(keys + [KEY])
        assert found == {**{k: None for k in keys}, KEY: len(pack_tree(tmp_path, {"a": b"1"}))}
        assert polykit_requests(app)[("POST", 200)] == 3


class OlderServer(http.server.BaseHTTPRequestHandler):
    """A cache server from before the batch query: POST /v1/artifacts is 404; artifacts are kept."""

    def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self):
        self.server.seen.append(("POST", self.path))
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(404, b'{"error": "not_found", "message": "No such endpoint."}')

    def do_HEAD(self):
        self.server.seen.append(("HEAD", self.path))
        self._answer(404)

    def do_GET(self):
        self.server.seen.append(("GET", self.path))
        self._answer(404)

    def do_PUT(self):
        self.server.seen.append(("PUT", self.path))
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(201, b"{}")

    def log_message(self, *args):
        pass


def test_a_server_without_the_batch_query_is_asked_task_by_task(tmp_path):
    pk = Polykit(make_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    with serve_handler(OlderServer, seen=[]) as server:
        out = pk.run("build", "-j", "1", "--remote-cache-url", f"http://127.0.0.1:{server.server_address[1]}")
    assert out.stderr == "" and pk.ran() == BUILDS
    methods = [method for method, _ in server.seen]
    assert methods.count("POST") == 1
    assert methods.count("GET") == 3 and methods.count("HEAD") == 3 and methods.count("PUT") == 3


def test_what_no_task_takes_is_thrown_away(tmp_path):
    local = LocalCache(tmp_path / "cache", 1 << 30)
    with thread_server(tmp_path / "store") as (port, app):
        assert call(app, "PUT", f"/v1/artifacts/{KEY}", pack_tree(tmp_path, {"a": b"1"})).status == 201
        remote = RemoteCache(f"http://127.0.0.1:{port}", environ={})
        staged = []
        staging = threading.Event()

        def stage(key: str, path: Path):
            from polykit_client.restore import Staged

            staging.set()
            folder = local.tmp / f"staged-{key[:8]}"
            folder.mkdir()
            staged.append(folder)
            return Staged(path, folder, {})

        prefetcher = Prefetcher(lambda: remote, local, stage)
        prefetcher.start([KEY, OTHER_KEY])
        assert prefetcher.wait(30)
        assert prefetcher.take(OTHER_KEY) == ABSENT and prefetcher.absent(OTHER_KEY)
        assert prefetcher.take(key_for("never asked")) == UNKNOWN
        assert staging.wait(30)
        prefetcher.close()  # KEY was fetched and staged, and no task took it
    assert len(staged) == 1 and os.listdir(local.tmp) == []


def test_a_task_that_comes_before_the_answer_fetches_for_itself(tmp_path):
    local = LocalCache(tmp_path / "cache", 1 << 30)
    with thread_server(tmp_path / "store") as (port, app):
        assert call(app, "PUT", f"/v1/artifacts/{KEY}", pack_tree(tmp_path, {"a": b"1"})).status == 201
        remote = RemoteCache(f"http://127.0.0.1:{port}", environ={})
        prefetcher = Prefetcher(lambda: remote, local, lambda key, path: pytest.fail("nothing is fetched for a taken key"))
        assert prefetcher.take(KEY) == UNKNOWN  # before start(): no answer yet
        prefetcher.start([KEY])
        assert prefetcher.wait(30) and prefetcher.take(KEY) == UNKNOWN
        prefetcher.close()
    assert polykit_requests(app) == {("PUT", 201): 1, ("POST", 200): 1}


def test_the_default_parallelism_keeps_the_machine_busy(tmp_path):
    root = make_workspace(tmp_path / "ws")
    assert default_parallel(load(root, {})) == 4  # [workspace] default_parallel wins
    (root / "polykit.toml").write_text((root / "polykit.toml").read_text().replace("default_parallel = 4\n", ""))
    assert default_parallel(load(root, {})) == max(DEFAULT_PARALLEL, os.cpu_count() or 1) >= 10


def test_polykit_profile_says_where_the_time_went(tmp_path):
    pk = Polykit(make_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    quiet = pk.run("build", "--no-remote-cache")
    assert "profile:" not in quiet.stderr
    out = pk.run("build", "--no-remote-cache", POLYKIT_PROFILE="1")
    lines = [line for line in out.stderr.splitlines() if line.startswith("profile: ")]
    names = [line[len("profile: "):].rsplit(" ms", 1)[0].rsplit(None, 1)[0].strip() for line in lines]
    for phase in ("start-up: the client's imports", "workspace: configuration", "keys: hashing, with the stat cache",
                  "tasks: outputs-in-place checks", "tasks: scheduling to the last end", "total, from the first import"):
        assert phase in names, out.stderr
    assert all(float(line.rsplit(" ms", 1)[0].split()[-1]) >= 0 for line in lines)
