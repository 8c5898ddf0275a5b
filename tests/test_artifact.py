"""The artifact format: determinism, round trips, and every way a bad artifact is refused."""

import io
import os
import tarfile
from pathlib import Path

import pytest

from polykit_client import artifact
from polykit_client.artifact import ArtifactError, Limits
from support import KEY, OTHER_KEY, craft, manifest, member, raw_tar, sha, zst


def make_tree(root: Path) -> None:
    (root / "dist" / "sub").mkdir(parents=True)
    (root / "dist" / "app.js").write_text("console.log(1)\n")
    (root / "dist" / "sub" / "data.bin").write_bytes(os.urandom(3000))
    (root / "dist" / "empty").mkdir()
    (root / "dist" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "dist" / "run.sh", 0o775)
    os.chmod(root / "dist" / "app.js", 0o664)
    os.symlink("app.js", root / "dist" / "latest")
    os.symlink("../dist/sub", root / "dist" / "sublink")


def pack(root: Path, paths=("dist",), key=KEY, log=b"log line\n") -> bytes:
    buf = io.BytesIO()
    artifact.pack(buf, root, list(paths), {"package": "web", "task": "build", "command": "make"}, log=log, cache_key=key)
    return buf.getvalue()


def test_pack_is_deterministic_across_trees_with_other_times(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a)
    make_tree(b)
    (b / "dist" / "sub" / "data.bin").write_bytes((a / "dist" / "sub" / "data.bin").read_bytes())
    os.utime(b / "dist" / "app.js", (1_000_000, 1_000_000))
    old = os.umask(0o077)
    try:
        os.chmod(b / "dist" / "app.js", 0o600)
        first = pack(a)
    finally:
        os.umask(old)
    assert first == pack(a)
    assert first == pack(b)


def test_round_trip_keeps_files_empty_dirs_modes_and_symlinks(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    blob = pack(src)
    out, logs = tmp_path / "out", tmp_path / "logs"
    meta = artifact.extract(io.BytesIO(blob), out, logs_dir=logs, expected_key=KEY)
    assert meta["cache_key"] == KEY and meta["package"] == "web"
    for rel in ("dist/app.js", "dist/sub/data.bin", "dist/run.sh"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert (out / "dist" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "dist" / "app.js").stat().st_mode & 0o777 == 0o644
    assert (out / "dist" / "empty").is_dir() and not any((out / "dist" / "empty").iterdir())
    assert os.readlink(out / "dist" / "latest") == "app.js"
    assert os.readlink(out / "dist" / "sublink") == "../dist/sub"
    assert (logs / "output.log").read_bytes() == b"log line\n"
    assert meta["files"]["dist/empty"] == {"type": "dir", "mode": 0o755}
    assert "dist/sub" not in meta["files"]  # implied by the file in it


def test_manifest_lists_hashes_and_read_metadata_reads_only_the_head(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    meta = artifact.read_metadata(io.BytesIO(pack(src)))
    assert meta["files"]["dist/app.js"] == {"sha256": sha(b"console.log(1)\n"), "size": 15, "mode": 0o644}
    assert meta["symlinks"] == {"dist/latest": "app.js", "dist/sublink": "../dist/sub"}
    assert meta["logs"]["output.log"]["size"] == len(b"log line\n")


def test_first_member_is_the_metadata_and_members_are_sorted(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    import zstandard

    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(pack(src))).read()
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names[0] == "polykit-artifact.json"
    assert names[-1] == "logs/output.log"
    outputs = names[1:-1]
    assert outputs == sorted(outputs)


def test_pack_refuses_a_symlink_that_leaves_the_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("/etc/passwd", src / "abs")
    os.symlink("../../outside", src / "up")
    for name in ("abs", "up"):
        with pytest.raises(ArtifactError) as err:
            pack(src, [name])
        assert err.value.reason == "unsafe_link"


def test_pack_refuses_a_fifo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(ArtifactError, match="not a file"):
        pack(src, ["pipe"])


def test_extract_refuses_a_non_empty_destination(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("x")
    with pytest.raises(FileExistsError):
        artifact.extract(io.BytesIO(pack(src)), out)


def test_a_hand_built_valid_artifact_verifies():
    blob = craft({"a.txt": b"hello"}, symlinks={"b": "a.txt"}, log=b"out")
    meta = artifact.verify_stream(io.BytesIO(blob), expected_key=KEY)
    assert meta["files"]["a.txt"]["size"] == 5


BAD = {
    "not zstd": (b"this is not zstd at all", "bad_zstd"),
    "zstd but not tar": (zst(b"x" * 5000), "bad_tar"),
    "tar without metadata": (zst(raw_tar([member("outputs/a.txt", b"hello")])), "bad_metadata"),
    "metadata not json": (zst(raw_tar([member("polykit-artifact.json", b"{nope")])), "bad_metadata"),
    "metadata names another key": (craft({"a.txt": b"hi"}, meta=manifest({"a.txt": b"hi"}, key=OTHER_KEY)), "key_mismatch"),
    "member not in manifest": (craft({"a.txt": b"hi"}, extra=[member("outputs/extra.txt", b"sneaky")]), "unlisted_member"),
    "member outside outputs": (craft({"a.txt": b"hi"}, extra=[member("evil.txt", b"x")]), "unlisted_member"),
    "member missing": (craft({"a.txt": b"hi"}, drop=("outputs/a.txt",)), "missing_member"),
    "duplicate member": (craft({"a.txt": b"hi"}, extra=[member("outputs/a.txt", b"hi")]), "unlisted_member"),
    "hash differs": (craft({"a.txt": b"hi"}, meta=manifest({"a.txt": b"ho"})), "hash_mismatch"),
    "size differs": (craft({"a.txt": b"hi"}, meta=manifest({"a.txt": b"hi!"})), "size_mismatch"),
    "absolute path in manifest": (craft({"a": b"x"}, meta=manifest({"/etc/passwd": b"x"})), "unsafe_path"),
    "absolute member name": (craft({"a": b"x"}, extra=[member("/etc/passwd", b"x")]), "unsafe_path"),
    "dot-dot in manifest": (craft({"a": b"x"}, meta=manifest({"../escape": b"x"})), "unsafe_path"),
    "dot-dot member name": (craft({"a": b"x"}, extra=[member("outputs/../../escape", b"x")]), "unsafe_path"),
    "symlink leaving the tree": (craft({}, symlinks={"link": "../../etc"}), "unsafe_link"),
    "absolute symlink": (craft({}, symlinks={"link": "/etc/passwd"}), "unsafe_link"),
    "symlink climbing after a name": (craft({}, symlinks={"d/link": "x/../../.."}), "unsafe_link"),
    "file under a symlink": (
        craft({"link/x": b"1"}, symlinks={"link": "."}, meta=manifest({"link/x": b"1"}, symlinks={"link": "."})),
        "path_conflict",
    ),
    "device file": (
        craft({"dev": b""}, drop=("outputs/dev",), extra=[member("outputs/dev", kind=tarfile.CHRTYPE)]),
        "bad_member_type",
    ),
    "fifo": (craft({"p": b""}, drop=("outputs/p",), extra=[member("outputs/p", kind=tarfile.FIFOTYPE)]), "bad_member_type"),
    "hard link": (
        craft({"h": b""}, drop=("outputs/h",), extra=[member("outputs/h", kind=tarfile.LNKTYPE, linkname="outputs/a")]),
        "bad_member_type",
    ),
    "symlink member where a file is listed": (
        craft({"f": b""}, drop=("outputs/f",), extra=[member("outputs/f", kind=tarfile.SYMTYPE, linkname="x")]),
        "type_mismatch",
    ),
    "mode differs": (
        craft({"f": b"1"}, drop=("outputs/f",), extra=[member("outputs/f", b"1", mode=0o4755)]),
        "mode_mismatch",
    ),
    "manifest declares a bomb": (
        craft({"a": b"x"}, meta={**manifest({"a": b"x"}), "files": {"a": {"sha256": sha(b"x"), "size": 1 << 50, "mode": 0o644}}}),
        "unpacked_too_large",
    ),
    "garbage after the zstd frame": (craft({"a": b"x"}) + b"garbage!", "bad_zstd"),
    "data after the tar archive": (
        zst(raw_tar([member("polykit-artifact.json", __import__("json").dumps(manifest({})).encode()),
                     member("logs/output.log", b"")]) + b"\x01" * 600),
        "trailing_data",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_artifacts_are_refused(case):
    blob, reason = BAD[case]
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(blob), expected_key=KEY)
    assert err.value.reason == reason, str(err.value)


@pytest.mark.parametrize("cut", [0.5, -5, -1])
def test_a_truncated_stream_is_refused(cut):
    blob = craft({"a.txt": os.urandom(50_000)})
    end = int(len(blob) * cut) if isinstance(cut, float) else len(blob) + cut
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(blob[:end]), expected_key=KEY)
    assert err.value.reason in ("bad_zstd", "bad_tar", "size_mismatch")


def test_a_small_stream_that_expands_past_the_bound_is_stopped():
    # The manifest is honest and tiny, but the stream carries 200 MiB of padding: the
    # decompressed bytes are counted, so the bound holds whatever the manifest claims.
    import json

    tar = raw_tar([member("polykit-artifact.json", json.dumps(manifest({})).encode()), member("logs/output.log", b"")])
    bomb = zst(tar + b"\0" * (200 << 20), level=19)
    assert len(bomb) < 64 * 1024
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(bomb), expected_key=KEY, limits=Limits(max_unpacked_size=1 << 20))
    assert err.value.reason == "unpacked_too_large"


def test_a_window_over_the_limit_is_refused():
    import zstandard

    # Streamed without a content size, the frame header announces the full 128 MiB window.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(craft({"a": b"x"}))).read()
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as writer:
        writer.write(tar)
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(buf.getvalue()), expected_key=KEY, limits=Limits(max_window_log=20))
    assert err.value.reason == "bad_zstd"


def test_too_many_members_is_refused():
    files = {f"f{i}": b"" for i in range(20)}
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(craft(files)), limits=Limits(max_members=10))
    assert err.value.reason == "too_many_members"


def test_extract_of_a_bad_member_fails_before_anything_escapes(tmp_path):
    blob = craft({"a": b"x"}, extra=[member("outputs/../../escape", b"x")])
    with pytest.raises(ArtifactError):
        artifact.extract(io.BytesIO(blob), tmp_path / "out")
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_check_relpath_and_cache_keys():
    assert artifact.is_cache_key(KEY)
    for bad in ("", "AB" * 32, "ab" * 31, "g" * 64, "ab" * 32 + "\n"):
        assert not artifact.is_cache_key(bad)
    for bad in ("a//b", "./a", "a/.", "a\\b", "a\x00b", "/a"):
        with pytest.raises(ArtifactError):
            artifact.check_relpath(bad)
    assert artifact.check_relpath("a/b.c") == "a/b.c"
