"""Real build tools against a real polykit-cache: ccache in each of its remote layouts, and turbo."""

import os
import shutil
from pathlib import Path
import subprocess

import pytest

from support import thread_server

SOURCES = {f"unit{i}.c": f"int unit{i}(int x) {{ return x * {i + 2} + {i}; }}\n" for i in range(4)}


def ccache_stats(env: dict) -> dict:
    out = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in (line.split("\t") for line in out.stdout.splitlines() if "\t" in line) if v.isdigit()}


def compile_all(src, cache_dir, remote: str) -> dict:
    env = {**os.environ, "CCACHE_DIR": str(cache_dir), "CCACHE_REMOTE_STORAGE": remote,
           "CCACHE_NOHASHDIR": "1", "CCACHE_BASEDIR": str(src)}
    for name in SOURCES:
        subprocess.run(["ccache", "gcc", "-c", name, "-o", name[:-2] + ".o"], cwd=src, env=env, check=True)
    return ccache_stats(env)


@pytest.mark.skipif(shutil.which("ccache") is None or shutil.which("gcc") is None, reason="ccache and gcc are not installed")
@pytest.mark.parametrize("layout", ["/kv/ccache|layout=subdirs", "/kv/ccache|layout=flat", "|layout=bazel"])
def test_ccache_gets_remote_hits_with_two_empty_local_caches(tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in SOURCES.items():
        (src / name).write_text(text)
    with thread_server(tmp_path / "store") as (port, app):
        remote = f"http://127.0.0.1:{port}{layout}"
        first = compile_all(src, tmp_path / "ccache-1", remote)
        assert first.get("remote_storage_miss", 0) == len(SOURCES), first
        assert app.metrics.stats()["uploads"] >= len(SOURCES)
        objects = {name: (src / (name[:-2] + ".o")).read_bytes() for name in SOURCES}
        for name in SOURCES:
            (src / (name[:-2] + ".o")).unlink()
        second = compile_all(src, tmp_path / "ccache-2", remote)
        assert second.get("remote_storage_hit", 0) == len(SOURCES), second
        assert {name: (src / (name[:-2] + ".o")).read_bytes() for name in SOURCES} == objects


@pytest.mark.skipif(shutil.which("ccache") is None or shutil.which("gcc") is None, reason="ccache and gcc are not installed")
def test_ccache_sends_its_bearer_token(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, text in SOURCES.items():
        (src / name).write_text(text)
    tokens = tmp_path / "tokens"
    tokens.write_text("read-write ccache-token-123\n")
    with thread_server(tmp_path / "store", token_file=tokens) as (port, app):
        denied = compile_all(src, tmp_path / "c0", f"http://127.0.0.1:{port}/kv/ccache")
        assert app.metrics.stats()["uploads"] == 0 and denied.get("remote_storage_hit", 0) == 0
        compile_all(src, tmp_path / "c1", f"http://127.0.0.1:{port}/kv/ccache|bearer-token=ccache-token-123")
        assert app.metrics.stats()["uploads"] >= len(SOURCES)  # a manifest and a result per file
        second = compile_all(src, tmp_path / "c2", f"http://127.0.0.1:{port}/kv/ccache|bearer-token=ccache-token-123")
        assert second.get("remote_storage_hit", 0) == len(SOURCES)


def find_turbo():
    local = Path(__file__).resolve().parent.parent / ".ci" / "tools" / "node_modules" / ".bin" / "turbo"
    return str(local) if local.exists() else shutil.which("turbo")


TURBO_FILES = {
    "package.json": '{"name": "tw", "private": true, "packageManager": "npm@10.9.0", "workspaces": ["packages/*"]}\n',
    "turbo.json": '{"tasks": {"build": {"dependsOn": ["^build"], "outputs": ["dist/**"]}}}\n',
    ".gitignore": "dist/\n.turbo/\nnode_modules/\n",
    "package-lock.json": '{"name": "tw", "lockfileVersion": 3, "requires": true, "packages": {"": {"name": "tw", '
                         '"workspaces": ["packages/*"]}, "node_modules/a": {"resolved": "packages/a", "link": true}, '
                         '"node_modules/b": {"resolved": "packages/b", "link": true}, "packages/a": {"name": "a", '
                         '"version": "1.0.0"}, "packages/b": {"name": "b", "version": "1.0.0"}}}\n',
}


def turbo_clones(tmp_path):
    """Two clones of one small turbo monorepo; each build appends to ran-<package> when it runs."""
    first = tmp_path / "first"
    for rel, text in TURBO_FILES.items():
        (first / rel).parent.mkdir(parents=True, exist_ok=True)
        (first / rel).write_text(text)
    for name in ("a", "b"):
        (first / "packages" / name).mkdir(parents=True)
        script = f"mkdir -p dist && echo built-{name} > dist/out.txt && echo ran >> ../../../ran-{name}"
        (first / "packages" / name / "package.json").write_text(
            '{"name": "%s", "version": "1.0.0", "scripts": {"build": "%s"}}\n' % (name, script))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(git + ["init", "-q"], cwd=first, check=True)
    subprocess.run(git + ["add", "."], cwd=first, check=True)
    subprocess.run(git + ["commit", "-qm", "sources"], cwd=first, check=True)
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
    return first, second


TURBO_ENV = {**os.environ, "TURBO_TELEMETRY_DISABLED": "1", "DO_NOT_TRACK": "1", "TURBO_NO_UPDATE_NOTIFIER": "1"}


@pytest.mark.skipif(find_turbo() is None or shutil.which("git") is None, reason="turbo (npm) or git is not installed")
def test_turbo_gets_remote_hits_in_a_second_clone(tmp_path):
    first, second = turbo_clones(tmp_path)
    env = TURBO_ENV
    with thread_server(tmp_path / "store") as (port, app):
        command = [find_turbo(), "run", "build", f"--api=http://127.0.0.1:{port}", "--token=any-token", "--team=my-team"]
        one = subprocess.run(command, cwd=first, env=env, capture_output=True, text=True, timeout=120)
        assert one.returncode == 0, one.stdout + one.stderr
        assert "cache miss" in one.stdout and app.metrics.stats()["uploads"] == 2
        two = subprocess.run(command, cwd=second, env=env, capture_output=True, text=True, timeout=120)
    output = two.stdout + two.stderr
    assert two.returncode == 0, output
    assert "2 cached, 2 total" in output and "FULL TURBO" in output
    lowered = output.lower()
    assert "failed to contact remote cache" not in lowered
    assert not [line for line in lowered.splitlines() if "warning" in line and "cache" in line], output
    assert (second / "packages/a/dist/out.txt").read_text() == "built-a\n"
    assert (tmp_path / "ran-a").read_text().count("ran") == 1  # the second clone ran nothing


@pytest.mark.skipif(find_turbo() is None or shutil.which("git") is None, reason="turbo (npm) or git is not installed")
def test_turbo_preflight_with_tokens_in_a_namespace(tmp_path):
    """--preflight: turbo sends OPTIONS first, and its token only where the answer allows it."""
    from realtools import READ_WRITE, secured_server

    first, second = turbo_clones(tmp_path)
    with secured_server(tmp_path) as (port, app):
        command = [find_turbo(), "run", "build", "--preflight", f"--api=http://127.0.0.1:{port}/turbo-v2",
                   f"--token={READ_WRITE}", "--team=my-team"]
        one = subprocess.run(command, cwd=first, env=TURBO_ENV, capture_output=True, text=True, timeout=120)
        assert one.returncode == 0 and app.metrics.stats()["uploads"] == 2, one.stdout + one.stderr
        two = subprocess.run(command, cwd=second, env=TURBO_ENV, capture_output=True, text=True, timeout=120)
        assert any(method == "OPTIONS" for _, method, _ in app.metrics.requests)
    assert two.returncode == 0 and "FULL TURBO" in two.stdout, two.stdout + two.stderr
    assert (tmp_path / "ran-a").read_text().count("ran") == 1
