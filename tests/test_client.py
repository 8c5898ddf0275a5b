"""The polykit command end to end: real subprocesses, a real polykit-cache, real files."""

import hashlib
import http.server
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from sample import Polykit, copy_workspace, make_tools, make_workspace
from support import free_port, request, serve_handler, thread_server

BUILDS = ["api-server:build", "shared-utils:build", "web:build"]


@pytest.fixture
def pk(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    return Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")


def snapshot(folder: Path) -> dict:
    """Every output entry: bytes and mode of files, targets of symlinks, empty folders."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            if not any(path.iterdir()):
                out[rel] = ("dir",)
        else:
            out[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o777)
    return out


def outputs(ws: Path) -> dict:
    return {
        "web": snapshot(ws / "packages/web/dist"),
        "api": snapshot(ws / "packages/api-server/target"),
        "utils": snapshot(ws / "packages/shared-utils/dist"),
    }


def stats(port: int) -> dict:
    return json.loads(request(port, "GET", "/v1/stats")[2])


def status_lines(stdout: str) -> dict:
    found = {}
    for line in stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].count(":") == 1 and not parts[0].endswith(":"):
            found[parts[0]] = parts[1]
    return found


def test_a_second_checkout_gets_every_task_from_the_remote_cache(pk, tmp_path):
    with thread_server(tmp_path / "store") as (port, _):
        url = f"http://127.0.0.1:{port}"
        first = pk.run("build", "--remote-cache-url", url)
        assert pk.ran() == BUILDS
        assert set(status_lines(first.stdout).values()) == {"miss"}
        assert "3 misses" in first.stdout
        assert stats(port)["uploads"] == 3
        built = outputs(pk.workspace)
        assert built["web"]["latest.js"] == ("link", "app.js")
        assert built["web"]["assets/empty"] == ("dir",)
        assert built["api"]["release/api"][2] == 0o755

        other = copy_workspace(pk.workspace, tmp_path / "second" / "checkout")
        second = pk.run("build", cwd=other, POLYKIT_REMOTE_CACHE_URL=url)
        assert pk.ran() == [], "a command ran in the second checkout"
        assert status_lines(second.stdout) == {t: "hit (remote)" for t in BUILDS}
        assert outputs(other) == built
        for word in ("built web", "built api-server", "built shared-utils"):
            assert word in second.stdout  # logs replayed
        assert "3 remote hits, 0 misses" in second.stdout
        assert second.stderr == ""

        third = pk.run("build", cwd=other, POLYKIT_REMOTE_CACHE_URL=url)
        assert status_lines(third.stdout) == {t: "hit (local)" for t in BUILDS}
        assert pk.ran() == []


def test_a_changed_upstream_input_misses_exactly_downstream(pk, tmp_path):
    with thread_server(tmp_path / "store") as (port, _):
        url = f"http://127.0.0.1:{port}"
        pk.run("build", "--remote-cache-url", url)
        pk.ran()
        (pk.workspace / "packages/web/src/app.ts").write_text("console.log('v2');\n")
        out = pk.run("build", "--remote-cache-url", url)
        assert pk.ran() == ["web:build"]
        assert status_lines(out.stdout)["shared-utils:build"] == "hit (local)"
        (pk.workspace / "packages/shared-utils/src/utils.py").write_text("def helper():\n    return 7\n")
        pk.run("build", "--remote-cache-url", url)
        assert pk.ran() == BUILDS


def test_a_hit_replaces_stale_outputs(pk, tmp_path):
    pk.run("build", "--no-remote-cache")
    pk.ran()
    dist = pk.workspace / "packages/web/dist"
    (dist / "app.js").write_text("tampered")
    (dist / "leftover.txt").write_text("stale")
    pk.run("build", "--no-remote-cache")
    assert pk.ran() == []
    assert "tampered" not in (dist / "app.js").read_text()
    assert not (dist / "leftover.txt").exists()


def test_read_only_never_uploads(pk, tmp_path):
    with thread_server(tmp_path / "store") as (port, app):
        pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{port}", "--remote-cache-readonly")
        assert pk.ran() == BUILDS
        assert stats(port)["uploads"] == 0
        assert not any(method == "PUT" for _, method, _ in app.metrics.requests)
        pk.run("build", POLYKIT_REMOTE_CACHE_URL=f"http://127.0.0.1:{port}", POLYKIT_REMOTE_CACHE_READONLY="1", cwd=pk.workspace)
        assert not any(method == "PUT" for _, method, _ in app.metrics.requests)


def test_a_stopped_server_gives_a_green_build_with_a_warning(pk):
    url = f"http://127.0.0.1:{free_port()}"
    out = pk.run("build", "--remote-cache-url", url)
    assert pk.ran() == BUILDS
    warnings = [line for line in out.stderr.splitlines() if line]
    assert warnings and all(line.startswith("warning:") for line in warnings)
    assert url in out.stderr
    assert any("switched off" in line for line in warnings) or len(warnings) <= 3


def test_a_server_answering_500_gives_a_green_build_with_a_warning(pk):
    class Broken(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"error": "internal_error", "message": "boom"}'
            self.send_response(500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = _fail

        def log_message(self, *args):
            pass

    with serve_handler(Broken) as server:
        out = pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{server.server_port}")
    assert pk.ran() == BUILDS
    assert "warning:" in out.stderr and "500" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_corrupt_artifact_from_the_server_is_refused_and_built_locally(pk, tmp_path):
    # A server that answers every key with the same (valid) artifact of another task, with an
    # honest hash header: only the manifest check can catch it.
    with thread_server(tmp_path / "store") as (port, _):
        pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{port}")
        pk.ran()
        stored = sorted((tmp_path / "store").rglob("*.zst"))[0].read_bytes()
    digest = hashlib.sha256(stored).hexdigest()

    class Liar(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(stored)))
            self.send_header("X-Artifact-Hash", digest)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(stored)

        do_HEAD = do_GET

        def do_PUT(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    other = copy_workspace(pk.workspace, tmp_path / "other")
    with serve_handler(Liar) as server:
        out = pk.run("build", "--remote-cache-url", f"http://127.0.0.1:{server.server_port}", cwd=other)
    # The one task whose key the stolen artifact really carries is a true hit; the others
    # are refused by their manifests and built locally.
    assert len(pk.ran()) == 2
    assert out.stderr.count("failed verification") == 2
    assert outputs(other)["web"]["app.js"][1].startswith(b"def helper")


def test_an_artifact_without_its_log_is_one_miss_and_one_warning(pk, tmp_path):
    # The log is part of the format: such an artifact fails verification before anything is
    # restored, so the task gets one status line, never "hit" and then "miss".
    from support import craft, manifest

    key = pk.keys()["shared-utils:build"]
    files = {"dist/utils.txt": b"from the server\n"}
    blob = craft(files, key=key, meta={**manifest(files, key=key), "logs": {}}, drop=("logs/output.log",))

    class NoLog(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.send_header("X-Artifact-Hash", hashlib.sha256(blob).hexdigest())
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(blob)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    with serve_handler(NoLog) as server:
        out = pk.run("build", "shared-utils", "--remote-cache-readonly",
                     "--remote-cache-url", f"http://127.0.0.1:{server.server_port}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("shared-utils:build  ")]
    assert lines == ["shared-utils:build  miss"]
    assert out.stderr.count("warning:") == 1 and "output.log" in out.stderr
    assert pk.ran() == ["shared-utils:build"]


def test_no_remote_cache_never_connects(pk):
    accepted = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        (pk.workspace / "polykit.toml").write_text(
            (pk.workspace / "polykit.toml").read_text() + f'url = "http://127.0.0.1:{port}"\n')
        out = pk.run("build", "--no-remote-cache")
        assert pk.ran() == BUILDS
        assert out.stderr == "" and "remote" not in out.stdout.replace("0 remote hits", "")
        assert accepted == []
    finally:
        stop.set()
        thread.join(2)
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_failed_task_is_not_cached_and_stops_its_dependents(pk):
    toml = pk.workspace / "packages/shared-utils/polykit.toml"
    toml.write_text(toml.read_text().replace("cat src/*.py", "cat src/*.py && exit 3"))
    out = pk.run("build", "--no-remote-cache", check=False)
    assert out.returncode == 1
    lines = status_lines(out.stdout)
    assert lines["shared-utils:build"] == "failed (exit 3)"
    assert lines["web:build"].startswith("skipped") and lines["api-server:build"].startswith("skipped")
    assert pk.ran() == []  # the marker line comes after the failing step
    out = pk.run("build", "--no-remote-cache", check=False)
    assert status_lines(out.stdout)["shared-utils:build"] == "failed (exit 3)"  # not cached


def test_continue_on_error_runs_what_does_not_depend_on_the_failure(pk):
    toml = pk.workspace / "packages/web/polykit.toml"
    toml.write_text(toml.read_text().replace("mkdir -p dist/assets/empty", "false"))
    out = pk.run("run", "lint", "-j", "1", "--continue-on-error", "--no-remote-cache", check=False)
    assert out.returncode == 1
    assert "web:build  failed (exit 1)" in out.stdout and "web:lint  skipped" in out.stdout
    assert "shared-utils:build" in pk.ran()


def test_no_cache_runs_every_command_and_stores_nothing(pk):
    pk.run("build", "--no-cache")
    pk.run("build", "--no-cache")
    assert pk.ran() == sorted(BUILDS * 2)
    assert not (pk.workspace / ".polykit" / "cache").exists()


def test_a_task_without_outputs_caches_its_log_only_and_says_so(pk):
    first = pk.run("test", "shared-utils", "--no-remote-cache")
    assert "warning: shared-utils:test declares no outputs: only its log is cached" in first.stderr
    pk.ran()
    second = pk.run("test", "shared-utils", "--no-remote-cache")
    assert pk.ran() == []
    assert "testing shared-utils" in second.stdout


def test_parallel_runs_prefix_live_output(pk):
    out = pk.run("build", "-j", "3", "--no-remote-cache")
    assert "web:build: built web" in out.stdout
    out = pk.run("build", "-j", "1", "--no-cache")
    assert "\nbuilt web\n" in out.stdout


def test_a_bad_remote_url_is_a_warning_and_the_build_goes_on(pk):
    out = pk.run("build", "--remote-cache-url", "ftp://nowhere")
    assert pk.ran() == BUILDS
    assert out.stderr.startswith("warning:") and "ftp://nowhere" in out.stderr


def test_transfers_show_progress_when_stderr_is_a_terminal(pk, tmp_path):
    import pty
    import subprocess
    import sys

    toml = pk.workspace / "packages/web/polykit.toml"
    toml.write_text(toml.read_text().replace("cat ../shared-utils", "head -c 3000000 /dev/urandom > dist/big.bin && cat ../shared-utils"))
    with thread_server(tmp_path / "store") as (port, _):
        url = f"http://127.0.0.1:{port}"
        pk.run("build", "--remote-cache-url", url)
        other = copy_workspace(pk.workspace, tmp_path / "other")
        master, slave = pty.openpty()
        try:
            proc = subprocess.run([sys.executable, "-m", "polykit_client", "build", "--remote-cache-url", url],
                                  cwd=other, env=pk.env, stdout=subprocess.PIPE, stderr=slave, timeout=120)
            os.close(slave)
            seen = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            os.close(master)
    assert proc.returncode == 0
    assert b"web:build  downloading" in seen and b"MiB" in seen
    assert b"downloading" not in proc.stdout


def test_a_local_cache_on_another_filesystem_restores_outputs(pk, tmp_path):
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to put the cache on")
    with tempfile.TemporaryDirectory(dir=shm) as cache:
        root_toml = pk.workspace / "polykit.toml"
        root_toml.write_text(root_toml.read_text().replace("default_parallel = 4", f'default_parallel = 4\ncache_dir = "{cache}"'))
        pk.run("build", "--no-remote-cache")
        built = outputs(pk.workspace)
        pk.ran()
        for folder in ("web/dist", "api-server/target", "shared-utils/dist"):
            import shutil

            shutil.rmtree(pk.workspace / "packages" / folder)
        out = pk.run("build", "--no-remote-cache")
        assert pk.ran() == [] and "3 local hits" in out.stdout
        assert outputs(pk.workspace) == built


def poisoned_artifact(tmp_path, key, files: dict, links: dict = None) -> bytes:
    """A well-formed artifact for the real key that places files the task never declared."""
    import io

    from polykit_client import artifact

    src = tmp_path / "poison-src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    buf = io.BytesIO()
    artifact.pack(buf, src, sorted(files), {"package": "web", "task": "build"}, log=b"", cache_key=key)
    return buf.getvalue()


def test_a_poisoned_artifact_cannot_overwrite_sources(pk, tmp_path):
    key = pk.keys()["shared-utils:build"]
    source = pk.workspace / "packages/shared-utils/src/utils.py"
    original = source.read_bytes()
    blob = poisoned_artifact(tmp_path, key, {"src/utils.py": b"print('trojan')\n", "dist/utils.txt": b"x"})
    with thread_server(tmp_path / "store") as (port, _):
        assert request(port, "PUT", f"/v1/artifacts/{key}", blob)[0] == 201
        out = pk.run("build", "shared-utils", "--remote-cache-url", f"http://127.0.0.1:{port}")
    assert source.read_bytes() == original
    assert "not a declared output" in out.stderr and pk.ran() == ["shared-utils:build"]


def test_an_artifact_cannot_write_through_a_symlink_in_the_package(pk, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    toml = pk.workspace / "packages/shared-utils/polykit.toml"
    toml.write_text(toml.read_text().replace('outputs = ["dist/**"]', 'outputs = ["dist/**", "out/**"]'))
    os.symlink(outside, pk.workspace / "packages/shared-utils/out")
    key = pk.keys()["shared-utils:build"]
    blob = poisoned_artifact(tmp_path, key, {"out/pwned": b"x", "dist/utils.txt": b"x"})
    with thread_server(tmp_path / "store") as (port, _):
        assert request(port, "PUT", f"/v1/artifacts/{key}", blob)[0] == 201
        out = pk.run("build", "shared-utils", "--remote-cache-url", f"http://127.0.0.1:{port}")
    assert not (outside / "pwned").exists()
    assert "through the symlink" in out.stderr and pk.ran() == ["shared-utils:build"]


def test_binary_task_output_never_breaks_the_console(pk):
    import subprocess
    import sys

    toml = pk.workspace / "packages/shared-utils/polykit.toml"
    toml.write_text(toml.read_text().replace("echo built shared-utils", r"printf 'h\\351llo \\377\\376 caf\\303\\251\\n'"))
    env = {**pk.env, "PYTHONIOENCODING": "ascii"}
    for expected in (b"shared-utils:build  miss", b"shared-utils:build  hit (local)"):
        out = subprocess.run([sys.executable, "-m", "polykit_client", "build", "shared-utils", "--no-remote-cache"],
                             cwd=pk.workspace, env=env, capture_output=True, timeout=60)
        assert out.returncode == 0 and b"Traceback" not in out.stderr
        assert expected in out.stdout and b"h\xe9llo \xff\xfe caf\xc3\xa9\n" in out.stdout  # passed on unchanged


def test_parallel_zero_is_refused(pk):
    out = pk.run("build", "-j", "0", check=False)
    assert out.returncode == 2 and "--parallel must be at least 1" in out.stderr


def test_concurrent_runs_in_one_workspace_never_damage_each_other(pk):
    import subprocess
    import sys

    toml = pk.workspace / "packages/web/polykit.toml"
    toml.write_text(toml.read_text().replace("mkdir -p dist/assets/empty", "mkdir -p dist/assets/empty dist/many && for i in $(seq 1500); do echo $i > dist/many/$i; done"))
    pk.run("build", "--no-remote-cache")
    expected = outputs(pk.workspace)
    for _ in range(3):
        runs = [subprocess.Popen([sys.executable, "-m", "polykit_client", "build", "--no-remote-cache"], cwd=pk.workspace,
                                 env=pk.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        results = [r.communicate(timeout=120) + (r.returncode,) for r in runs]
        for stdout, stderr, code in results:
            assert code == 0 and "warning" not in stderr, stdout + stderr
            assert "3 local hits" in stdout
        assert outputs(pk.workspace) == expected


HOLDER = """
import os, sys
from polykit_client.runner import held
fd = os.open(sys.argv[1], os.O_RDWR)
with held(fd, "web:build"):
    print("holding web:build", flush=True)
    sys.stdin.readline()
    print("waiting for api-server:build", flush=True)
    with held(fd, "api-server:build"):
        print("got api-server:build", flush=True)
"""


def test_two_runs_each_waiting_for_a_task_the_other_holds_both_go_on(tmp_path):
    # Record locks belong to processes: this process holds api-server:build in one thread and
    # waits for web:build in another, while the other run holds web:build and waits for
    # api-server:build. No thread waits for itself, so both must go on; with blocking locks the
    # kernel saw a cycle and failed one of them with EDEADLK (seen as a failed task under load).
    import subprocess
    import sys
    import time

    from polykit_client.runner import held

    lock = tmp_path / "tasks.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    release = threading.Event()
    results: list = []

    def hold_api() -> None:
        with held(fd, "api-server:build"):
            holding.set()
            release.wait(60)

    def want_web() -> None:
        try:
            with held(fd, "web:build"):
                results.append("got web:build")
        except OSError as exc:
            results.append(exc)

    try:
        holding = threading.Event()
        holder = threading.Thread(target=hold_api)
        holder.start()
        assert holding.wait(60)
        assert other.stdout.readline() == "holding web:build\n"
        waiter = threading.Thread(target=want_web)
        waiter.start()  # waits: the other run holds web:build
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline() == "waiting for api-server:build\n"
        time.sleep(0.3)  # lets both waits begin (the order does not matter to the outcome)
        release.set()
        holder.join(60)
        out, err = other.communicate(timeout=60)
        waiter.join(60)
    finally:
        release.set()
        other.kill() if other.poll() is None else None
        os.close(fd)
    assert other.returncode == 0 and out == "got api-server:build\n", err
    assert results == ["got web:build"]


def test_a_long_log_without_newlines_is_captured_and_replayed(pk):
    import subprocess
    import sys

    toml = pk.workspace / "packages/shared-utils/polykit.toml"
    toml.write_text(toml.read_text().replace("echo built shared-utils", "head -c 30000000 /dev/zero | tr -c x x"))
    for expected in (b"shared-utils:build  miss", b"shared-utils:build  hit (local)"):
        out = subprocess.run([sys.executable, "-m", "polykit_client", "build", "shared-utils", "--no-remote-cache", "-j", "1"],
                             cwd=pk.workspace, env=pk.env, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout and out.stdout.count(b"x") >= 30_000_000


def test_outputs_already_in_place_are_not_restored_again(pk):
    pk.run("build", "--no-remote-cache")
    app_js = pk.workspace / "packages/web/dist/app.js"
    inode = app_js.stat().st_ino
    out = pk.run("build", "--no-remote-cache")
    assert "3 local hits" in out.stdout and "built web" in out.stdout  # the log is still replayed
    assert app_js.stat().st_ino == inode  # left alone, not rewritten
    # Changed in place with its size and mtime put back: ctime gives it away, the hit restores.
    st = app_js.stat()
    original = app_js.read_bytes()
    app_js.write_bytes(original.upper()[: len(original)])
    os.utime(app_js, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = pk.run("build", "--no-remote-cache")
    assert "3 local hits" in out.stdout and app_js.read_bytes() == original


CHANGER = """
import os, sys
from polykit_client.runner import held
fd = os.open(sys.argv[1], os.O_RDWR)
with held(fd, "web:build"):
    print("holding web:build", flush=True)
    sys.stdin.readline()
    with open(sys.argv[2], "ab") as fh:
        fh.write(b"// changed by the other run")
"""


def test_a_task_held_by_another_run_is_checked_once_that_run_is_done_though_its_outputs_were_in_place(pk):
    # A hit whose outputs are in place is reported by the scheduler itself, which never waits
    # for a task's lock: a task another run holds goes the long way, which waits for it, and only
    # then looks at its outputs. Here the other run changes them before it lets go: they are restored.
    import subprocess
    import sys

    pk.run("build", "--no-remote-cache")
    app_js = pk.workspace / "packages/web/dist/app.js"
    original = app_js.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", CHANGER, str(pk.workspace / ".polykit/tasks.lock"), str(app_js)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=pk.env,
                              cwd=Path(__file__).resolve().parent.parent)
    build = None
    try:
        assert holder.stdout.readline() == "holding web:build\n"
        build = subprocess.Popen([sys.executable, "-m", "polykit_client", "build", "--no-remote-cache"], cwd=pk.workspace,
                                 env=pk.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = set()
        while len(seen) < 2:
            line = build.stdout.readline()
            assert line, build.stderr.read()
            if line.endswith("  hit (local)\n"):
                seen.add(line.split()[0])
        assert seen == {"shared-utils:build", "api-server:build"}
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(60) == 0
        rest, err = build.communicate(timeout=120)
        assert build.returncode == 0, err
        assert "web:build  hit (local)" in rest and "3 local hits" in rest
        assert app_js.read_bytes() == original
    finally:
        for proc in (holder, build):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_artifact_holds_the_outputs_as_their_task_left_them_though_written_beside_the_next_task(tmp_path):
    # The artifact is compressed and stored on a packing thread while the next tasks run; its
    # bytes are still those hashed when the task ended, whatever a later task does to them.
    ws = tmp_path / "ws"
    (ws / "packages" / "a" / "src").mkdir(parents=True)
    (ws / "packages" / "b" / "src").mkdir(parents=True)
    (ws / "polykit.toml").write_text('[workspace]\npackages_dir = "packages"\n')
    (ws / "packages" / "a" / "src" / "in.txt").write_text("a\n")
    (ws / "packages" / "b" / "src" / "in.txt").write_text("b\n")
    (ws / "packages" / "a" / "polykit.toml").write_text(
        'name = "a"\n[tasks]\nbuild = { command = "mkdir -p dist && echo built > dist/out.txt", outputs = ["dist/**"] }\n')
    (ws / "packages" / "b" / "polykit.toml").write_text(
        'name = "b"\n[deps]\ninternal = ["a"]\n[tasks]\n'
        'build = { command = "echo changed by b > ../a/dist/out.txt && mkdir -p dist && echo b > dist/b.txt",'
        ' outputs = ["dist/**"] }\n')
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    out = pk.run("build", "--no-remote-cache", "-j", "1")
    assert status_lines(out.stdout) == {"a:build": "miss", "b:build": "miss"}
    out = pk.run("build", "--no-remote-cache")  # a's output is not as a left it: restored from the artifact
    assert status_lines(out.stdout)["a:build"] == "hit (local)"
    assert (ws / "packages" / "a" / "dist" / "out.txt").read_text() == "built\n"


def test_held_hit_lines_are_written_in_order_at_the_next_flush_or_line():
    import io

    from polykit_client.graph import Node
    from polykit_client.runner import HELD_LIMIT, Console

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)
    console = Console(True, out=out, err=io.StringIO())
    web, api = Node("web", "build"), Node("api", "build")
    console.hold(web, "web:build  hit (local)", b"built web\n")
    console.hold(api, "api:build  hit (local)", b"")
    assert raw.getvalue() == b""  # nothing written yet
    console.line("lib:build  miss")
    assert raw.getvalue() == b"web:build  hit (local)\nweb:build: built web\napi:build  hit (local)\nlib:build  miss\n"
    console.hold(web, "web:build  hit (local)", b"\xff binary\n")
    console.flush()
    assert raw.getvalue().endswith(b"web:build  hit (local)\nweb:build: \xff binary\n")
    before = len(raw.getvalue())
    for _ in range(HELD_LIMIT // 20):
        console.hold(api, "api:build  hit (local)", b"")
    assert before < len(raw.getvalue()) <= before + HELD_LIMIT + 100  # written out past the limit, not kept
