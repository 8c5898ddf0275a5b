"""Declared outputs: exclusions, folders reached through a symlink, and outputs that cannot be cached.

Builds run as real ``polykit`` processes against a real server on 127.0.0.1; a second checkout
(sources only) shows what a restore brings back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from polykit_client import artifact, outputs
from polykit_client.outputs import OutputError, check_restorable, expand_outputs, walk_unchanged
from sample import Polykit, make_tools
from support import craft, request, thread_server
from test_client import snapshot, stats, status_lines

ROOT = '[workspace]\npackages_dir = "packages"\n'
SYMLINKED = "mkdir -p .output/public/img && echo '<p>home</p>' > .output/public/index.html && echo png > .output/public/img/a.png && ln -sfn .output/public dist"


def checkout(folder: Path, tmp_path: Path, task: str) -> Polykit:
    (folder / "packages/site").mkdir(parents=True)
    (folder / "polykit.toml").write_text(ROOT)
    (folder / "packages/site/polykit.toml").write_text(f'name = "site"\n[tasks]\nbuild = {task}\n')
    (folder / "packages/site/page.txt").write_text("source\n")
    return Polykit(folder, make_tools(tmp_path / "tools"), tmp_path / f"marker-{folder.name}")


def build(pk: Polykit, port: int | None = None):
    args = ("build", "-j1") + (("--remote-cache-url", f"http://127.0.0.1:{port}") if port else ())
    out = pk.run(*args)
    return status_lines(out.stdout)["site:build"], out.stderr


def task(command: str, outputs: list[str]) -> str:
    return "{ command = %s, outputs = %s }" % (json.dumps(command), json.dumps(outputs))


@pytest.mark.parametrize("outputs", [["dist/**"], ["dist"], ["dist/"]])
def test_an_output_folder_reached_through_a_symlink_is_cached_and_restored_with_its_link(tmp_path, outputs):
    a = checkout(tmp_path / "a", tmp_path, task(SYMLINKED, outputs))
    b = checkout(tmp_path / "b", tmp_path, task(SYMLINKED, outputs))
    with thread_server(tmp_path / "store") as (port, _):
        assert build(a, port) == ("miss", "")
        assert build(b, port) == ("hit (remote)", "")
        assert stats(port)["uploads"] == 1
    site = b.workspace / "packages/site"
    assert os.readlink(site / "dist") == ".output/public"
    assert snapshot(site / ".output") == snapshot(a.workspace / "packages/site/.output")
    assert (site / "dist/index.html").read_text() == "<p>home</p>\n" and b.ran() == []
    # A changed output is restored from the local cache; so are a link and folder both removed.
    (site / ".output/public/index.html").write_text("stale\n")
    assert build(b) == ("hit (local)", "")
    assert (site / "dist/index.html").read_text() == "<p>home</p>\n"
    (site / "dist").unlink()
    shutil.rmtree(site / ".output")
    assert build(b) == ("hit (local)", "")
    assert os.readlink(site / "dist") == ".output/public" and (site / "dist/img/a.png").read_text() == "png\n"


@pytest.mark.parametrize("command,named", [
    ("mkdir -p ../../../outside && echo x > ../../../outside/f && ln -sfn ../../../outside dist", "'dist' is a symlink"),
    ("mkdir -p dist && ln -sfn /etc dist/etc", "'dist/etc' is a symlink"),
    ("mkdir -p dist && ln -sfn .. dist/up", "'dist/up' is a symlink loop"),
    ("mkdir -p dist && rm -f dist/pipe && mkfifo dist/pipe", "'dist/pipe' is not a file"),
    ("mkdir -p dist && touch \"dist/caf$(printf '\\351').js\"", "'dist/caf\\udce9.js' is not valid UTF-8"),
])
def test_a_declared_output_that_cannot_be_cached_is_one_warning_and_nothing_is_cached(tmp_path, command, named):
    pk = checkout(tmp_path / "a", tmp_path, task(command + " && echo built > built.txt", ["dist/**", "built.txt"]))
    with thread_server(tmp_path / "store") as (port, _):
        status, err = build(pk, port)
        assert status == "miss" and named in err and err.count("warning:") == 1, err
        assert "not cached" in err
        assert build(pk, port)[0] == "miss"  # neither the local cache nor the server holds it
        assert stats(port)["uploads"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_output_is_one_warning_naming_it(tmp_path):
    pk = checkout(tmp_path / "a", tmp_path, task("mkdir -p dist && echo s > dist/secret && chmod 000 dist/secret", ["dist"]))
    status, err = build(pk)
    assert status == "miss" and "'dist/secret' cannot be read" in err and err.count("warning:") == 1
    assert build(pk)[0] == "miss"


def test_excluded_outputs_are_neither_packed_nor_restored(tmp_path):
    command = "mkdir -p .next/cache/b && echo page > .next/page.js && echo state > .next/cache/b/state.bin"
    a = checkout(tmp_path / "a", tmp_path, task(command, [".next/**", "!.next/cache/**"]))
    b = checkout(tmp_path / "b", tmp_path, task(command, [".next/**", "!.next/cache/**"]))
    with thread_server(tmp_path / "store") as (port, _):
        assert build(a, port)[0] == "miss"
        assert build(b, port)[0] == "hit (remote)"
    site = b.workspace / "packages/site"
    assert (site / ".next/page.js").read_text() == "page\n" and not (site / ".next/cache").exists()
    # The build's own excluded files stay where they are when the task is restored in place.
    (a.workspace / "packages/site/.next/page.js").write_text("changed\n")
    assert build(a)[0] == "hit (local)"
    assert (a.workspace / "packages/site/.next/cache/b/state.bin").read_text() == "state\n"


def test_an_output_folder_that_became_a_link_out_of_the_package_keeps_the_cache_entry(tmp_path):
    # The restore stops at the link (it never writes through it); the package is at fault, not
    # the artifact, so the local entry is kept and restores once the link is gone.
    pk = checkout(tmp_path / "a", tmp_path, task("mkdir -p dist && echo page > dist/index.html", ["dist/**"]))
    site = pk.workspace / "packages/site"
    assert build(pk)[0] == "miss"
    shutil.rmtree(site / "dist")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, site / "dist")
    status, err = build(pk)
    assert status == "miss" and "through the symlink or file 'dist'" in err and "damaged" not in err, err
    (site / "dist").unlink()
    assert build(pk) == ("hit (local)", "")
    assert (site / "dist/index.html").read_text() == "page\n"


def test_expand_outputs_lists_links_and_the_real_files_they_show(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "build/public/sub").mkdir(parents=True)
    (pkg / "build/public/sub/a.js").write_text("a")
    (pkg / "build/public/skip.map").write_text("m")
    (pkg / "build/other.txt").write_text("o")
    (pkg / "empty").mkdir()
    os.symlink("build/public", pkg / "dist")
    assert expand_outputs(pkg, ("dist/**", "!dist/*.map")) == ["build/public/sub/a.js", "dist"]
    assert expand_outputs(pkg, ("dist/sub/*.js",)) == ["build/public/sub/a.js", "dist"]
    assert expand_outputs(pkg, ("empty", "build/other.txt")) == ["build/other.txt", "empty"]
    os.symlink("/", pkg / "root")
    with pytest.raises(OutputError, match="'root' is a symlink to '/', outside the package"):
        expand_outputs(pkg, ("root/etc/hostname",))
    assert expand_outputs(pkg, ("root/**",), strict=False) == []  # left alone when old outputs are cleared


def test_a_restore_accepts_only_files_the_patterns_match_through_a_declared_link():
    links = {"dist": ".output/public"}
    check_restorable({".output/public/index.html": {}}, links, ("dist/**",))
    with pytest.raises(artifact.ArtifactError, match="'.output/secret.txt'"):
        check_restorable({".output/secret.txt": {}}, links, ("dist/**",))
    with pytest.raises(artifact.ArtifactError, match="'.output/public/a.map'"):
        check_restorable({".output/public/a.map": {}}, links, ("dist/**", "!dist/*.map"))
    with pytest.raises(artifact.ArtifactError, match="'src'"):
        check_restorable({}, {"src": "lib"}, ("dist/**",))


def test_a_restore_never_places_files_through_a_link_into_an_existing_folder_it_does_not_show(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "src").mkdir(parents=True)
    (pkg / "src/main.ts").write_text("source")
    poisoned = {"dist": "src"}
    with pytest.raises(artifact.ArtifactError, match="existing folder 'src'"):
        check_restorable({"src/main.ts": {}}, poisoned, ("dist/**",), pkg)
    check_restorable({".output/public/a.html": {}}, {"dist": ".output/public"}, ("dist/**",), pkg)  # a new folder
    (pkg / "node_modules/react").mkdir(parents=True)
    with pytest.raises(artifact.ArtifactError, match="existing folder 'node_modules'"):  # nothing new beside it
        check_restorable({"node_modules/planted/index.js": {}}, {"dist": "node_modules/planted"}, ("dist/**",), pkg)
    with pytest.raises(artifact.ArtifactError, match="existing folder 'src'"):
        check_restorable({"src/new/a.js": {}}, {"dist": "src/new"}, ("dist/**",), pkg)
    (pkg / ".output/public").mkdir(parents=True)
    os.symlink(".output/public", pkg / "dist")
    check_restorable({".output/public/a.html": {}}, {"dist": ".output/public"}, ("dist/**",), pkg)  # the same link


def test_a_poisoned_link_in_an_artifact_cannot_overwrite_sources(tmp_path):
    pk = checkout(tmp_path / "a", tmp_path, task("mkdir -p dist && echo ok > dist/a", ["dist/**"]))
    (pk.workspace / "packages/site/src").mkdir()
    (pk.workspace / "packages/site/src/main.ts").write_text("source\n")
    key = pk.keys()["site:build"]
    blob = craft({"src/main.ts": b"trojan\n"}, key=key, symlinks={"dist": "src"})
    with thread_server(tmp_path / "store") as (port, _):
        assert request(port, "PUT", f"/v1/artifacts/{key}", blob)[0] == 201
        status, err = build(pk, port)
    assert status == "miss" and "existing folder 'src'" in err
    assert (pk.workspace / "packages/site/src/main.ts").read_text() == "source\n"


@pytest.mark.parametrize("command, outputs", [
    ("mkdir -p dist/sub dist/empty && echo a > dist/a && echo b > dist/sub/b && ln -s a dist/link", ["dist/**"]),
    ("mkdir -p .next/cache && echo page > .next/page.js && echo s > .next/cache/s", [".next/**", "!.next/cache/**"]),
    (SYMLINKED, ["dist/**"]),
])
def test_a_remote_hit_leaves_its_outputs_in_place_for_the_next_build(tmp_path, command, outputs):
    # The record of a restore lists what the artifact placed; it must be what the output patterns
    # find on disk, or the next build would restore everything again instead of replaying the log.
    a = checkout(tmp_path / "a", tmp_path, task(command, outputs))
    b = checkout(tmp_path / "b", tmp_path, task(command, outputs))
    with thread_server(tmp_path / "store") as (port, _):
        assert build(a, port)[0] == "miss"
        assert build(b, port)[0] == "hit (remote)"
    site = b.workspace / "packages/site"
    before = {p: (os.lstat(p).st_ino, os.lstat(p).st_ctime_ns) for p in site.rglob("*")}
    assert build(b) == ("hit (local)", "")
    assert {p: (os.lstat(p).st_ino, os.lstat(p).st_ctime_ns) for p in site.rglob("*")} == before  # nothing restored again


def walked_tree(pkg: Path) -> None:
    (pkg / "dist/sub").mkdir(parents=True)
    (pkg / "dist/empty").mkdir()
    (pkg / "dist/sub/a.js").write_text("a")
    (pkg / "dist/b.js").write_text("b")
    (pkg / "dist/b.map").write_text("m")
    (pkg / "src").mkdir()
    (pkg / "src/x.ts").write_text("x")


CHANGES = {
    "a file added": lambda pkg: (pkg / "dist/sub/new.js").write_text("n"),
    "an empty folder added": lambda pkg: (pkg / "dist/sub/new").mkdir(),
    "a file removed": lambda pkg: (pkg / "dist/b.js").unlink(),
    "a file renamed": lambda pkg: (pkg / "dist/b.js").rename(pkg / "dist/c.js"),
    "an excluded file renamed to a matched name": lambda pkg: (pkg / "dist/b.map").rename(pkg / "dist/m.js"),
    "a file added to the empty folder": lambda pkg: (pkg / "dist/empty/e.js").write_text("e"),
    "the output folder swapped for a copy": lambda pkg: (shutil.copytree(pkg / "dist", pkg / "copy"),
                                                         shutil.rmtree(pkg / "dist"), (pkg / "copy").rename(pkg / "dist")),
    "a file swapped for a folder": lambda pkg: ((pkg / "dist/b.js").unlink(), (pkg / "dist/b.js").mkdir()),
    "a folder's mode": lambda pkg: os.chmod(pkg / "dist/sub", 0o700),
}


@pytest.fixture
def settled(monkeypatch):
    """The walks below stand for walks made long after the folders last changed (see SETTLE_NS)."""
    monkeypatch.setattr(outputs, "SETTLE_NS", -(10**18))
    monkeypatch.setattr(outputs, "SETTLE_WHOLE_SECONDS_NS", -(10**18))


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_walk_of_the_outputs_notes_every_folder_whose_change_could_change_its_answer(tmp_path, change, settled):
    pkg = tmp_path / "pkg"
    walked_tree(pkg)
    walked: dict = {}
    assert expand_outputs(pkg, ("dist/**", "!dist/*.map"), walked=walked) == ["dist/b.js", "dist/empty", "dist/sub/a.js"]
    assert sorted(walked) == ["dist", "dist/empty", "dist/sub"]
    assert walk_unchanged(pkg, walked)
    (pkg / "src/y.ts").write_text("y")  # outside the outputs' folders: not looked at
    (pkg / "dist/sub/a.js").write_text("changed")  # a file's own change is its signature's to see, not the walk's
    assert walk_unchanged(pkg, walked)
    CHANGES[change](pkg)
    assert not walk_unchanged(pkg, walked)


def test_a_walk_of_folders_changed_within_the_settling_time_is_not_kept(tmp_path, monkeypatch):
    # An entry added to a folder in the same tick of the filesystem's clock as the folder's last
    # noted change leaves the folder's signature as noted: a walk kept then would hide the new
    # entry from every later run. So a walk that noted such a recent change is not kept at all.
    pkg = tmp_path / "pkg"
    walked_tree(pkg)
    monkeypatch.setattr(outputs, "SETTLE_NS", 10**18)  # every change counts as recent
    monkeypatch.setattr(outputs, "SETTLE_WHOLE_SECONDS_NS", 10**18)
    walked: dict = {}
    assert expand_outputs(pkg, ("dist/**", "!dist/*.map"), walked=walked) == ["dist/b.js", "dist/empty", "dist/sub/a.js"]
    assert walked == {}
    walked = {}
    assert expand_outputs(pkg, ("target/release/**",), walked=walked) == []
    assert walked == {"target": None}  # nothing there to change unseen: a missing folder's appearance is seen
    monkeypatch.setattr(outputs, "SETTLE_NS", -(10**18))  # the same walk, long after: kept
    monkeypatch.setattr(outputs, "SETTLE_WHOLE_SECONDS_NS", -(10**18))
    walked = {}
    expand_outputs(pkg, ("dist/**", "!dist/*.map"), walked=walked)
    assert sorted(walked) == ["dist", "dist/empty", "dist/sub"]


def test_a_timestamp_in_whole_seconds_waits_for_the_longer_tick():
    started = 10**19
    fine = started - outputs.SETTLE_NS - 1  # an odd nanosecond: a fine clock
    assert outputs._settled([0, fine, 0, fine, 0], started)
    assert not outputs._settled([0, started - outputs.SETTLE_NS, 0, fine, 0], started)
    second = (started - outputs.SETTLE_NS - 1) // 10**9 * 10**9  # past the short wait, in whole seconds
    assert not outputs._settled([0, second, 0, fine, 0], started)
    old = (started - outputs.SETTLE_WHOLE_SECONDS_NS - 1) // 10**9 * 10**9
    assert outputs._settled([0, old, 0, old, 0], started) and outputs._settled(None, started)


def test_a_walk_notes_missing_folders_and_gives_up_on_links(tmp_path, settled):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    walked: dict = {}
    assert expand_outputs(pkg, ("target/release/**", "out"), walked=walked) == []
    assert walked == {"target": None, "out": None}
    (pkg / "out").write_text("now a file")  # a pattern naming a file matches it: the walk's answer changed
    assert not walk_unchanged(pkg, walked)
    walked = {}
    (pkg / "target").mkdir()
    assert expand_outputs(pkg, ("target/release/**",), walked=walked) == []
    assert walked["target/release"] is None and walk_unchanged(pkg, walked)
    (pkg / "target/release").mkdir()
    assert not walk_unchanged(pkg, walked)
    walked_tree(pkg)
    os.symlink("b.js", pkg / "dist/latest.js")
    walked = {}
    assert "dist/latest.js" in expand_outputs(pkg, ("dist/**",), walked=walked)
    assert walked == {}  # where a link leads is not in the folders' signatures: such outputs are walked each time


@pytest.mark.parametrize("source", ["built", "restored"])
def test_outputs_changed_after_a_hit_left_them_in_place_are_restored(tmp_path, source):
    # Builds of hits whose outputs are in place no longer walk the output folders: what the last
    # walk listed is looked at instead, so an entry added anywhere in them must still be seen.
    command = "mkdir -p dist/sub && echo a > dist/a && echo b > dist/sub/b"
    a = checkout(tmp_path / "a", tmp_path, task(command, ["dist/**"]))
    b = checkout(tmp_path / "b", tmp_path, task(command, ["dist/**"]))
    with thread_server(tmp_path / "store") as (port, _):
        assert build(a, port)[0] == "miss"
        assert build(b, port)[0] == "hit (remote)"
    pk = a if source == "built" else b
    site = pk.workspace / "packages/site"
    expected = snapshot(site / "dist")
    for change in (lambda: (site / "dist/sub/extra").write_text("x"), lambda: (site / "dist/sub/new").mkdir(),
                   lambda: (site / "dist/a").unlink()):
        inode = (site / "dist/sub/b").stat().st_ino
        assert build(pk) == ("hit (local)", "")
        assert build(pk) == ("hit (local)", "")
        assert (site / "dist/sub/b").stat().st_ino == inode  # left in place twice
        change()
        assert build(pk) == ("hit (local)", "")
        assert snapshot(site / "dist") == expected
