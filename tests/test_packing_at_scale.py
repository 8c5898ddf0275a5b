"""Packing and restoring outputs of thousands of members: the fast paths write exactly the format
``tarfile`` writes, and the folders kept open during a restore stay bounded and checked."""

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from polykit_client import artifact, nofollow, tarstream
from polykit_client.artifact import ArtifactError
from polykit_client.nofollow import LinkInPath
from support import KEY

FILES = 5000


def big_tree(root: Path) -> None:
    """5,000 files in nested folders, executables among them, empty folders and symlinks."""
    rng = random.Random(5)
    for i in range(FILES):
        path = root / "dist" / f"d{i % 40}" / f"s{i % 3}" / f"f{i}.js"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.choice([0, 1, 511, 512, 513, 4096])))
        if i % 9 == 0:
            path.chmod(0o755)
    big = root / "dist" / "big.bin"
    big.write_bytes(rng.randbytes(artifact.KEEP_SMALL_FILE + 1))  # read again and rehashed while packed
    for i in range(20):
        (root / "dist" / f"d{i}" / "empty").mkdir()
        os.symlink(f"s0/f{i}.js", root / "dist" / f"d{i}" / "link")
    os.symlink("d1/s1", root / "dist" / "folder-link")


def snapshot(root: Path) -> dict:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", bool(os.listdir(path)))
            else:
                found[rel] = ("file", path.stat().st_mode & 0o777, path.read_bytes())
    return found


def test_a_tree_of_thousands_of_files_round_trips_with_modes_links_and_empty_folders(tmp_path):
    src = tmp_path / "src"
    big_tree(src)
    blob = io.BytesIO()
    meta = artifact.pack(blob, src, ["dist"], {"package": "web"}, log=b"built\n", cache_key=KEY)
    assert len(meta["files"]) == FILES + 1 + 20 and len(meta["symlinks"]) == 21
    staging = tmp_path / "staging"
    blob.seek(0)
    assert artifact.extract(blob, staging / "outputs", logs_dir=staging / "logs", expected_key=KEY) == meta
    dest = tmp_path / "pkg"
    (dest / "dist" / "d3").mkdir(parents=True)
    (dest / "dist" / "d3" / "link").mkdir()  # a folder where the artifact has a link: replaced
    artifact.place(staging / "outputs", dest, meta)
    assert snapshot(dest) == snapshot(src)
    blob.seek(0)
    again = io.BytesIO()
    artifact.pack(again, dest, ["dist"], {"package": "web"}, log=b"built\n", cache_key=KEY)
    assert again.getvalue() == blob.getvalue()  # deterministic: the restored tree packs to the same bytes


def test_plain_headers_are_the_bytes_tarfile_writes():
    names = ["a", "x" * 99, "x" * 100, "x" * 101, "outputs/é", "outputs/dist/app.js", "d" * 150 + "/x"]
    kinds = [(tarfile.REGTYPE, 0o644, 0, ""), (tarfile.REGTYPE, 0o755, 12345, ""),
             (tarfile.REGTYPE, 0o644, 8 ** 11 - 1, ""), (tarfile.REGTYPE, 0o644, 8 ** 11, ""),
             (tarfile.DIRTYPE, 0o755, 0, ""), (tarfile.SYMTYPE, 0o777, 0, "../a"),
             (tarfile.SYMTYPE, 0o777, 0, "t" * 100), (tarfile.SYMTYPE, 0o777, 0, "t" * 101),
             (tarfile.SYMTYPE, 0o777, 0, "ü")]
    for name in names:
        for kind, mode, size, target in kinds:
            expected = tarstream.member_info(name, kind, mode, size, target).tobuf(
                tarfile.PAX_FORMAT, tarstream.ENCODING, "strict")
            assert tarstream.header(name, kind, mode, size, target) == expected, (name, kind, size, target)


def test_the_tar_writer_writes_what_tarfile_stream_mode_writes():
    rng = random.Random(7)
    members = []
    for i in range(300):
        data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000, tarstream.CHUNK + 3]))
        members.append((f"outputs/{'é' if i % 50 == 0 else ''}{'n' * (i % 130)}{i}", data))
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = tarstream.TarWriter(ours)
    with tarfile.open(fileobj=theirs, mode="w|", format=tarfile.PAX_FORMAT, encoding=tarstream.ENCODING) as tar:
        for name, data in members:
            writer.add(name, tarfile.REGTYPE, 0o644, len(data))
            writer.data(data)
            writer.end_data(len(data))
            tar.addfile(tarstream.member_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        writer.add("outputs/e", tarfile.DIRTYPE, 0o755)
        tar.addfile(tarstream.member_info("outputs/e", tarfile.DIRTYPE, 0o755))
        writer.add("outputs/l", tarfile.SYMTYPE, 0o777, target="../" + "x" * 120)
        tar.addfile(tarstream.member_info("outputs/l", tarfile.SYMTYPE, 0o777, target="../" + "x" * 120))
    writer.close()
    assert ours.getvalue() == theirs.getvalue()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_restore_keeps_a_bounded_number_of_folders_open(tmp_path):
    before = open_fds()
    folders = nofollow.Folders(tmp_path, create=True)
    for i in range(10 * nofollow.Folders.KEEP):
        parent, name = folders.parent(f"a{i}/b/c/f")
        os.close(nofollow.create_at(parent, name, 0o644))
        assert open_fds() <= before + 1 + nofollow.Folders.KEEP
    folders.close(check=True)
    assert open_fds() == before
    assert (tmp_path / "a7" / "b" / "c" / "f").is_file()


def test_a_folder_swapped_for_a_link_after_it_was_written_to_is_caught_when_let_go(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    folders = nofollow.Folders(root, create=True)
    parent, name = folders.parent("d/f")
    os.close(nofollow.create_at(parent, name, 0o644))
    (root / "d").rename(root / "moved")
    os.symlink(outside, root / "d")
    parent, name = folders.parent("d/g")  # the kept descriptor: never the link
    os.close(nofollow.create_at(parent, name, 0o644))
    with pytest.raises(LinkInPath):
        folders.close(check=True)
    assert not any(outside.iterdir())
    assert sorted(os.listdir(root / "moved")) == ["f", "g"]


def test_a_large_output_changed_after_it_was_hashed_is_not_packed(tmp_path, monkeypatch):
    # Small outputs are written from the very bytes that were hashed; a large one is read again,
    # and a change in between must fail the pack rather than contradict the manifest.
    (tmp_path / "dist").mkdir()
    big = tmp_path / "dist" / "big.bin"
    big.write_bytes(b"a" * (artifact.KEEP_SMALL_FILE + 10))
    collect = artifact.collect_outputs

    def collect_then_change(*args, **kwargs):
        found = collect(*args, **kwargs)
        big.write_bytes(b"b" * (artifact.KEEP_SMALL_FILE + 10))
        return found

    monkeypatch.setattr(artifact, "collect_outputs", collect_then_change)
    with pytest.raises(ArtifactError) as err:
        artifact.pack(io.BytesIO(), tmp_path, ["dist"], {}, cache_key=KEY)
    assert err.value.reason == "changed_while_packing" and "dist/big.bin" in str(err.value)
