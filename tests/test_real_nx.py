"""Nx's self-hosted remote cache with the real ``nx`` (installed by .ci/run from npm)."""

import os
import subprocess
from pathlib import Path

import pytest

from realtools import READ_ONLY, READ_WRITE, TOOLS, WRONG, find_tool, fresh_copy, secured_server, uploads
from support import free_port, thread_server

NX = find_tool("nx")
pytestmark = pytest.mark.skipif(NX is None or not (TOOLS / "node_modules" / "nx").is_dir(),
                                reason="nx could not be installed (npm install nx into .ci/tools)")

PACKAGES = ("a", "b")


def make_workspace(root: Path, runs: Path) -> Path:
    (root / "packages").mkdir(parents=True)
    (root / "package.json").write_text('{"name": "nx-ws", "private": true}\n')
    (root / "nx.json").write_text('{"targetDefaults": {"build": {"cache": true, "outputs": ["{projectRoot}/dist"]}}}\n')
    for name in PACKAGES:
        (root / "packages" / name).mkdir()
        (root / "packages" / name / "src.txt").write_text(f"source of {name}\n")
        command = f"mkdir -p dist && tr a-z A-Z < src.txt > dist/out.txt && echo {name} >> {runs}"
        (root / "packages" / name / "project.json").write_text(
            '{"name": "%s", "targets": {"build": {"command": "%s", "options": {"cwd": "packages/%s"}}}}\n'
            % (name, command, name))
    # Nx runs from the workspace's own node_modules; CI installed it once for every workspace.
    (root / "node_modules").symlink_to(TOOLS / "node_modules")
    return root


def nx_build(workspace: Path, url: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env.update({"NX_DAEMON": "false", "NX_NO_CLOUD": "true", "NX_TUI": "false", "CI": "true",
                "NX_SELF_HOSTED_REMOTE_CACHE_SERVER": url})
    if token is not None:
        env["NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN"] = token
    return subprocess.run([str(workspace / "node_modules" / ".bin" / "nx"), "run-many", "-t", "build"],
                          cwd=workspace, env=env, capture_output=True, text=True, timeout=180)


def outputs(workspace: Path) -> dict:
    return {name: (workspace / "packages" / name / "dist" / "out.txt").read_text() for name in PACKAGES}


@pytest.fixture
def project(tmp_path):
    runs = tmp_path / "runs.log"
    runs.write_text("")
    return make_workspace(tmp_path / "source", runs), runs


def test_nx_second_clean_build_gets_remote_hits(tmp_path, project):
    source, runs = project
    with thread_server(tmp_path / "store") as (port, app):
        url = f"http://127.0.0.1:{port}"
        one = nx_build(fresh_copy(source, tmp_path / "one"), url)
        assert one.returncode == 0, one.stdout + one.stderr
        assert uploads(app) == len(PACKAGES)
        two = nx_build(fresh_copy(source, tmp_path / "two"), url)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("[remote cache]") == len(PACKAGES), two.stdout
    assert sorted(runs.read_text().split()) == sorted(PACKAGES)  # the second build ran nothing (tasks run in parallel)
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one") == {n: f"SOURCE OF {n.upper()}\n" for n in PACKAGES}


def test_nx_with_tokens_anonymous_reads_namespaces_and_a_server_down(tmp_path, project):
    source, runs = project
    with secured_server(tmp_path) as (port, app):
        url = f"http://127.0.0.1:{port}/nx-v2"
        stored = nx_build(fresh_copy(source, tmp_path / "rw"), url, READ_WRITE)
        assert stored.returncode == 0 and uploads(app) == len(PACKAGES), stored.stdout + stored.stderr
        for name, token in (("ro", READ_ONLY), ("anonymous", None)):
            hit = nx_build(fresh_copy(source, tmp_path / name), url, token)
            assert hit.returncode == 0, hit.stdout + hit.stderr
            assert hit.stdout.count("[remote cache]") == len(PACKAGES), (name, hit.stdout)
            assert outputs(tmp_path / name) == outputs(tmp_path / "rw")
        assert sorted(runs.read_text().split()) == sorted(PACKAGES)
        # Another namespace: nothing to read there, and an anonymous upload is 403, which Nx tolerates.
        other = nx_build(fresh_copy(source, tmp_path / "other"), f"http://127.0.0.1:{port}/nx-v3")
        assert other.returncode == 0, other.stdout + other.stderr
        assert "[remote cache]" not in other.stdout and uploads(app) == len(PACKAGES)
        assert len(runs.read_text().split()) == 2 * len(PACKAGES)
        # Nx stops at a 401 by design; what matters is that it shows the server's reason.
        wrong = nx_build(fresh_copy(source, tmp_path / "wrong"), url, WRONG)
        assert wrong.returncode != 0
        assert "Unauthorized: The token is not valid for this cache." in wrong.stdout + wrong.stderr
        assert "Misconfigured remote cache endpoint" not in wrong.stdout + wrong.stderr
    # Nx also stops when its remote cache cannot be reached (its own choice; the README says so),
    # naming the URL it tried.
    down_url = f"http://127.0.0.1:{free_port()}"
    down = nx_build(fresh_copy(source, tmp_path / "down"), down_url)
    assert down.returncode != 0 and f"Failed to send request: error sending request for url ({down_url}/v1/cache/" in down.stdout + down.stderr
