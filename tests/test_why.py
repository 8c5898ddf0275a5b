"""``polykit why``: every kind of difference, followed up the graph, locally and against the server."""

from __future__ import annotations

import json

import pytest
import zstandard

from polykit_client.components import RECORD_FILE, env_digest, for_manifest, inputs_digest, load_records, recorded_keys
from polykit_client.why import compare
from sample import Polykit, copy_workspace, make_tools, make_workspace
from support import thread_server

WEB_TOML = "packages/web/polykit.toml"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture
def built(tmp_path):
    """The sample workspace after one build (so every task has a record)."""
    ws = make_workspace(tmp_path / "ws")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    pk.run("build")
    return pk


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def why_lines(pk: Polykit, *args: str, **env: str) -> list[str]:
    out = pk.run("why", "web:build", *args, **env)
    return [line.strip() for line in out.stdout.splitlines()]


MUTATIONS = {
    "file-changed": (lambda ws: (ws / "packages/web/src/app.ts").write_text("changed\n"), {}, "file changed: src/app.ts"),
    "file-added": (lambda ws: (ws / "packages/web/src/extra.ts").write_text("new\n"), {}, "file added: src/extra.ts"),
    "file-removed": (lambda ws: (ws / "packages/web/package.json").unlink(), {}, "file removed: package.json"),
    "env-changed": (lambda ws: None, {"NODE_ENV": "production"}, "environment variable changed: NODE_ENV"),
    "env-added": (lambda ws: edit(ws / WEB_TOML, 'env = ["WEB_FLAVOUR"]', 'env = ["WEB_FLAVOUR", "API_URL"]'), {},
                  "environment variable now recorded: API_URL"),
    "env-removed": (lambda ws: edit(ws / WEB_TOML, 'env = ["WEB_FLAVOUR"]', "env = []"), {},
                    "environment variable no longer recorded: WEB_FLAVOUR"),
    "command": (lambda ws: edit(ws / WEB_TOML, "echo built web", "echo built the web"), {}, "command changed: "),
    "toolchain": (lambda ws: make_tools(ws.parent / "tools", {"node": "v22.1.0"}), {},
                  "toolchain changed: v20.11.0 -> v22.1.0"),
    "outputs": (lambda ws: edit(ws / WEB_TOML, 'outputs = ["dist"]', 'outputs = ["dist/**"]'), {},
                "declared outputs changed: ['dist'] -> ['dist/**']"),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_each_kind_of_change_is_one_line(built, kind):
    mutate, env, expected = MUTATIONS[kind]
    mutate(built.workspace)
    lines = why_lines(built, **env)
    assert lines[0].startswith("web:build  changed since its last build here")
    # An edit of the package's polykit.toml also changes that file, an input of the package.
    toml = ["file changed: polykit.toml"] if kind in ("env-added", "env-removed", "command", "outputs") else []
    assert len(lines) == 2 + len(toml), f"one change must give one line: {lines}"
    assert lines[1].startswith(expected) and lines[2:] == toml, lines
    data = json.loads(built.run("why", "web:build", "--json", **env).stdout)
    (task,) = data["tasks"]
    assert task["status"] == "changed" and [d["kind"] for d in task["differences"]] == [kind] + ["file-changed"] * len(toml)


def test_a_changed_dependency_is_followed_to_the_task_whose_inputs_changed(built):
    built.run("test", "api-server")
    (built.workspace / "packages/shared-utils/src/utils.py").write_text("def helper():\n    return 43\n")
    lines = why_lines(built)
    assert lines[1:] == ["dependency shared-utils:build changed",
                         "upstream shared-utils:build: file changed: src/utils.py"]
    api = built.run("why", "api-server:test").stdout
    # api-server:test <- api-server:build <- shared-utils:build: the cause is two steps up.
    assert "upstream shared-utils:build: file changed: src/utils.py" in api


def test_values_are_shown_only_when_asked(built):
    lines = why_lines(built, NODE_ENV="production")
    assert "production" not in "\n".join(lines)
    shown = why_lines(built, "--show-values", NODE_ENV="production")
    assert f"environment variable changed: NODE_ENV (unset -> sha256:{env_digest('production')})" in shown
    for args in ((), ("--show-values",)):
        data = json.loads(built.run("why", "web:build", "--json", *args, NODE_ENV="production").stdout)
        assert "production" not in json.dumps(data)
    (diff,) = data["tasks"][0]["differences"]
    assert (diff["old"], diff["new"]) == (None, env_digest("production"))


def test_a_selected_value_is_never_printed_nor_uploaded(built, tmp_path):
    """A variable ``env`` selects may hold a secret: dry runs, why, --json, summaries and artifacts show its digest at most."""
    secret = "tok-5ecret-0f-the-ci"
    env = {"WEB_FLAVOUR": secret}
    dry = json.loads(built.run("build", "web", "--dry-run", "--json", **env).stdout)
    (web,) = [t for t in dry["tasks"] if t["task"] == "web:build"]
    assert web["components"]["env"] == {"NODE_ENV": None, "WEB_FLAVOUR": env_digest(secret)}
    shown = [built.run("build", "web", "--dry-run", **env)]
    with thread_server(tmp_path / "store") as (port, app):
        url = f"http://127.0.0.1:{port}"
        shown.append(built.run("build", "web", "--json", "--summary", str(tmp_path / "summary.json"),
                               "--remote-cache-url", url, **env))
        views = ((), ("--json",), ("--show-values",), ("--json", "--show-values"))
        shown += [built.run("why", "web:build", *args, WEB_FLAVOUR=secret[::-1]) for args in views]
        shown += [built.run("why", "--remote", "--remote-cache-url", url, "web:build", *args, NODE_ENV="x", **env)
                  for args in views]
        stored = [path.read_bytes() for path in (tmp_path / "store").rglob("*") if path.is_file()]
    artifacts = [zstandard.ZstdDecompressor().stream_reader(blob).read() for blob in stored if blob[:4] == ZSTD_MAGIC]
    assert shown[1].stdout and artifacts and all(b"polykit-artifact.json" in a for a in artifacts)
    assert not any(secret.encode() in blob for blob in stored + artifacts)
    for out in shown:
        assert secret not in out.stdout + out.stderr, out.args
    assert secret not in (tmp_path / "summary.json").read_text()


def test_unchanged_tasks_and_tasks_never_built(built):
    out = built.run("why").stdout
    assert "web:build  unchanged since its last build here" in out
    assert "api-server:build  unchanged" in out
    never = built.run("why", "web:lint").stdout
    assert "web:lint  no record to compare with (never built here)" in never
    bad = built.run("why", "web:deploy", check=False)
    assert bad.returncode == 2 and "has no task 'deploy'" in bad.stderr and "build" in bad.stderr


def test_a_rebuild_records_the_new_components(built):
    (built.workspace / "packages/web/src/app.ts").write_text("changed\n")
    built.run("build", "web")
    assert why_lines(built)[0].startswith("web:build  unchanged")


def test_why_remote_compares_with_the_newest_artifact_on_the_server(tmp_path):
    ws = make_workspace(tmp_path / "ci")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    with thread_server(tmp_path / "store") as (port, _):
        url = f"http://127.0.0.1:{port}"
        pk.run("build", "--remote-cache-url", url, NODE_ENV="production")  # CI's build
        laptop = copy_workspace(ws, tmp_path / "laptop")
        (laptop / "packages/shared-utils/src/utils.py").write_text("local edit\n")
        out = pk.run("why", "--remote", "--remote-cache-url", url, "web:build", "--show-values", cwd=laptop)
        lines = [line.strip() for line in out.stdout.splitlines()]
        assert lines[0].startswith("web:build  changed since the newest artifact on the server")
        # The server holds only the digest of CI's value: it is said to differ, never shown.
        assert f"environment variable changed: NODE_ENV (sha256:{env_digest('production')} -> unset)" in lines, lines
        assert "dependency shared-utils:build changed" in lines
        assert "upstream shared-utils:build: file changed: src/utils.py" in lines
        same = pk.run("why", "--remote", "web:build", cwd=ws, NODE_ENV="production", POLYKIT_REMOTE_CACHE_URL=url)
        assert "web:build  unchanged since the newest artifact on the server" in same.stdout
        none = pk.run("why", "--remote", "--remote-cache-url", url, "web:lint", cwd=laptop)
        assert "web:lint  no record to compare with" in none.stdout
    down = pk.run("why", "--remote", "--remote-cache-url", url, "web:build", check=False, cwd=laptop)
    assert down.returncode == 1 and url in down.stderr and "Traceback" not in down.stderr
    missing = pk.run("why", "--remote", "web:build", check=False, cwd=laptop)
    assert missing.returncode == 2 and "--remote needs a remote cache" in missing.stderr


# --- the comparison itself --------------------------------------------------------------------------

PARTS = {
    "format": "polykit-cache-key/1", "package": {"name": "web", "path": "packages/web"}, "task": "build",
    "command": "make", "env": {"A": "1"}, "inputs": {"a.ts": "11" * 32}, "dependencies": {"lib:build": "22" * 32},
    "toolchain": {"language": "ts", "version": "v20"}, "outputs": ["dist/**"],
}


def test_a_moved_package_and_a_new_key_format_are_named():
    old = dict(PARTS, format="polykit-cache-key/0", package={"name": "web", "path": "web"})
    kinds = [(d.kind, d.line()) for d in compare(old, PARTS)]
    assert kinds == [("key-format", "cache key format changed: polykit-cache-key/0 -> polykit-cache-key/1"),
                     ("package-path", "package moved: web -> packages/web")]


def test_dependencies_added_and_removed():
    new = dict(PARTS, dependencies={"other:build": "33" * 32})
    assert [d.line() for d in compare(PARTS, new)] == ["dependency removed: lib:build", "dependency added: other:build"]


def test_a_manifest_hashes_values_and_may_carry_only_a_digest_of_many_inputs():
    carried = for_manifest(PARTS)
    assert carried["env"] == {"A": env_digest("1")} and carried["inputs"] == PARTS["inputs"]
    assert compare(carried, PARTS, hashed_env=True) == []
    many = dict(PARTS, inputs={f"src/{n:06}.ts": "ab" * 32 for n in range(8000)})
    big = for_manifest(many)
    assert "inputs" not in big and big["inputs_digest"] == inputs_digest(many["inputs"])
    assert compare(big, many, hashed_env=True) == []
    changed = dict(many, inputs={**many["inputs"], "src/000001.ts": "cd" * 32})
    assert [d.kind for d in compare(big, changed, hashed_env=True)] == ["inputs-changed"]


def test_a_build_of_hits_leaves_the_record_as_it_is(built):
    """The record's first line holds every task's key: when none changed, nothing is rewritten."""
    path = built.workspace / RECORD_FILE
    before = path.stat()
    built.run("build")
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    (built.workspace / "packages/web/src/app.ts").write_text("changed\n")
    built.run("build")
    assert path.stat().st_ino != before.st_ino
    assert recorded_keys(built.workspace) == {name: entry["key"] for name, entry in load_records(built.workspace).items()}
    assert why_lines(built)[0].startswith("web:build  unchanged")


def test_a_record_of_one_document_is_still_read(built):
    """The record's earlier form, one JSON document, still answers ``why`` and is rewritten by the next change."""
    records = load_records(built.workspace)
    (built.workspace / RECORD_FILE).write_text(json.dumps({"version": 1, "tasks": records}))
    assert load_records(built.workspace) == records and recorded_keys(built.workspace) == {}
    assert why_lines(built)[0].startswith("web:build  unchanged")
    built.run("build")
    assert recorded_keys(built.workspace) == {name: entry["key"] for name, entry in records.items()}
