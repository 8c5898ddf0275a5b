"""Restoring a verified artifact: small ones from memory, large ones through a staging folder,
both placing exactly what was packed and never through a link."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from polykit_client import restore
from polykit_client.artifact import ArtifactError, Limits
from polykit_client.nofollow import LinkInPath
from sample import Polykit, make_tools
from support import KEY
from test_artifact import make_tree, pack

WAYS = {"memory": restore.HOLD_UNPACKED, "staging folder": 0}


def entries(root: Path) -> dict:
    """Every entry under ``root``: file bytes and mode as an artifact carries it, link targets, folders."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", path.read_bytes(), 0o755 if path.stat().st_mode & 0o111 else 0o644)
    return found


def staged_from(tmp_path: Path, src: Path, hold: int, blob: bytes | None = None) -> restore.Staged:
    path = tmp_path / "artifact.zst"
    path.write_bytes(pack(src) if blob is None else blob)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return restore.stage(path, KEY, Limits(), tmp_path / "tmp", hold=hold)


def test_artifacts_held_in_memory_share_one_bound(tmp_path):
    """Hits are verified ahead of their tasks' turns; those waiting in memory hold at most the
    budget together, the rest wait in staging folders, and a release gives back."""
    src = tmp_path / "src"
    make_tree(src)
    blob = pack(src)
    (tmp_path / "probe").mkdir()
    one = staged_from(tmp_path / "probe", src, restore.HOLD_UNPACKED, blob)
    size = one._reserved
    one.release()
    budget = restore.Budget(2 * size)

    def stage(n: int) -> restore.Staged:
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        (folder / "tmp").mkdir()
        (folder / "artifact.zst").write_bytes(blob)
        return restore.stage(folder / "artifact.zst", KEY, Limits(), folder / "tmp", budget=budget)

    first, second, third = stage(1), stage(2), stage(3)
    assert [type(s) for s in (first, second, third)] == [restore.Held, restore.Held, restore.Staged]
    third.release()
    first.release()
    assert isinstance(stage(4), restore.Held)  # the first's bytes were given back


@pytest.mark.parametrize("way", WAYS)
def test_a_restore_places_exactly_what_was_packed(tmp_path, way):
    src = tmp_path / "src"
    make_tree(src)
    staged = staged_from(tmp_path, src, WAYS[way])
    assert isinstance(staged, restore.Held) == (way == "memory")
    assert (os.listdir(tmp_path / "tmp") == []) == (way == "memory")  # memory: no staging folder at all
    dest = tmp_path / "pkg"
    dest.mkdir()
    staged.place(dest)
    log = staged.log if isinstance(staged.log, bytes) else staged.log.read_bytes()
    staged.release()
    assert entries(dest) == entries(src) and log == b"log line\n"
    assert {(dest / "dist" / name).stat().st_mode & 0o777 for name in ("app.js", "run.sh")} == {0o644, 0o755}
    assert os.listdir(tmp_path / "tmp") == [] and (tmp_path / "artifact.zst").exists()  # the file is the caller's


@pytest.mark.parametrize("way", WAYS)
def test_a_restore_replaces_what_is_in_the_way(tmp_path, way):
    src = tmp_path / "src"
    make_tree(src)
    dest = tmp_path / "pkg"
    (dest / "dist" / "app.js").mkdir(parents=True)  # a folder where the artifact has a file
    (dest / "dist" / "app.js" / "old").write_text("old")
    (dest / "dist" / "latest").write_text("a file where the artifact has a link")
    (dest / "dist" / "run.sh").write_text("older")
    staged_from(tmp_path, src, WAYS[way]).place(dest)
    assert entries(dest) == entries(src)


@pytest.mark.parametrize("way", WAYS)
def test_a_folder_of_the_package_that_is_a_link_stops_the_restore(tmp_path, way):
    src = tmp_path / "src"
    make_tree(src)
    outside, dest = tmp_path / "outside", tmp_path / "pkg"
    outside.mkdir()
    dest.mkdir()
    os.symlink(outside, dest / "dist")
    staged = staged_from(tmp_path, src, WAYS[way])
    with pytest.raises(LinkInPath):
        staged.place(dest)
    assert os.listdir(outside) == []


@pytest.mark.parametrize("way", WAYS)
def test_an_artifact_that_fails_verification_leaves_nothing(tmp_path, way):
    src = tmp_path / "src"
    make_tree(src)
    blob = pack(src)
    bad = blob[:-40] + bytes(40)  # damaged near its end: after the members a staging folder received
    with pytest.raises(ArtifactError):
        staged_from(tmp_path, src, WAYS[way], bad)
    assert os.listdir(tmp_path / "tmp") == []


def test_only_an_artifact_within_the_bound_is_held_in_memory(tmp_path):
    src = tmp_path / "src"
    (src / "dist").mkdir(parents=True)
    (src / "dist" / "big").write_bytes(b"x" * 5000)
    log_size = len(b"log line\n")
    assert isinstance(staged_from(tmp_path, src, 5000 + log_size), restore.Held)
    over = staged_from(tmp_path, src, 5000 + log_size - 1)
    assert not isinstance(over, restore.Held) and (over.staging / "outputs" / "dist" / "big").stat().st_size == 5000
    over.discard()
    assert os.listdir(tmp_path / "tmp") == [] and not (tmp_path / "artifact.zst").exists()


def test_a_restore_that_fails_midway_leaves_no_output_behind(tmp_path):
    """A write that fails part-way (here the file size limit, as a full disk would) must not leave
    a truncated output for the task's own build to take as up to date, nor be recorded as placed."""
    ws = tmp_path / "ws"
    (ws / "packages" / "p").mkdir(parents=True)
    (ws / "polykit.toml").write_text('[workspace]\npackages_dir = "packages"\n')
    (ws / "packages" / "p" / "polykit.toml").write_text(
        'name = "p"\n[tasks]\nbuild = { command = "mkdir -p dist && ls dist > ../seen.txt'
        ' && (test -f dist/big.bin || head -c 1048576 /dev/zero > dist/big.bin)", outputs = ["dist/**"] }\n')
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    pk.run("build")
    big = ws / "packages" / "p" / "dist" / "big.bin"
    big.unlink()

    def limited() -> None:  # writes past 256 KiB fail with EFBIG (SIGXFSZ is ignored, as exec keeps it)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        out = subprocess.run([sys.executable, "-m", "polykit_client", "build"], cwd=ws, env=pk.env,
                             preexec_fn=limited, capture_output=True, text=True, timeout=120)
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    assert "could not restore" in out.stderr and "p:build  miss" in out.stdout
    assert (ws / "packages" / "seen.txt").read_text() == ""  # the build found no output left by the restore
    out = pk.run("build")
    assert "p:build  hit (local)" in out.stdout and big.stat().st_size == 1 << 20
