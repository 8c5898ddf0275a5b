"""Real build tools against a real polykit-cache: ccache, in each of its remote layouts."""

import os
import shutil
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
