"""Bazel's HTTP remote cache with the real ``bazel`` (Debian's bazel-bootstrap 4.2, installed by .ci/run).

Each build is a fresh copy of a one-rule workspace with its own output base under the test's
folder, none of the user's rc files and local spawns (no sandbox), so an action either runs or comes from the
server. Tokens travel as ``user:token@`` in the URL: basic authentication, the token as password.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from realtools import READ_ONLY, READ_WRITE, WRONG, fresh_copy, secured_server, uploads
from support import free_port, thread_server

BAZEL = shutil.which("bazel")
pytestmark = pytest.mark.skipif(BAZEL is None or shutil.which("java") is None,
                                reason="bazel could not be installed (apt-get install bazel-bootstrap)")

BUILD = 'genrule(name = "out", srcs = ["in.txt"], outs = ["out.txt"], cmd = "tr a-z A-Z < $< > $@ && echo ran >> {runs}")\n'


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "source"
    root.mkdir()
    (root / "WORKSPACE").write_text("")
    (root / "in.txt").write_text("hello from bazel\n")
    (root / "BUILD").write_text(BUILD.format(runs=tmp_path / "runs.log"))
    return root


def bazel_build(tmp_path: Path, source: Path, name: str, url: str) -> tuple[str, Path]:
    workspace = fresh_copy(source, tmp_path / name)
    # Debian's system rc names the packaged install base: it stays; the user's rc files do not.
    command = [BAZEL, "--nohome_rc", "--noworkspace_rc", "--batch",
               f"--output_user_root={tmp_path / 'bazel-root'}",
               "build", "--spawn_strategy=local", f"--remote_cache={url}", "//:out"]
    result = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr, workspace


def remote_hit(log: str) -> bool:
    return "1 remote cache hit" in log


def output(workspace: Path) -> str:
    return (workspace / "bazel-bin" / "out.txt").read_text()


def test_bazel_open_tokens_anonymous_reads_namespaces_and_a_server_down(tmp_path, project):
    runs = tmp_path / "runs.log"
    with thread_server(tmp_path / "store") as (port, app):
        first, one = bazel_build(tmp_path, project, "one", f"http://127.0.0.1:{port}")
        assert not remote_hit(first) and uploads(app) >= 2  # the action result and its output
        second, two = bazel_build(tmp_path, project, "two", f"http://127.0.0.1:{port}")
        assert remote_hit(second), second
        assert output(two) == output(one) == "HELLO FROM BAZEL\n" and runs.read_text().count("ran") == 1
    with secured_server(tmp_path) as (port, app):
        stored, _ = bazel_build(tmp_path, project, "rw", f"http://ci:{READ_WRITE}@127.0.0.1:{port}/team-a")
        assert not remote_hit(stored) and uploads(app) >= 2, stored
        count = uploads(app)
        for name, url in (("ro", f"http://ci:{READ_ONLY}@127.0.0.1:{port}/team-a"),
                          ("anonymous", f"http://127.0.0.1:{port}/team-a")):
            hit, workspace = bazel_build(tmp_path, project, name, url)
            assert remote_hit(hit), (name, hit)
            assert output(workspace) == output(one)
        # Another instance holds nothing; a read token's uploads are refused and the build is green.
        other, _ = bazel_build(tmp_path, project, "other", f"http://ci:{READ_ONLY}@127.0.0.1:{port}/team-b")
        assert not remote_hit(other) and uploads(app) == count
        wrong, _ = bazel_build(tmp_path, project, "wrong", f"http://ci:{WRONG}@127.0.0.1:{port}/team-a")
        assert not remote_hit(wrong) and "401" in wrong
    down, workspace = bazel_build(tmp_path, project, "down", f"http://127.0.0.1:{free_port()}")
    assert not remote_hit(down) and output(workspace) == output(one)
