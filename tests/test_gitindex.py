"""Input digests from git's index: the same keys as reading every file, and git trusted only where it vouches for the bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from polykit_client.blobid import blob_id_large, blob_id_of, blob_id_small
from polykit_client import gitobjects, indexfile
from polykit_client.gitindex import KEPT_FILE, GitIndex, converting, converting_macros
from sample import Polykit, make_tools, make_workspace

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]


def git(root: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True, text=True).stdout


def committed(root: Path, *init: str) -> Path:
    git(root, "init", "-q", *init)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


@pytest.fixture
def pk(tmp_path):
    ws = committed(make_workspace(tmp_path / "ws"))
    (ws / "packages/web/src/big.bin").write_bytes(bytes(range(256)) * 2048)  # read in chunks
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "big")
    return Polykit(ws, make_tools(tmp_path / "tools", {"python3": "Python 3.12.0"}), tmp_path / "marker")  # the whole toolchain fake


def test_blob_ids_are_gits(tmp_path):
    for name, data in {"empty": b"", "small": b"x = 1\n", "large": b"\0\1" * 400_000}.items():
        path = tmp_path / name
        path.write_bytes(data)
        expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
        assert blob_id_of(data) == blob_id_small(str(path)) == blob_id_large(str(path)) == expected


def test_git_vouches_for_every_tracked_unmodified_file_and_nothing_else(pk):
    ws = pk.workspace
    (ws / "packages/web/src/app.ts").write_text("modified\n")
    (ws / "packages/web/notes.md").write_text("untracked\n")
    (ws / "packages/web/link").symlink_to("src/app.ts")
    git(ws, "add", "packages/web/link")
    state = GitIndex(ws, untracked=True).result()
    tracked = git(ws, "ls-files", "-z").split("\0")[:-1]
    assert state.files == sorted(tracked + ["packages/web/notes.md"])
    assert set(state.blobs) == set(tracked) - {"packages/web/src/app.ts", "packages/web/link"}
    for rel, oid in state.blobs.items():
        assert oid == blob_id_small(str(ws / rel))
    assert GitIndex(ws, untracked=False).result().files == sorted(tracked)


def test_a_workspace_below_the_top_of_the_work_tree(tmp_path):
    top = tmp_path / "repo"
    ws = make_workspace(top / "ws")
    (top / "elsewhere.txt").write_text("not in the workspace\n")
    committed(top)
    state = GitIndex(ws, untracked=True).result()
    assert "polykit.toml" in state.files and "packages/web/src/app.ts" in state.blobs
    assert not any("elsewhere" in rel for rel in state.files)
    (top / ".gitattributes").write_text("*.ts text\n")  # above the workspace: applies to all of it
    assert GitIndex(ws, untracked=True).result().blobs == {}


def test_keys_from_git_equal_keys_from_reading_files(pk, tmp_path, monkeypatch):
    """The same workspace gives the same keys with git's digests, without git, and without the repository."""
    from_git = pk.keys()
    state = json.loads((pk.workspace / ".polykit/state.json").read_text())
    assert state["folders"] == {}, "a clean checkout's tracked files are not read"
    pk.env["PATH"] = str(tmp_path / "tools") + ":/nonexistent"  # the fake toolchain, and no git
    shutil.rmtree(pk.workspace / ".polykit")
    assert pk.keys() == from_git
    pk.env["PATH"] = str(tmp_path / "tools") + ":" + str(Path(shutil.which("git")).parent)
    shutil.move(pk.workspace / ".git", tmp_path / "moved.git")
    assert pk.keys() == from_git
    shutil.move(tmp_path / "moved.git", pk.workspace / ".git")
    assert pk.keys() == from_git


def test_a_sha256_repository_is_read_and_keys_the_same(tmp_path):
    keys = {}
    for name, init in (("sha1", ()), ("sha256", ("--object-format=sha256",))):
        ws = make_workspace(tmp_path / name)
        try:
            committed(ws, *init)
        except subprocess.CalledProcessError:
            pytest.skip("this git cannot make a SHA-256 repository")
        state = GitIndex(ws, untracked=True).result()
        assert bool(state.blobs) == (name == "sha1")  # a 64-digit id is never taken for a blob id
        keys[name] = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker").keys()
    assert keys["sha1"] == keys["sha256"]


def test_a_conversion_attribute_below_a_folder_leaves_only_that_folder_to_be_read(pk):
    ws = pk.workspace
    (ws / "packages/web/.gitattributes").write_text("*.ts text eol=crlf\n")
    state = GitIndex(ws, untracked=True).result()
    assert state.blobs and not any(rel.startswith("packages/web/") for rel in state.blobs)
    assert "packages/api-server/src/main.rs" in state.blobs
    (ws / ".gitattributes").write_text("*.png binary\n*.md -text\n*.rs linguist-generated\n")
    assert "packages/api-server/src/main.rs" in GitIndex(ws, untracked=True).result().blobs
    (ws / ".gitattributes").write_text("* text=auto\n")
    assert GitIndex(ws, untracked=True).result().blobs == {}


def test_an_ignored_attributes_file_and_info_attributes_count(pk):
    ws = pk.workspace
    (ws / ".gitignore").write_text(".gitattributes\n")
    (ws / "packages/api-server/.gitattributes").write_text("*.rs ident\n")
    state = GitIndex(ws, untracked=True).result()
    assert "packages/api-server/.gitattributes" not in state.files
    assert state.blobs and not any(rel.startswith("packages/api-server/") for rel in state.blobs)
    (ws / ".git/info").mkdir(exist_ok=True)
    (ws / ".git/info/attributes").write_text("*.json working-tree-encoding=UTF-16\n")
    assert GitIndex(ws, untracked=True).result().blobs == {}


def test_attribute_lines_that_convert():
    assert converting("*.py text\n", set()) and converting("*.py eol=lf\n", set())
    assert converting("x filter=lfs diff=lfs merge=lfs -text\n", set()) and converting("* ident", set())
    assert converting("*.txt crlf\n", set()) and converting("*.c working-tree-encoding=UTF-16", set())
    assert not converting("*.png binary\n# text\n*.md -text !eol -crlf\n*.rs linguist-vendored\n", set())
    macros = converting_macros(["[attr]lf text eol=lf\n[attr]mine lf\n[attr]plain -text\n"])
    assert macros == {"lf", "mine"}
    assert converting("*.x mine\n", macros) and not converting("*.x plain\n", macros)


def test_core_autocrlf_set_in_any_form_leaves_every_file_to_be_read(pk):
    ws = pk.workspace
    assert GitIndex(ws, untracked=True).result().blobs
    config = ws / ".git/config"
    plain = config.read_text()
    config.write_text(plain + "[core]\n\tautocrlf\n")  # a bare name is true
    assert GitIndex(ws, untracked=True).result().blobs == {}
    config.write_text(plain + "[core]\n\tautocrlf = input\n")
    assert GitIndex(ws, untracked=True).result().blobs == {}
    config.write_text(plain + "[core]\n\tautocrlf = false\n")
    assert GitIndex(ws, untracked=True).result().blobs


def _crlf_behind_a_clean_entry(pk, how: str) -> Path:
    """A tracked file whose disk bytes are CRLF while its blob is LF and git calls it unmodified."""
    ws = pk.workspace
    rel = "packages/web/src/app.ts"
    config = ["-c", "core.autocrlf=true"] if how == "one-off autocrlf" else []
    if how != "one-off autocrlf":
        (ws / "packages/web/.gitattributes").write_text("*.ts text eol=crlf\n")
        git(ws, "add", "-A")
        git(ws, "commit", "-qm", "crlf")
    if how == "sparse checkout":  # an attributes file the sparse checkout keeps off the disk
        git(ws, "sparse-checkout", "set", "--no-cone", "/*", "!/packages/web/.gitattributes")
    (ws / rel).unlink()
    git(ws, *config, "checkout", "--", rel)
    # The file's stat data recorded in an index written well after it (not racily clean), while
    # the conversion is still in force.
    past = (ws / rel).stat().st_mtime - 10
    os.utime(ws / rel, (past, past))
    git(ws, *config, "update-index", "-q", "--refresh")
    if how == "attribute removed since":
        git(ws, "rm", "-q", "packages/web/.gitattributes")
        git(ws, "commit", "-qm", "no more crlf")
    assert b"\r\n" in (ws / rel).read_bytes()
    assert git(ws, "status", "--porcelain", "--untracked-files=no") == ""  # git calls it clean
    return ws / rel


@pytest.mark.parametrize("proof", ["sizes", "hashes"])
@pytest.mark.parametrize("how", ["attribute removed since", "one-off autocrlf", "sparse checkout"])
def test_a_file_converted_at_checkout_is_read_whatever_git_says(pk, how, proof):
    """git compares a file with the stat data it recorded under the conversions of the checkout:
    other bytes than the blob's behind a clean entry must still change the key, whether the
    blob's size or the file's hash proves the others."""
    lf_keys = pk.keys()
    path = _crlf_behind_a_clean_entry(pk, how)
    rel = str(path.relative_to(pk.workspace))
    (pk.workspace / KEPT_FILE).unlink()  # no blob size known: every entry proven the one way
    state = GitIndex(pk.workspace, untracked=True, proof=proof).result()
    assert rel not in state.blobs and state.blobs
    assert GitIndex(pk.workspace, untracked=True, proof=proof).result().blobs == state.blobs  # the kept verdict
    crlf_keys = pk.keys()
    assert crlf_keys != lf_keys
    path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
    assert pk.keys() == lf_keys


def test_blob_sizes_are_kept_for_the_next_run_and_a_damaged_file_is_ignored(pk):
    ws = pk.workspace
    first = GitIndex(ws, untracked=True).result()
    kept = json.loads((ws / KEPT_FILE).read_text())
    sizes = dict(line.split(" ") for line in kept["sizes"].splitlines())
    assert set(sizes) == set(first.blobs.values())
    for rel, oid in first.blobs.items():
        assert int(sizes[oid]) == (ws / rel).stat().st_size
    assert kept["index"] == (ws / ".git/index").read_bytes()[-20:].hex() and kept["doubtful"] == {}
    assert GitIndex(ws, untracked=True).result().blobs == first.blobs
    for damaged in ("not json", json.dumps({**kept, "version": 0}), json.dumps({**kept, "doubtful": [], "sizes": 3}),
                    json.dumps({**kept, "index": "0" * 40, "sizes": "not a line\n" + "0" * 40 + " x\n"})):
        (ws / KEPT_FILE).write_text(damaged)
        assert GitIndex(ws, untracked=True).result().blobs == first.blobs


def test_the_index_files_verdict_is_kept_by_its_checksum(pk):
    """While the index file stays the same only its checksum is read: what was found of its
    entries' sizes is taken from the kept file; a new index is read again."""
    ws = pk.workspace
    rel = "packages/web/src/app.ts"
    first = GitIndex(ws, untracked=True).result()
    assert rel in first.blobs
    kept = json.loads((ws / KEPT_FILE).read_text())
    (ws / KEPT_FILE).write_text(json.dumps({**kept, "doubtful": {rel: 1}}))  # as if its size were not its blob's
    assert rel not in GitIndex(ws, untracked=True).result().blobs
    git(ws, "update-index", "--index-version", "4")  # the same entries in a new file
    assert GitIndex(ws, untracked=True).result().blobs == first.blobs
    assert json.loads((ws / KEPT_FILE).read_text())["doubtful"] == {}


def test_entries_git_has_not_sized_are_checked_on_disk(pk):
    """An entry written by read-tree records size 0 (so do racily clean ones git smudges): git
    compares those by content, so their size is taken from the file."""
    ws = pk.workspace
    first = GitIndex(ws, untracked=True).result()
    git(ws, "read-tree", "HEAD")
    assert all(size == 0 for _, size in indexfile.parse((ws / ".git/index").read_bytes()).values())
    assert GitIndex(ws, untracked=True).result().blobs == first.blobs
    assert set(json.loads((ws / KEPT_FILE).read_text())["doubtful"]) >= set(first.blobs)


@pytest.mark.parametrize("version", ["2", "3", "4", "split"])
def test_the_index_file_as_git_writes_it(pk, version):
    """Every version git writes gives git's blob ids and the files' sizes; a split index is not read."""
    ws = pk.workspace
    (ws / "packages/web/src/new.ts").write_text("intent to add\n")
    if version != "2":
        git(ws, "add", "--intent-to-add", "packages/web/src/new.ts")  # an extended flag: version 3 at least
    if version == "split":
        git(ws, "update-index", "--split-index")
    else:
        git(ws, "update-index", "--index-version", version)
    data = (ws / ".git/index").read_bytes()
    if version == "split":
        assert indexfile.parse(data) is None
    else:
        assert data[4:8] == int(version).to_bytes(4, "big")
        entries = indexfile.parse(data)
        listed = dict(line.split(" ", 1)[1].split(" 0\t")[::-1] for line in git(ws, "ls-files", "-s").splitlines())
        assert {rel: oid for rel, (oid, _) in entries.items()} == listed
        for rel, (_, size) in entries.items():
            assert size == (0 if rel.endswith("new.ts") else (ws / rel).stat().st_size)  # intent-to-add: not sized
        assert indexfile.parse(data[:-30] + data[-20:]) is None  # cut short
        assert indexfile.parse(b"DIRX" + data[4:]) is None
    state = GitIndex(ws, untracked=True).result()
    assert state.blobs and "packages/web/src/new.ts" not in state.blobs
    for rel, oid in state.blobs.items():
        assert oid == blob_id_small(str(ws / rel))


def test_an_index_replaced_while_git_lists_is_read_again(pk):
    ws = pk.workspace
    expected = GitIndex(ws, untracked=True).result().blobs
    index = GitIndex(ws, untracked=True)
    index._setup_thread.join()
    git(ws, "read-tree", "HEAD")  # a new file: every entry of size 0
    assert index.result().blobs == expected


def test_a_split_index_has_its_files_sized_on_disk_and_blob_sizes_kept(pk):
    ws = pk.workspace
    expected = GitIndex(ws, untracked=True).result().blobs
    git(ws, "update-index", "--split-index")
    (ws / KEPT_FILE).unlink()
    assert GitIndex(ws, untracked=True).result().blobs == expected
    sizes = json.loads((ws / KEPT_FILE).read_text())["sizes"]
    assert {line.split(" ")[0] for line in sizes.splitlines()} == set(expected.values())


def test_files_hashed_instead_of_blob_sizes_looked_up_give_the_same_blob_ids(pk):
    """A fresh clone's entries proven by hashing their files: the same blob ids as the sizes give,
    and a verdict kept for the next run without blob sizes (a file whose bytes are not its
    blob's is in test_a_file_converted_at_checkout_is_read_whatever_git_says)."""
    ws = pk.workspace
    by_sizes = GitIndex(ws, untracked=True, proof="sizes").result().blobs
    (ws / KEPT_FILE).unlink()
    assert GitIndex(ws, untracked=True, proof="hashes").result().blobs == by_sizes
    kept = json.loads((ws / KEPT_FILE).read_text())
    assert kept["doubtful"] == {} and kept["sizes"] == ""  # hashing learns no blob's size
    assert GitIndex(ws, untracked=True).result().blobs == by_sizes


def test_a_file_git_finds_changed_is_not_hashed_and_its_blob_size_is_looked_up(pk):
    """Only files git calls unmodified are opened: a named pipe in a file's place would block the
    hashing, a file gone would stop it."""
    ws = pk.workspace
    expected = GitIndex(ws, untracked=True).result().blobs
    gone, pipe = "packages/web/src/app.ts", "packages/web/src/big.bin"
    (ws / gone).unlink()
    (ws / pipe).unlink()
    os.mkfifo(ws / pipe)
    (ws / KEPT_FILE).unlink()
    state = GitIndex(ws, untracked=True, proof="hashes").result()
    assert state.blobs == {rel: oid for rel, oid in expected.items() if rel not in (gone, pipe)}
    kept = json.loads((ws / KEPT_FILE).read_text())
    assert {line.split(" ")[0] for line in kept["sizes"].splitlines()} == {expected[gone], expected[pipe]}
    assert set(kept["doubtful"]) == set()  # their sizes are their blobs': git's own check refuses them


def test_a_tracked_name_ending_in_a_carriage_return_is_never_proven_by_another_files_hash(pk):
    """``hash-object --stdin-paths`` reads its lines as text: a carriage return before the line's
    end is dropped, so "app.ts\r" would be answered with the hash of "app.ts". A CRLF copy behind
    a clean "app.ts\r" must change the key though "app.ts" holds its blob's bytes."""
    ws = pk.workspace
    src = ws / "packages/web/src"
    twin = src / "app.ts\r"
    twin.write_bytes((src / "app.ts").read_bytes())
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "twin")
    twin.unlink()
    git(ws, "-c", "core.autocrlf=true", "checkout", "--", "packages/web/src/app.ts\r")
    past = twin.stat().st_mtime - 10  # recorded well after it was written: not racily clean
    os.utime(twin, (past, past))
    git(ws, "-c", "core.autocrlf=true", "update-index", "-q", "--refresh")
    assert b"\r\n" in twin.read_bytes() and b"\r\n" not in (src / "app.ts").read_bytes()
    assert git(ws, "status", "--porcelain", "--untracked-files=no") == ""  # git calls it clean
    (ws / KEPT_FILE).unlink(missing_ok=True)  # no blob size known: every entry is hashed
    state = GitIndex(ws, untracked=True, proof="hashes").result()
    assert "packages/web/src/app.ts\r" not in state.blobs and "packages/web/src/app.ts" in state.blobs
    assert not gitobjects.hashable("a\rb") and not gitobjects.hashable("a\r")


def test_git_objects_hashed_and_sized_in_two_processes(tmp_path):
    """Past gitobjects.SPLIT items two processes share the work; every answer lands on its item."""
    files = {f"f{n:05d}.txt": f"file {n}\n".encode() for n in range(gitobjects.SPLIT + 3)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    program = shutil.which("git")
    ids = gitobjects.blob_ids(program, str(tmp_path), list(files), 60)
    assert ids == {name: blob_id_of(data) for name, data in files.items()}
    committed(tmp_path)
    sizes = gitobjects.blob_sizes(program, str(tmp_path), list(ids.values()) + ["0" * 40], 60)
    assert sizes == {blob_id_of(data): len(data) for data in files.values()}  # a missing object: no size
    assert gitobjects.blob_ids(program, str(tmp_path), ["gone.txt"], 60) is None
    # By default, past gitindex.HASH_FROM entries: loose objects have their files hashed (no size
    # learnt), packed ones their sizes looked up; the same blob ids either way.
    expected = {name: blob_id_of(data) for name, data in files.items()}
    assert GitIndex(tmp_path, untracked=False).result().blobs == expected
    assert json.loads((tmp_path / KEPT_FILE).read_text())["sizes"] == ""
    git(tmp_path, "gc", "-q", "--prune=now")
    (tmp_path / KEPT_FILE).unlink()
    assert GitIndex(tmp_path, untracked=False).result().blobs == expected
    assert len(json.loads((tmp_path / KEPT_FILE).read_text())["sizes"].splitlines()) == len(files)


def test_the_loose_share_of_the_object_store_decides_what_costs_less(tmp_path):
    repo = committed(make_workspace(tmp_path / "ws"))
    ids = [line.split()[1] for line in git(repo, "ls-files", "-s").splitlines()]
    objects = str(repo / ".git/objects")
    assert gitobjects.loose_share(objects, ids) == 1.0
    git(repo, "gc", "-q", "--prune=now")
    assert gitobjects.loose_share(objects, ids) == 0.0
    # 50,000 files of 1 KiB: hashing beats loose look-ups and loses to packed ones.
    assert gitobjects.hashing_pays(1.0, 50_000, 50_000, 50_000 << 10)
    assert not gitobjects.hashing_pays(0.0, 50_000, 50_000, 50_000 << 10)
    assert not gitobjects.hashing_pays(1.0, 100, 100, 1 << 30)  # a gigabyte to read costs more
    assert not gitobjects.hashable("a\nb") and not gitobjects.hashable('"quoted"') and gitobjects.hashable("a b")
