"""Gradle's HTTP build cache with the real ``gradle`` (Debian's package, installed by .ci/run).

Gradle sends basic authentication only: the token is its password. Each build is a fresh copy of
a tiny Java project with the local build cache off, so a task either runs or comes from the server.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from realtools import READ_ONLY, READ_WRITE, WRONG, fresh_copy, secured_server, uploads
from support import free_port, thread_server

GRADLE = shutil.which("gradle")
pytestmark = pytest.mark.skipif(GRADLE is None or shutil.which("java") is None,
                                reason="gradle could not be installed (apt-get install gradle)")

SETTINGS = """
buildCache {
    local { enabled = false }
    remote(HttpBuildCache) {
        url = System.getenv('CACHE_URL')
        push = true
        if (System.getenv('CACHE_TOKEN')) {
            credentials {
                username = 'gradle'
                password = System.getenv('CACHE_TOKEN')
            }
        }
    }
}
"""
SOURCES = {
    "settings.gradle": SETTINGS,
    "build.gradle": "apply plugin: 'java'\n",
    "src/main/java/p/A.java": "package p; public class A { public static int f() { return 41 + 1; } }\n",
    "src/main/java/p/B.java": "package p; public class B { public static String g() { return \"b\" + A.f(); } }\n",
}


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "source"
    for rel, text in SOURCES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def gradle_build(tmp_path: Path, source: Path, name: str, url: str, token: str | None = None):
    workspace = fresh_copy(source, tmp_path / name)
    env = {**os.environ, "CACHE_URL": url, "GRADLE_USER_HOME": str(tmp_path / "gradle-home")}
    env.pop("CACHE_TOKEN", None)
    if token is not None:
        env["CACHE_TOKEN"] = token
    result = subprocess.run([GRADLE, "--no-daemon", "--build-cache", "--console=plain", "compileJava"],
                            cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, workspace


def classes(workspace: Path) -> dict:
    out = workspace / "build" / "classes" / "java" / "main" / "p"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def from_cache(result) -> bool:
    return ":compileJava FROM-CACHE" in result.stdout


def test_gradle_open_tokens_anonymous_reads_namespaces_and_a_server_down(tmp_path, project):
    with thread_server(tmp_path / "store") as (port, app):
        first, one = gradle_build(tmp_path, project, "one", f"http://127.0.0.1:{port}/kv/gradle/")
        assert not from_cache(first) and uploads(app) == 1
        second, two = gradle_build(tmp_path, project, "two", f"http://127.0.0.1:{port}/kv/gradle/")
        assert from_cache(second), second.stdout
        assert classes(two) == classes(one)
    with secured_server(tmp_path) as (port, app):
        url = f"http://127.0.0.1:{port}/gradle-v2/kv/gradle/"
        stored, _ = gradle_build(tmp_path, project, "rw", url, READ_WRITE)
        assert not from_cache(stored) and uploads(app) == 1, stored.stdout + stored.stderr
        for name, token in (("ro", READ_ONLY), ("anonymous", None)):
            hit, workspace = gradle_build(tmp_path, project, name, url, token)
            assert from_cache(hit), (name, hit.stdout + hit.stderr)
            assert classes(workspace) == classes(one)
        # Another namespace holds nothing; a read token's upload is refused and the build is green.
        other, _ = gradle_build(tmp_path, project, "other", f"http://127.0.0.1:{port}/gradle-v3/kv/gradle/", READ_ONLY)
        assert not from_cache(other) and uploads(app) == 1
        wrong, _ = gradle_build(tmp_path, project, "wrong", url, WRONG)
        assert not from_cache(wrong) and "401" in wrong.stdout + wrong.stderr
    down, workspace = gradle_build(tmp_path, project, "down", f"http://127.0.0.1:{free_port()}/kv/gradle/")
    assert not from_cache(down) and classes(workspace) == classes(one)
