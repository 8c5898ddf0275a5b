"""Every cache-key component: changing it alone gives exactly the new keys it should."""

import json
import os
import shutil
import subprocess
import time

import pytest

from polykit_client.cachekey import KEY_FORMAT, key_of
from sample import Polykit, copy_workspace, make_tools, make_workspace

BUILDS = {"shared-utils:build", "api-server:build", "web:build"}


@pytest.fixture
def pk(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    return Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")


def changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {task for task in before if before[task] != after[task]}


def test_keys_are_stable_and_independent_of_the_checkout_folder(pk, tmp_path):
    first = pk.keys()
    assert set(first) == BUILDS
    assert pk.keys() == first
    other = copy_workspace(pk.workspace, tmp_path / "elsewhere" / "deeper" / "ws")
    assert Polykit(other, tmp_path / "tools", pk.marker).keys() == first


def test_an_input_file_changes_its_task_only(pk):
    before = pk.keys()
    (pk.workspace / "packages/web/src/app.ts").write_text("console.log('changed');\n")
    assert changed(before, pk.keys()) == {"web:build"}


def test_large_input_files_are_hashed_and_change_the_key(pk):
    big = pk.workspace / "packages/web/src/bundle.bin"
    big.write_bytes(os.urandom(600_000))  # above the size hashed in the thread pool
    before = pk.keys()
    data = bytearray(big.read_bytes())
    data[-1] ^= 1
    big.write_bytes(bytes(data))
    assert changed(before, pk.keys()) == {"web:build"}


def test_an_upstream_input_changes_every_task_downstream(pk):
    before = pk.keys()
    (pk.workspace / "packages/shared-utils/src/utils.py").write_text("def helper():\n    return 43\n")
    assert changed(before, pk.keys()) == BUILDS


def test_a_new_and_a_removed_input_file_change_the_key(pk):
    before = pk.keys()
    (pk.workspace / "packages/api-server/src/extra.rs").write_text("// new\n")
    after = pk.keys()
    assert changed(before, after) == {"api-server:build"}
    (pk.workspace / "packages/api-server/src/extra.rs").unlink()
    assert pk.keys() == before


def test_declared_outputs_are_not_inputs(pk):
    before = pk.keys()
    (pk.workspace / "packages/web/dist").mkdir()
    (pk.workspace / "packages/web/dist/app.js").write_text("stale output")
    assert pk.keys() == before


def test_the_command_changes_the_key(pk):
    before = json.loads(pk.run("build", "--dry-run", "--json").stdout)["tasks"]
    toml = pk.workspace / "packages/api-server/polykit.toml"
    toml.write_text(toml.read_text().replace("echo built api-server", "echo built the api-server"))
    after = json.loads(pk.run("build", "--dry-run", "--json").stdout)["tasks"]
    diff = {a["task"] for a, b in zip(before, after) if a["key"] != b["key"]}
    assert diff == {"api-server:build"}
    api = [t for t in after if t["task"] == "api-server:build"][0]
    assert "echo built the api-server" in api["components"]["command"]


def test_an_allow_listed_env_var_changes_keys_and_others_do_not(pk):
    before = pk.keys()
    assert pk.keys(UNLISTED_VARIABLE="whatever") == before
    assert changed(before, pk.keys(NODE_ENV="production")) == BUILDS  # the workspace's list
    assert changed(before, pk.keys(WEB_FLAVOUR="dark")) == {"web:build"}  # the task's own list
    assert pk.keys(NODE_ENV="") != pk.keys()  # set-but-empty differs from unset


def test_the_toolchain_version_changes_keys_of_its_language_only(pk, tmp_path):
    before = pk.keys()
    make_tools(tmp_path / "tools", {"node": "v22.1.0-newer"})
    assert changed(before, pk.keys()) == {"web:build"}
    make_tools(tmp_path / "tools", {"node": "v20.11.0", "rustc": "rustc 1.81.0 (fake)"})
    assert changed(before, pk.keys()) == {"api-server:build"}


def test_a_missing_toolchain_gives_a_fixed_marker(pk, tmp_path):
    (tmp_path / "tools" / "rustc").unlink()
    env_path = f"{tmp_path / 'tools'}{os.pathsep}/nonexistent"
    out = json.loads(pk.run("build", "--dry-run", "--json", PATH=env_path + os.pathsep + "/usr/bin:/bin").stdout)
    api = [t for t in out["tasks"] if t["task"] == "api-server:build"][0]
    assert api["components"]["toolchain"] == {"language": "rust", "version": "missing:rustc"}


def test_the_package_path_is_part_of_the_key(pk):
    before = pk.keys()
    shutil.move(pk.workspace / "packages/api-server", pk.workspace / "packages/api")
    after = pk.keys()
    assert changed(before, after) == {"api-server:build"}


def test_declared_outputs_are_part_of_the_key(pk):
    before = pk.keys()
    toml = pk.workspace / "packages/web/polykit.toml"
    toml.write_text(toml.read_text().replace('outputs = ["dist"]', 'outputs = ["dist", "extra"]'))
    assert "web:build" in changed(before, pk.keys())


def test_task_name_and_format_version_are_components():
    parts = {"format": KEY_FORMAT, "task": "build", "command": "make"}
    assert key_of(parts) != key_of({**parts, "task": "test"})
    assert key_of(parts) != key_of({**parts, "format": "polykit-cache-key/1"})
    assert key_of(parts) == key_of(dict(reversed(list(parts.items()))))


def test_dry_run_json_shows_every_component(pk):
    tasks = json.loads(pk.run("build", "--dry-run", "--json").stdout)["tasks"]
    web = [t for t in tasks if t["task"] == "web:build"][0]
    parts = web["components"]
    assert set(parts) == {"format", "package", "task", "command", "env", "inputs", "dependencies", "toolchain", "outputs"}
    assert parts["package"] == {"name": "web", "path": "packages/web"}
    assert set(parts["inputs"]) == {"polykit.toml", "package.json", "src/app.ts"}
    assert list(parts["dependencies"]) == ["shared-utils:build"]
    assert parts["env"] == {"NODE_ENV": None, "WEB_FLAVOUR": None}
    assert parts["toolchain"] == {"language": "ts", "version": "v20.11.0"}
    assert key_of(parts) == web["key"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_ignored_files_are_not_inputs(pk):
    run = lambda *a: subprocess.run(["git", *a], cwd=pk.workspace, check=True, capture_output=True)
    run("init", "-q")
    (pk.workspace / ".gitignore").write_text("*.log\n")
    before = pk.keys()
    (pk.workspace / "packages/web/debug.log").write_text("noise")
    assert pk.keys() == before
    (pk.workspace / "packages/web/notes.md").write_text("untracked but not ignored")
    assert changed(before, pk.keys()) == {"web:build"}


def age_tree(workspace):
    """Files an hour old: the stat cache keeps only files not touched in the last seconds."""
    old = time.time() - 3600
    for path in (workspace / "packages").rglob("*"):
        os.utime(path, (old, old))
    return old


def test_the_stat_cache_skips_unchanged_files_and_sees_changed_ones(pk):
    old = age_tree(pk.workspace)
    before = pk.keys()
    state = json.loads((pk.workspace / ".polykit/state.json").read_text())
    assert "app.ts" in state["folders"]["packages/web/src"][0].split("\0")
    assert pk.keys() == before
    app = pk.workspace / "packages/web/src/app.ts"
    app.write_text(app.read_text().replace("web", "WEB"))  # same size
    os.utime(app, (old + 10, old + 10))
    assert changed(before, pk.keys()) == {"web:build"}


def test_a_rewrite_that_restores_the_mtime_is_still_seen(pk):
    age_tree(pk.workspace)
    before = pk.keys()
    app = pk.workspace / "packages/web/src/app.ts"
    st = app.stat()
    app.write_text(app.read_text().replace("web", "WEB"))  # same size, same inode
    os.utime(app, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime put back
    assert changed(before, pk.keys()) == {"web:build"}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_files_of_a_git_submodule_are_inputs(pk, tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "protocol.file.allow=always"]
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "lib.c").write_text("int x;\n")
    subprocess.run(git + ["init", "-q"], cwd=lib, check=True)
    subprocess.run(git + ["add", "."], cwd=lib, check=True)
    subprocess.run(git + ["commit", "-qm", "lib"], cwd=lib, check=True)
    subprocess.run(git + ["init", "-q"], cwd=pk.workspace, check=True)
    subprocess.run(git + ["submodule", "add", "-q", str(lib), "packages/web/vendor"], cwd=pk.workspace,
                   check=True, capture_output=True)
    before = pk.keys()
    (pk.workspace / "packages/web/vendor/lib.c").write_text("int y;\n")
    assert changed(before, pk.keys()) == {"web:build"}


def test_the_stat_cache_round_trips_by_folder_and_forgets_only_what_is_damaged(tmp_path):
    from polykit_client.cachekey import StatCache

    path = tmp_path / "state.json"
    cache = StatCache(path)
    now = time.time_ns()
    for i in range(2000):
        cache.remember(f"pkg/src/m{i % 7}/f{i}.js", f"{i}:1:2:3", 1, f"{i:064x}", now)
    cache.remember("top.txt", "5:1:2:3", 1, "ab" * 32, now)
    cache.remember("racy.txt", "5:9:2:3", now, "cd" * 32, now)  # modified just now: not kept
    cache.save()
    again = StatCache(path)
    assert again.get("pkg/src/m3/f10.js", "10:1:2:3") == f"{10:064x}"
    assert again.get("pkg/src/m3/f10.js", "10:1:2:4") is None  # another signature: rehash
    assert again.get("top.txt", "5:1:2:3") == "ab" * 32
    assert again.get("racy.txt", "5:9:2:3") is None
    data = json.loads(path.read_text())
    data["folders"]["pkg/src/m3"] = ["f3", "only one", None]
    path.write_text(json.dumps(data))
    damaged = StatCache(path)
    assert damaged.get("pkg/src/m3/f10.js", "10:1:2:3") is None
    assert damaged.get("pkg/src/m4/f11.js", "11:1:2:3") == f"{11:064x}"
