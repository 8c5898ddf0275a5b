"""Workspace configuration and the task graph: what is read, and every mistake named clearly."""

import json

import pytest

from polykit_client import configcache
from polykit_client.workspace import load
from sample import Polykit, make_tools, make_workspace


@pytest.fixture
def ws(tmp_path):
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def pk(ws, tmp_path):
    return Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")


def write_pkg(ws, name, text):
    folder = ws / "packages" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "polykit.toml").write_text(text)


def test_reads_both_task_forms_and_the_quoted_dotted_key(ws):
    w = load(ws, {})
    assert list(w.packages) == ["api-server", "shared-utils", "web"]
    api = w.packages["api-server"]
    assert api.language == "rust" and api.internal_deps == ("shared-utils",) and api.path == "packages/api-server"
    assert api.tasks["test"].depends_on == ("build",)
    assert api.tasks["build"].outputs == ("target/release/**",)
    assert w.packages["web"].tasks["lint"].depends_on == ("build",)
    assert w.packages["web"].tasks["build"].env == ("WEB_FLAVOUR",)
    assert w.packages["shared-utils"].tasks["test"].outputs is None
    assert w.remote.env_vars == ("NODE_ENV",) and w.default_parallel == 4


def test_the_root_is_found_from_inside_a_package(ws):
    assert load(ws / "packages" / "web" / "src", {}).root == ws.resolve()


def test_language_aliases(ws):
    write_pkg(ws, "js-lib", 'name = "js-lib"\nlanguage = "JavaScript"\n')
    assert load(ws, {}).packages["js-lib"].language == "js"


def test_remote_settings_from_file_environment_and_flags(ws, pk):
    (ws / "polykit.toml").write_text('[remote_cache]\nurl = "http://file:1"\nread_only = false\ntoken = "t1"\n')
    assert load(ws, {}).remote.url == "http://file:1"
    env = {"POLYKIT_REMOTE_CACHE_URL": "http://env:2", "POLYKIT_REMOTE_CACHE_TOKEN": "t2", "POLYKIT_REMOTE_CACHE_READONLY": "1"}
    remote = load(ws, env).remote
    assert (remote.url, remote.token, remote.read_only) == ("http://env:2", "t2", True)
    assert load(ws, {"POLYKIT_REMOTE_CACHE_READONLY": "false"}).remote.read_only is False


def test_packages_dir_falls_back_to_the_whole_tree(tmp_path):
    root = tmp_path / "flat"
    (root / "a").mkdir(parents=True)
    (root / "polykit.toml").write_text("[workspace]\n")
    (root / "a" / "polykit.toml").write_text('name = "a"\n[tasks]\nbuild = "true"\n')
    (root / "node_modules" / "x").mkdir(parents=True)
    (root / "node_modules" / "x" / "polykit.toml").write_text('name = "ignored"\n')
    assert list(load(root, {}).packages) == ["a"]


ERRORS = {
    "bad toml": ('name = "x"\n[tasks\nbuild = "b"\n', "polykit.toml:2: invalid TOML"),
    "unquoted dotted key": ('name = "x"\n[tasks]\nlint = "l"\nlint.depends_on = ["build"]\n', 'quote the key: "lint.depends_on"'),
    "bad language": ('name = "x"\nlanguage = "cobol"\n', "polykit.toml:2: unknown language 'cobol'"),
    "no name": ('language = "go"\n[tasks]\nbuild = "b"\n[deps]\ninternal = []\n', "a package needs a name"),
    "missing task dependency": ('name = "x"\n[tasks]\ntest = { command = "t", depends_on = ["build"] }\n',
                                "task 'test' depends on 'build', which package 'x' does not define"),
    "dotted key for a missing task": ('name = "x"\n[tasks]\n"lint.depends_on" = ["build"]\n', "refers to a task 'lint'"),
    "unknown task field": ('name = "x"\n[tasks]\nbuild = { command = "b", output = ["dist"] }\n', "unknown field 'output'"),
    "task without command": ('name = "x"\n[tasks]\nbuild = { outputs = ["dist"] }\n', "needs a command"),
    "output leaving the package": ('name = "x"\n[tasks]\nbuild = { command = "b", outputs = ["../dist"] }\n', "must stay inside"),
    "unknown dependency": ('name = "x"\n[deps]\ninternal = ["nope"]\n', "unknown internal dependency 'nope'"),
    "duplicate name": ('name = "web"\n', "package name 'web' is already used"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_configuration_mistakes_are_clear_errors(pk, ws, case):
    text, expected = ERRORS[case]
    write_pkg(ws, "zz-broken", text)
    out = pk.run("scan", check=False)
    assert out.returncode == 2
    assert expected in out.stderr, out.stderr
    assert "zz-broken/polykit.toml" in out.stderr or case == "duplicate name"
    assert "Traceback" not in out.stderr and out.stderr.startswith("error: ")


def test_a_bad_root_setting_names_the_root_file_and_line(pk, ws):
    (ws / "polykit.toml").write_text("[workspace]\npackages_dir = \"packages\"\ndefault_parallel = 0\n")
    out = pk.run("scan", check=False)
    assert out.returncode == 2 and "polykit.toml:3: default_parallel" in out.stderr


@pytest.mark.parametrize("value", ["../elsewhere", "/etc"])
def test_packages_dir_outside_the_workspace_is_refused(pk, ws, value):
    (ws / "polykit.toml").write_text(f'[workspace]\npackages_dir = "{value}"\n')
    out = pk.run("scan", check=False)
    assert out.returncode == 2 and "polykit.toml:2: packages_dir" in out.stderr and "inside the workspace" in out.stderr


def test_no_workspace_is_a_clear_error(tmp_path, pk):
    out = pk.run("scan", check=False, cwd=tmp_path)
    assert out.returncode == 2 and "no workspace found" in out.stderr


def test_a_package_cycle_is_named(pk, ws):
    toml = ws / "packages/shared-utils/polykit.toml"
    toml.write_text(toml.read_text().replace('language = "python"', 'language = "python"\n[deps]\ninternal = ["web"]'))
    out = pk.run("build", check=False)
    assert out.returncode == 2
    assert "cycle" in out.stderr and "shared-utils -> web -> shared-utils" in out.stderr
    assert pk.run("graph", check=False).returncode == 2


def test_a_task_cycle_is_named(pk, ws):
    write_pkg(ws, "loop", 'name = "loop"\n[tasks]\na = { command = "true", depends_on = ["b"] }\nb = { command = "true", depends_on = ["a"] }\n')
    out = pk.run("run", "a", "loop", check=False)
    assert out.returncode == 2 and "task cycle: loop:a -> loop:b -> loop:a" in out.stderr


def test_unknown_package_and_task_name_what_exists(pk):
    out = pk.run("build", "nope", check=False)
    assert out.returncode == 2 and "unknown package 'nope' (packages: api-server, shared-utils, web)" in out.stderr
    out = pk.run("run", "deploy", "web", check=False)
    assert out.returncode == 2 and "package 'web' has no task 'deploy' (it has: build, lint)" in out.stderr
    out = pk.run("run", "deploy", check=False)
    assert out.returncode == 2 and "no package has a task 'deploy'" in out.stderr


def test_scan_and_graph(pk):
    scan = json.loads(pk.run("scan", "--json").stdout)
    assert [p["name"] for p in scan["packages"]] == ["api-server", "shared-utils", "web"]
    graph = json.loads(pk.run("graph", "--json").stdout)
    assert graph["packages"]["web"] == ["shared-utils"]
    assert graph["tasks"]["web:lint"] == ["web:build"]
    assert graph["tasks"]["api-server:build"] == ["shared-utils:build"]
    assert "web -> shared-utils" in pk.run("graph").stdout


def test_the_root_itself_can_be_a_package(tmp_path, pk):
    root = tmp_path / "single"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.txt").write_text("a")
    (root / "polykit.toml").write_text('name = "solo"\n[tasks]\nbuild = { command = "mkdir -p out && cp src/a.txt out/", outputs = ["out"] }\n[workspace]\n')
    out = pk.run("build", "--no-remote-cache", cwd=root)
    assert "solo:build  miss" in out.stdout and (root / "out" / "a.txt").exists()
    assert "solo:build  hit (local)" in pk.run("build", "--no-remote-cache", cwd=root).stdout


def test_a_task_list_of_the_wrong_type_names_the_field(pk, ws):
    write_pkg(ws, "zz", 'name = "zz"\n[tasks]\nbuild = { command = "b", depends_on = "lint" }\nlint = "l"\n')
    out = pk.run("scan", check=False)
    assert out.returncode == 2 and "task 'build': depends_on must be a list of strings" in out.stderr


def test_every_root_setting_is_read_and_checked(pk, ws):
    (ws / "polykit.toml").write_text(
        '[workspace]\npackages_dir = "packages"\ncache_dir = "build-cache"\ncache_max_size = 1000\ndefault_parallel = 2\n'
        '[remote_cache]\nurl = "http://c:1"\ntimeout = 2.5\nmax_artifact_size = 4096\nread_only = true\n'
        'input_files = ["src/**"]\nenv_vars = ["CI"]\n')
    w = load(ws, {})
    assert (w.cache_dir, w.cache_max_size, w.default_parallel) == (ws.resolve() / "build-cache", 1000, 2)
    assert (w.remote.timeout, w.remote.max_artifact_size, w.remote.read_only) == (2.5, 4096, True)
    assert w.remote.input_files == ("src/**",) and w.remote.env_vars == ("CI",)
    (ws / "polykit.toml").write_text('[remote_cache]\ntimeout = 0\n')
    out = pk.run("scan", check=False)
    assert out.returncode == 2 and "polykit.toml:2: timeout must be a positive number" in out.stderr
    (ws / "polykit.toml").write_text('[remote_cache]\nbogus = 1\n')
    assert "unknown [remote_cache] setting 'bogus'" in pk.run("scan", check=False).stderr


# --- the configuration kept between runs (configcache) ----------------------------------------


@pytest.fixture
def settled(monkeypatch):
    """Files written a moment ago count as settled (a real run keeps only what is 2 s old)."""
    monkeypatch.setattr(configcache, "RACY_SECONDS", -60.0)


def kept(ws):
    from polykit_client.configcache import CACHE_FILE

    return json.loads((ws / CACHE_FILE).read_text())


def test_an_unchanged_workspace_is_taken_from_what_was_kept(ws, settled):
    first = load(ws, {})
    data = kept(ws)
    assert set(data["packages"]) == {str(p.config_file) for p in first.packages.values()}
    assert load(ws, {}) == first  # read back from the kept answers: the same packages, tasks and all
    web = str(ws / "packages/web/polykit.toml")
    data["packages"][web]["package"]["tasks"][0][1] = "echo kept"
    (ws / ".polykit/workspace.json").write_text(json.dumps(data))
    assert {t.command for t in load(ws, {}).packages["web"].tasks.values()} >= {"echo kept"}
    text = (ws / "packages/web/polykit.toml").read_text()
    (ws / "packages/web/polykit.toml").write_text(text)  # the same bytes, a new signature: read again
    assert load(ws, {}) == first


def test_added_moved_and_removed_packages_are_found(ws, settled):
    load(ws, {})
    write_pkg(ws, "fresh", 'name = "fresh"\n[tasks]\nbuild = "true"\n')
    assert "fresh" in load(ws, {}).packages
    deep = ws / "packages/web/tools/inner"
    deep.mkdir(parents=True)
    (deep / "polykit.toml").write_text('name = "inner"\n[tasks]\nbuild = "true"\n')
    assert load(ws, {}).packages["inner"].path == "packages/web/tools/inner"
    (deep / "polykit.toml").rename(deep / "moved.toml")
    assert "inner" not in load(ws, {}).packages
    (ws / "packages/fresh/polykit.toml").unlink()
    assert set(load(ws, {}).packages) == {"api-server", "shared-utils", "web"}


def test_what_just_changed_is_not_kept_and_a_damaged_file_is_ignored(ws):
    first = load(ws, {})
    assert not (ws / ".polykit/workspace.json").exists()  # every folder and file is seconds old
    (ws / ".polykit").mkdir()
    writer = configcache._WRITER
    for damaged in ("not json", json.dumps({"version": writer, "walk": [], "packages": {"x": 1}}),
                    json.dumps({"version": writer, "walk": {"top": str(ws / "packages"), "folders": 3},
                                "packages": {str(ws / "packages/web/polykit.toml"): {"signature": 1, "package": []}}})):
        (ws / ".polykit/workspace.json").write_text(damaged)
        assert load(ws, {}) == first
