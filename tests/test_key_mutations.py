"""The key mutation suite: every declaration form, changed where it matches and where it does not.

Each row changes one thing in a real git workspace and computes every task's key through the
real workspace loader and KeyMaker. A change to something a declaration matches must change
the keys of exactly the tasks declaring it and of their dependents; a change to something no
declaration matches must leave every key as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from polykit_client.cachekey import KeyMaker
from polykit_client.components import env_digest
from polykit_client.graph import plan, topological
from polykit_client.workspace import load
from sample import Polykit, make_tools

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

ROOT = """\
[workspace]
packages_dir = "packages"
[remote_cache]
env_vars = ["NODE_ENV", "CI_*", "!CI_JOB_ID"]
"""

PACKAGES = {
    # default inputs: every file git lists, less declared outputs, nested packages, ignored files
    "base": """\
name = "base"
language = "python"
[tasks]
build = { command = "make base", outputs = ["dist/**"] }
""",
    "app": """\
name = "app"
language = "ts"
[deps]
internal = ["base"]
[tasks]
build = { command = "make app", outputs = [".next/**", "!.next/cache/**"], inputs = ["src/**/*.ts", "!src/**/*.test.ts", "config.json", "local.env", "assets/**"], env = ["NEXT_PUBLIC_*", "API_URL", "!NEXT_PUBLIC_BUILD_ID"] }
test = { command = "test app", depends_on = ["build"], inputs = ["tests/*.ts", "data?.json", "[ab].txt", "*.{yml,yaml}"] }
""",
    "docs": """\
name = "docs"
[tasks]
build = { command = "make docs", inputs = ["$TURBO_DEFAULT$", "!drafts/**", "notes.local"], outputs = ["site"] }
""",
    "tool": """\
name = "tool"
language = "go"
[tasks]
build = { command = "go build", outputs = ["bin/tool"] }
""",
}

FILES = {
    "packages/base/src/lib.py": "x = 1\n",
    "packages/base/README.md": "base\n",
    "packages/base/ignored/cache.txt": "ignored\n",
    "packages/base/sub/polykit.toml": 'name = "sub"\n',  # a nested package without a build
    "packages/base/sub/x.txt": "nested\n",
    "packages/app/src/index.ts": "index\n",
    "packages/app/src/deep/er/a.ts": "deep\n",
    "packages/app/src/deep/a.js": "js\n",
    "packages/app/src/x.test.ts": "test\n",
    "packages/app/config.json": "{}\n",
    "packages/app/local.env": "SECRET=1\n",
    "packages/app/README.md": "app\n",
    "packages/app/tests/t.ts": "t\n",
    "packages/app/tests/sub/t.ts": "t\n",
    "packages/app/data1.json": "1\n",
    "packages/app/data10.json": "10\n",
    "packages/app/a.txt": "a\n",
    "packages/app/c.txt": "c\n",
    "packages/app/ci.yml": "ci\n",
    "packages/app/node_modules/lib/index.ts": "dep\n",
    "packages/docs/guide.md": "guide\n",
    "packages/docs/drafts/next.md": "draft\n",
    "packages/docs/notes.local": "notes\n",
    "packages/tool/main.go": "package main\n",
    ".gitignore": "*.env\n*.local\nignored/\nnode_modules/\n",
    "shared.txt": "shared\n",  # outside every package: an input only through base's symlink
    "other.txt": "other\n",
}
LINKS = {"packages/base/shared": "../../shared.txt"}  # committed as a symlink (mode 120000)

ALL = {"base:build", "app:build", "app:test", "docs:build", "tool:build"}
BASE = {"base:build", "app:build", "app:test"}  # base:build and every task depending on it
APP = {"app:build", "app:test"}


@pytest.fixture
def mws(tmp_path):
    root = tmp_path / "ws"
    (root / "packages").mkdir(parents=True)
    (root / "polykit.toml").write_text(ROOT)
    for name, text in PACKAGES.items():
        (root / "packages" / name).mkdir()
        (root / "packages" / name / "polykit.toml").write_text(text)
    for rel, text in FILES.items():
        write(root, rel, text)
    for rel, target in LINKS.items():
        (root / rel).symlink_to(target)
    git("init", "-q")(root, {})
    git("add", "-A")(root, {})
    commit(root, {})
    return root


def git(*args: str) -> Callable[[Path, dict], None]:
    return lambda root, env: subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


commit = git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "change")


def steps(*changes: Callable[[Path, dict], None]) -> Callable[[Path, dict], None]:
    def change(root: Path, env: dict) -> None:
        for step in changes:
            step(root, env)
    return change


LIB = "packages/base/src/lib.py"  # "x = 1\n", tracked


def check_out_again(rel: str) -> Callable[[Path, dict], None]:
    """Remove a tracked file and let git write it again (through the attributes and filters in force)."""
    return steps(lambda root, env: (root / rel).unlink(), git("checkout", "--", rel))


def racy_edit(root: Path, env: dict) -> None:
    """Rewrite a tracked file (same size, same mtime) within the same second as the index write:
    only git's racy-git rule (an entry as new as the index is compared by content) can see it."""
    path = root / LIB
    for _ in range(50):
        os.utime(path)  # a new stat, so that ``git add`` writes the index
        git("add", LIB)(root, env)
        recorded = path.stat()
        path.write_text("x = 9\n")
        os.utime(path, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
        index = (root / ".git/index").stat()
        if int(index.st_mtime) == int(path.stat().st_ctime) == int(recorded.st_mtime):
            return
        path.write_text("x = 1\n")
    pytest.skip("could not edit a file within the second of the index write")


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def keys(root: Path, environ: dict[str, str]) -> dict[str, str]:
    """Every task's key, through the real loader, planner and KeyMaker."""
    ws = load(root, environ)
    deps: dict = {}
    for task in ("build", "test"):
        deps.update(plan(ws, task)[1])
    return {str(node): key for node, key in KeyMaker(ws, environ).compute(topological(deps), deps).items()}


def edit(rel: str, old: str, new: str) -> Callable[[Path, dict], None]:
    def change(root: Path, env: dict) -> None:
        path = root / rel
        assert old in path.read_text(), f"{old!r} is not in {rel}"
        path.write_text(path.read_text().replace(old, new))
    return change


def put(rel: str, text: str = "changed\n") -> Callable[[Path, dict], None]:
    return lambda root, env: write(root, rel, text)


def symlinked_output(root: Path, env: dict) -> None:
    """What a build writes through ``dist -> .output/public`` (``outputs = ["dist/**"]``)."""
    write(root, "packages/base/.output/public/index.html", "built\n")
    (root / "packages/base/dist").symlink_to(".output/public")


def setenv(name: str, value: str) -> Callable[[Path, dict], None]:
    return lambda root, env: env.__setitem__(name, value)


def tool_version(tool: str, version: str) -> Callable[[Path, dict], None]:
    return lambda root, env: make_tools(Path(env["PATH"]), {tool: version})


# (declaration form, change, the tasks whose keys must change)
MATCHED = [
    ("command", edit("packages/base/polykit.toml", "make base", "make base -j2"), BASE),
    ("workspace env_vars, plain name", setenv("NODE_ENV", "production"), ALL),
    ("workspace env_vars, wildcard", setenv("CI_COMMIT_SHA", "abc"), ALL),
    ("task env, wildcard", setenv("NEXT_PUBLIC_API", "https://prod"), APP),
    ("task env, plain name set to empty", setenv("API_URL", ""), APP),
    ("task inputs, plain file", put("packages/app/config.json", '{"a": 1}\n'), APP),
    ("task inputs, glob with **", put("packages/app/src/deep/er/a.ts"), APP),
    ("task inputs, new file under **", put("packages/app/src/new.ts"), APP),
    ("task inputs, folder pattern **", put("packages/app/assets/logo.svg"), APP),
    ("task inputs, git-ignored explicit file", put("packages/app/local.env", "SECRET=2\n"), APP),
    ("task inputs, * within a folder", put("packages/app/tests/t.ts"), {"app:test"}),
    ("task inputs, ?", put("packages/app/data1.json"), {"app:test"}),
    ("task inputs, [...]", put("packages/app/a.txt"), {"app:test"}),
    ("task inputs, {a,b}", put("packages/app/ci.yml"), {"app:test"}),
    ("default inputs, tracked file", put("packages/base/src/lib.py"), BASE),
    ("default inputs, new untracked file", put("packages/base/NOTES.md"), BASE),
    ("$TURBO_DEFAULT$ inputs", put("packages/docs/guide.md"), {"docs:build"}),
    ("$TURBO_DEFAULT$ plus a git-ignored explicit file", put("packages/docs/notes.local", "more\n"), {"docs:build"}),
    ("outputs declaration", edit("packages/tool/polykit.toml", '["bin/tool"]', '["bin/tool", "bin/extra"]'),
     {"tool:build"}),
    ("outputs exclusion declaration", edit("packages/app/polykit.toml", "!.next/cache/**", "!.next/cache"), APP),
    ("task dependencies", edit("packages/tool/polykit.toml", 'language = "go"', 'language = "go"\n[deps]\ninternal = ["base"]'),
     {"tool:build"}),
    ("toolchain of a language", tool_version("node", "v22.1.0-longer"), APP),
    ("toolchain of a dependency's language", tool_version("python3", "Python 3.99.0-longer"), BASE),
    # Input digests from git's index: each change below reaches the working copy while git's
    # index may still name the old blob, or names a blob that is not the working copy.
    ("git: tracked file modified, same size", put(LIB, "x = 2\n"), BASE),
    ("git: change staged", steps(put(LIB, "x = 2\n"), git("add", LIB)), BASE),
    ("git: change committed", steps(put(LIB, "x = 2\n"), git("add", LIB), commit), BASE),
    ("git: tracked file deleted", lambda root, env: (root / LIB).unlink(), BASE),
    ("git: assume-unchanged, then modified", steps(git("update-index", "--assume-unchanged", LIB), put(LIB, "x = 2\n")),
     BASE),
    ("git: skip-worktree, then modified", steps(git("update-index", "--skip-worktree", LIB), put(LIB, "x = 2\n")), BASE),
    ("git: rewritten within the second of the index write", racy_edit, BASE),
    ("git: core.autocrlf checks out CRLF", steps(git("config", "core.autocrlf", "true"), check_out_again(LIB)), BASE),
    ("git: .gitattributes eol=crlf", steps(put(".gitattributes", "*.py eol=crlf\n"), check_out_again(LIB)), BASE),
    ("git: .gitattributes filter through a macro",
     steps(git("config", "filter.upper.smudge", "tr a-z A-Z"), git("config", "filter.upper.clean", "tr A-Z a-z"),
           put(".gitattributes", "[attr]shout filter=upper\n*.py shout\n"), check_out_again(LIB)), BASE),
    ("git: tracked symlink retargeted",
     lambda root, env: ((root / "packages/base/shared").unlink(), (root / "packages/base/shared").symlink_to("../../other.txt")),
     BASE),
    ("git: the file behind a tracked symlink", put("shared.txt"), BASE),
]

UNMATCHED = [
    ("an unrelated environment variable", setenv("UNRELATED", "1")),
    ("workspace env_vars, negated name", setenv("CI_JOB_ID", "42")),
    ("task env, negated name", setenv("NEXT_PUBLIC_BUILD_ID", "99")),
    ("task inputs, negated glob", put("packages/app/src/x.test.ts")),
    ("task inputs, a file the globs do not name", put("packages/app/README.md")),
    ("task inputs, * does not cross folders", put("packages/app/tests/sub/t.ts")),
    ("task inputs, a wrong extension under **", put("packages/app/src/deep/a.js")),
    ("task inputs, ? is one character", put("packages/app/data10.json")),
    ("task inputs, [...] outside the set", put("packages/app/c.txt")),
    ("task inputs, wildcards do not enter node_modules", put("packages/app/node_modules/lib/index.ts")),
    ("default inputs, a git-ignored file", put("packages/base/ignored/cache.txt")),
    ("default inputs, a declared output", put("packages/base/dist/out.txt")),
    ("default inputs, a nested package's file", put("packages/base/sub/x.txt")),
    ("default inputs, an output folder written through a symlink", symlinked_output),
    ("excluded output folder", put("packages/app/.next/cache/state.bin")),
    ("$TURBO_DEFAULT$ less an exclusion", put("packages/docs/drafts/next.md")),
    ("$TURBO_DEFAULT$ less the outputs", put("packages/docs/site/index.html")),
    ("a toolchain no package uses", tool_version("rustc", "rustc 9.9.9 (changed)")),
    ("the checkout's own state", put(".polykit/state-extra.json")),
]


@pytest.fixture
def env(tmp_path):
    return {"PATH": str(make_tools(tmp_path / "tools", {"python3": "Python 3.12.0"}))}


@pytest.mark.parametrize("name,change,expected", MATCHED, ids=[row[0] for row in MATCHED])
def test_a_change_to_what_a_declaration_matches_changes_exactly_its_tasks(mws, env, name, change, expected):
    before = keys(mws, env)
    assert set(before) == ALL
    change(mws, env)
    after = keys(mws, env)
    assert {task for task in ALL if before[task] != after[task]} == expected


@pytest.mark.parametrize("name,change", UNMATCHED, ids=[row[0] for row in UNMATCHED])
def test_a_change_no_declaration_matches_changes_no_key(mws, env, name, change):
    before = keys(mws, env)
    change(mws, env)
    assert keys(mws, env) == before


def test_an_unset_plain_name_differs_from_an_empty_one_and_a_removed_file_counts(mws, env):
    unset = keys(mws, env)
    assert keys(mws, {**env, "API_URL": ""})["app:build"] != unset["app:build"]
    (mws / "packages/app/local.env").unlink()
    assert keys(mws, env)["app:build"] != unset["app:build"]


def test_workspace_input_files_are_explicit_inputs_of_tasks_without_their_own(mws, env):
    root = mws / "polykit.toml"
    root.write_text(root.read_text() + 'input_files = ["src/**", "*.local", "!src/skip/**"]\n')
    before = keys(mws, env)
    write(mws, "packages/base/src/lib.py", "x = 2\n")
    assert {t for t in ALL if keys(mws, env)[t] != before[t]} == BASE
    before = keys(mws, env)
    write(mws, "packages/docs/notes.local", "git-ignored but named\n")  # docs has its own inputs
    write(mws, "packages/tool/flags.local", "git-ignored but named\n")
    assert {t for t in ALL if keys(mws, env)[t] != before[t]} == {"docs:build", "tool:build"}
    before = keys(mws, env)
    write(mws, "packages/base/README.md", "not named\n")
    write(mws, "packages/base/src/skip/gen.py", "excluded\n")
    assert keys(mws, env) == before


def test_the_package_path_and_name_are_part_of_the_key(mws, env):
    before = keys(mws, env)
    (mws / "packages/nested").mkdir()
    shutil.move(mws / "packages/tool", mws / "packages/nested/tool")
    moved = keys(mws, env)
    assert {t for t in ALL if moved[t] != before[t]} == {"tool:build"}
    edit("packages/nested/tool/polykit.toml", 'name = "tool"', 'name = "tool2"')(mws, env)
    renamed = keys(mws, env)
    assert set(renamed) == ALL - {"tool:build"} | {"tool2:build"}
    assert renamed["tool2:build"] != moved["tool:build"]
    assert all(renamed[t] == moved[t] for t in ALL - {"tool:build"})


def test_dry_run_json_shows_the_matched_env_and_the_ignored_explicit_input(mws, env, tmp_path):
    pk = Polykit(mws, Path(env["PATH"]), tmp_path / "marker")
    for name in list(pk.env):
        if name.startswith(("NEXT_PUBLIC_", "CI_", "API_URL")):
            del pk.env[name]
    out = pk.run("build", "--dry-run", "--json", NEXT_PUBLIC_API="https://staging", NEXT_PUBLIC_BUILD_ID="1",
                 CI_RUNNER="r1", CI_JOB_ID="9")
    tasks = {t["task"]: t for t in json.loads(out.stdout)["tasks"]}
    app = tasks["app:build"]["components"]
    # Values are shown as their SHA-256 only (a dry run's output lands in CI logs).
    assert app["env"] == {"API_URL": None, "CI_RUNNER": env_digest("r1"), "NEXT_PUBLIC_API": env_digest("https://staging"),
                          "NODE_ENV": None}
    assert "https://staging" not in out.stdout
    assert "local.env" in app["inputs"] and "src/x.test.ts" not in app["inputs"]
    assert "node_modules/lib/index.ts" not in app["inputs"]
    assert tasks["base:build"]["components"]["env"] == {"CI_RUNNER": env_digest("r1"), "NODE_ENV": None}
    again = pk.keys(NEXT_PUBLIC_API="https://production", CI_RUNNER="r1")
    assert again["app:build"] != tasks["app:build"]["key"] and again["base:build"] == tasks["base:build"]["key"]


def test_a_folder_replaced_by_a_symlink_is_a_default_input_with_or_without_git(mws, env, tmp_path):
    """git lists a symlink to a folder as one entry, hashed through the link (its files); a copy
    of the tree without ``.git`` must see the same entry, or an edit behind it is a false hit."""
    write(mws, "lib/real.py", "y = 1\n")
    shutil.rmtree(mws / "packages/base/src")
    (mws / "packages/base/src").symlink_to("../../lib")
    plain = tmp_path / "plain"
    shutil.copytree(mws, plain, symlinks=True, ignore=shutil.ignore_patterns(".git", ".polykit"))
    (plain / "packages/base/ignored").rename(tmp_path / "ignored")  # what git ignores, gone from the copy
    for root in (mws, plain):
        before = keys(root, env)
        write(root, "lib/real.py", "y = 2\n")
        assert {t for t in ALL if keys(root, env)[t] != before[t]} == BASE, root
    assert keys(plain, env)["base:build"] == keys(mws, env)["base:build"]
