"""The artifact format: determinism, round trips, and every way a bad artifact is refused."""

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from polykit_client import artifact
from polykit_client.artifact import ArtifactError, Limits
from polykit_client.nofollow import LinkInPath
from support import (
    KEY, OTHER_KEY, TAR_END, craft, header, manifest, member, pax_header, padded, raw_tar, sha, tar_member, zst,
)


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


# --- names one filesystem would merge -------------------------------------------------------

NFC, NFD = "caf\u00e9", "cafe\u0301"

MERGED_NAMES = {
    "two files differing by case": craft({"dist/App.js": b"1", "dist/app.js": b"2"}),
    "two files in NFC and NFD": craft({f"dist/{NFC}": b"1", f"dist/{NFD}": b"2"}),
    "a file and a symlink differing by case": craft({"dist/a": b"1"}, symlinks={"dist/A": "a2"}),
    "a file under a symlink differing by case": craft({"x/a/f": b"1"}, symlinks={"x/A": "."}),
    "a file under a file in NFD": craft({f"x/{NFC}": b"1", f"x/{NFD}/f": b"2"}),
    "a file under a symlink in NFC": craft({f"x/{NFD}/B/f": b"1"}, symlinks={f"x/{NFC}": ".."}),
    "a folder and a file differing by case": craft(
        {"d": b"1"}, meta={**manifest({"d": b"1"}), "files": {**manifest({"d": b"1"})["files"], "D": {"type": "dir"}}}
    ),
}


@pytest.mark.parametrize("case", sorted(MERGED_NAMES))
def test_names_that_differ_only_by_case_or_normalisation_are_refused(case, tmp_path):
    with pytest.raises(ArtifactError) as err:
        artifact.extract(io.BytesIO(MERGED_NAMES[case]), tmp_path / "out", logs_dir=tmp_path / "logs")
    assert err.value.reason == "path_conflict", str(err.value)
    assert not any((tmp_path / "out").iterdir())  # refused from the manifest, before any member


def test_fold_is_caseless_and_canonical():
    assert artifact.fold("Dist/APP.js") == artifact.fold("dist/app.js")
    assert artifact.fold(NFC) == artifact.fold(NFD) == artifact.fold("CAF\u00c9")
    assert artifact.fold("stra\u00dfe") == artifact.fold("STRASSE")
    assert artifact.fold("a") != artifact.fold("b")


def test_folders_that_differ_by_case_may_hold_different_files(tmp_path):
    # Not the same entry twice: on an insensitive filesystem both land in one folder.
    blob = craft({"A/x": b"1", "a/y": b"2"})
    artifact.extract(io.BytesIO(blob), tmp_path / "out", logs_dir=tmp_path / "logs", expected_key=KEY)
    assert (tmp_path / "out" / "A" / "x").read_bytes() == b"1"


# --- extraction never follows a link ----------------------------------------------------------


class WatchingSink(artifact.DirSink):
    """The real sink, checking before every file and folder it writes that no symlink exists yet."""

    def __init__(self, out: Path, logs: Path) -> None:
        super().__init__(out, logs)
        self.out = out
        self.writes = 0

    def _no_links_yet(self) -> None:
        assert not [p for p in self.out.rglob("*") if p.is_symlink()]
        self.writes += 1

    def open_file(self, name, mode):
        self._no_links_yet()
        return super().open_file(name, mode)

    def make_dir(self, name):
        self._no_links_yet()
        super().make_dir(name)


def test_symlinks_are_made_after_every_file_whatever_the_member_order(tmp_path):
    files, links = {"b/f": b"1", "z/g": b"2"}, {"a": "b", "b/l": "f", "y": "z/g"}
    meta = manifest(files, symlinks=links, dirs=("e",))
    members = [member("polykit-artifact.json", __import__("json").dumps(meta).encode())]
    members += [member("outputs/" + p, kind=tarfile.SYMTYPE, linkname=t, mode=0o777) for p, t in links.items()]
    members += [member("outputs/e", kind=tarfile.DIRTYPE, mode=0o755)]
    members += [member("outputs/" + p, d) for p, d in files.items()] + [member("logs/output.log", b"")]
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    sink = WatchingSink(out, logs)
    artifact.verify_stream(io.BytesIO(zst(raw_tar(members))), expected_key=KEY, sink=sink)
    assert sink.writes == 4  # two files, a folder and the log
    assert (out / "a").is_symlink() and (out / "a" / "f").read_bytes() == b"1"
    assert os.readlink(out / "y") == "z/g" and (out / "e").is_dir()


class SwapAfter:
    """A stream that swaps a folder of the extraction for a link to ``outside`` once ``after`` bytes are read."""

    def __init__(self, data: bytes, after: int, folder: Path, outside: Path) -> None:
        self._fh, self._after, self._folder, self._outside = io.BytesIO(data), after, folder, outside
        self.swapped = False

    def read(self, size=-1):
        data = self._fh.read(size if size and size > 0 else -1)
        if not self.swapped and self._fh.tell() >= self._after and self._folder.is_dir():
            self._folder.rename(self._folder.with_name("moved"))
            os.symlink(self._outside, self._folder)
            self.swapped = True
        return data


def test_a_folder_swapped_for_a_link_mid_restore_is_not_followed(tmp_path):
    big = os.urandom(3 << 20)  # incompressible, so the stream is read in several pieces
    blob = craft({"d/a.bin": big, "d/z.txt": b"late"})
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    stream = SwapAfter(blob, len(blob) // 2, out / "d", outside)
    with pytest.raises(ArtifactError) as err:
        artifact.extract(stream, out, logs_dir=tmp_path / "logs", expected_key=KEY)
    assert stream.swapped and err.value.reason == "unsafe_path"
    assert not any(outside.iterdir())


def test_place_moves_files_then_links_and_never_through_a_link_in_the_destination(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    staging, logs = tmp_path / "staging", tmp_path / "logs"
    meta = artifact.extract(io.BytesIO(pack(src)), staging, logs_dir=logs, expected_key=KEY)
    dest = tmp_path / "pkg"
    (dest / "dist" / "empty").mkdir(parents=True)
    (dest / "dist" / "latest").mkdir()  # a folder where the artifact has a link: replaced
    artifact.place(staging, dest, meta)
    assert (dest / "dist" / "sub" / "data.bin").read_bytes() == (src / "dist" / "sub" / "data.bin").read_bytes()
    assert os.readlink(dest / "dist" / "latest") == "app.js"
    assert (dest / "dist" / "sublink" / "data.bin").is_file()

    outside, other = tmp_path / "outside", tmp_path / "pkg2"
    outside.mkdir()
    other.mkdir()
    os.symlink(outside, other / "dist")
    staging2 = tmp_path / "staging2"
    meta = artifact.extract(io.BytesIO(pack(src)), staging2, logs_dir=tmp_path / "logs2", expected_key=KEY)
    with pytest.raises(LinkInPath, match="through the symlink"):
        artifact.place(staging2, other, meta)
    assert not any(outside.iterdir())


def test_place_copies_when_the_staging_folder_is_on_another_filesystem(tmp_path):
    # A cache_dir on another disk than the workspace: rename fails with EXDEV and place copies.
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    src = tmp_path / "src"
    make_tree(src)
    other_fs = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        meta = artifact.extract(io.BytesIO(pack(src)), other_fs / "outputs", logs_dir=other_fs / "logs", expected_key=KEY)
        dest = tmp_path / "pkg"
        (dest / "dist" / "latest").mkdir(parents=True)  # a folder where the artifact has a link
        (dest / "dist" / "app.js").write_text("stale\n")  # a file that is replaced
        artifact.place(other_fs / "outputs", dest, meta)
    finally:
        shutil.rmtree(other_fs)
    for rel in list(meta["files"]) + list(meta["symlinks"]):
        built, placed = src / rel, dest / rel
        if built.is_symlink():
            assert os.readlink(placed) == os.readlink(built), rel
        elif built.is_dir():
            assert placed.is_dir() and not placed.is_symlink() and not any(placed.iterdir()), rel
        else:
            assert placed.read_bytes() == built.read_bytes(), rel
            assert placed.stat().st_mode & 0o777 == artifact._file_mode(built.stat().st_mode), rel


# --- every byte checked, memory bounded -------------------------------------------------------


def _tar(*parts: bytes, meta: dict | None = None, files: dict | None = None) -> bytes:
    import json

    files = {"a.js": b"x"} if files is None else files
    blob = json.dumps(meta or manifest(files)).encode()
    return zst(tar_member("polykit-artifact.json", blob) + b"".join(parts))


def _sparse(name: str, realsize: int, stored: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = tarfile.GNUTYPE_SPARSE, len(stored), 0o644, 0
    head = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    head[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)
    head[398:410] = tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT)
    head[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    head[148:156] = b"        "
    head[148:156] = ("%06o\0 " % sum(head[:512])).encode()
    return bytes(head) + padded(stored)


LOG = tar_member("logs/output.log", b"")
A_JS = tar_member("outputs/a.js", b"x")

UNCHECKED = {
    "a PAX comment record": (_tar(pax_header({"comment": b"hidden" * 100}), A_JS, LOG, TAR_END), "bad_header"),
    "a PAX record on the manifest": (
        zst(pax_header({"comment": b"x"}) + tar_member("polykit-artifact.json", b"{}") + TAR_END), "bad_header"),
    "a PAX global header": (_tar(pax_header({"path": b"x"}, kind=tarfile.XGLTYPE), A_JS, LOG, TAR_END), "bad_member_type"),
    "GNU sparse records in PAX": (_tar(pax_header({"GNU.sparse.size": b"99"}), A_JS, LOG, TAR_END), "bad_header"),
    "a PAX size in superscript digits": (_tar(pax_header({"size": "\u00b2".encode()}), A_JS, LOG, TAR_END), "bad_header"),
    "a PAX size in Arabic-Indic digits": (_tar(pax_header({"size": "\u0661".encode()}), A_JS, LOG, TAR_END), "bad_header"),
    "a PAX size of 5,000 digits": (_tar(pax_header({"size": b"1" * 5000}), A_JS, LOG, TAR_END), "bad_header"),
    "a PAX header over the bound": (_tar(pax_header({"path": b"a" * 20_000}), A_JS, LOG, TAR_END), "header_too_large"),
    "a GNU long name": (
        _tar(header("././@LongLink", 13, kind=tarfile.GNUTYPE_LONGNAME) + padded(b"outputs/a.js\0"), A_JS, LOG, TAR_END),
        "bad_member_type"),
    "a sparse member hiding data after the archive": (
        _tar(LOG, _sparse("outputs/a.js", 1 << 20, b"x"), TAR_END, b"SMUGGLED" * 100, files={"a.js": b"x" + bytes((1 << 20) - 1)}),
        "bad_tar"),
    "non-zero padding after a member": (_tar(header("outputs/a.js", 1) + b"x" + b"hidden" + bytes(505), LOG, TAR_END), "bad_padding"),
    "non-zero padding after the manifest": (
        zst(header("polykit-artifact.json", 2) + b"{}" + b"!" + bytes(509) + TAR_END), "bad_padding"),
    "a member with an mtime": (_tar(header("outputs/a.js", 1, mtime=1_700_000_000) + padded(b"x"), LOG, TAR_END), "bad_header"),
    "a member with an owner name": (_tar(header("outputs/a.js", 1, uname="root") + padded(b"x"), LOG, TAR_END), "bad_header"),
    "a member with a uid": (_tar(header("outputs/a.js", 1, uid=1000) + padded(b"x"), LOG, TAR_END), "bad_header"),
    "a GNU-format header": (_tar(header("outputs/a.js", 1, fmt=tarfile.GNU_FORMAT) + padded(b"x"), LOG, TAR_END), "bad_tar"),
    "a symlink last, then data": (
        _tar(LOG, header("outputs/l", kind=tarfile.SYMTYPE, mode=0o777, linkname="a"), TAR_END, b"\x01" * 10,
             meta={**manifest({}), "symlinks": {"l": "a"}}),
        "trailing_data"),
    "a folder last, then data": (
        _tar(LOG, header("outputs/e/", kind=tarfile.DIRTYPE, mode=0o755), TAR_END, b"\x01",
             meta=manifest({}, dirs=("e",))),
        "trailing_data"),
    "a folder with a size": (
        _tar(LOG, header("outputs/e/", 512, kind=tarfile.DIRTYPE, mode=0o755) + bytes(512), TAR_END,
             meta=manifest({}, dirs=("e",))),
        "bad_header"),
    "a folder with another mode": (
        _tar(LOG, header("outputs/e/", kind=tarfile.DIRTYPE, mode=0o777), TAR_END, meta=manifest({}, dirs=("e",))),
        "mode_mismatch"),
    "a symlink with another mode": (
        _tar(LOG, header("outputs/l", kind=tarfile.SYMTYPE, mode=0o755, linkname="a"), TAR_END,
             meta={**manifest({}), "symlinks": {"l": "a"}}),
        "mode_mismatch"),
    "a manifest member with another mode": (
        zst(tar_member("polykit-artifact.json", __import__("json").dumps(manifest({})).encode(), mode=0o755) + LOG + TAR_END),
        "bad_metadata"),
    "a bad header checksum": (_tar(A_JS[:100] + b"\x07" + A_JS[101:], LOG, TAR_END), "bad_tar"),
    "data in the end-of-archive blocks": (_tar(A_JS, LOG, b"\0" * 700 + b"\x01" + b"\0" * 323), "trailing_data"),
}


@pytest.mark.parametrize("case", sorted(UNCHECKED))
def test_bytes_nothing_would_check_are_refused(case):
    blob, reason = UNCHECKED[case]
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(blob), expected_key=KEY)
    assert err.value.reason == reason, str(err.value)


def test_the_same_members_written_canonically_verify():
    # The control for the table above: headers exactly as the packer writes them pass.
    assert artifact.verify_stream(io.BytesIO(_tar(A_JS, LOG, TAR_END)), expected_key=KEY)["files"]["a.js"]["size"] == 1


def test_long_and_non_ascii_names_round_trip_through_pax_headers(tmp_path):
    long_dir = "d" * 150
    files = {f"{long_dir}/{'n' * 120}.js": b"long", f"dist/{NFC}.txt": b"accent", "dist/\u65e5\u672c.txt": b"cjk"}
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    (src / "dist" / ("l" * 110)).symlink_to("../" + long_dir)
    blob = pack(src, paths=("dist", long_dir))
    out = tmp_path / "out"
    artifact.extract(io.BytesIO(blob), out, logs_dir=tmp_path / "logs", expected_key=KEY)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert os.readlink(out / "dist" / ("l" * 110)) == "../" + long_dir


def test_an_extended_header_is_bounded_before_it_is_read(tmp_path):
    # 256 MiB of PAX record in a few KiB of zstd, after a valid manifest: refused from the
    # header's size field, so no side ever holds it (measured in a fresh process: VmHWM).
    import json
    import subprocess
    import sys

    import zstandard

    co = zstandard.ZstdCompressor(level=3).compressobj()
    record = 256 << 20
    head = tar_member("polykit-artifact.json", json.dumps(manifest({"a.js": b"x"})).encode())
    head += header("././@PaxHeader", record + 20, kind=tarfile.XHDTYPE) + b"%d comment=" % (record + 20)
    parts = [co.compress(head)] + [co.compress(b"A" * (1 << 20)) for _ in range(record >> 20)] + [co.flush()]
    path = tmp_path / "bomb.zst"
    path.write_bytes(b"".join(parts))
    assert path.stat().st_size < 64 * 1024
    code = (
        "import sys\n"
        "from polykit_client import artifact\n"
        "try:\n"
        "    artifact.verify_stream(open(sys.argv[1], 'rb'), limits=artifact.Limits(max_unpacked_size=1 << 40))\n"
        "except artifact.ArtifactError as exc:\n"
        "    peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "    print(exc.reason, peak)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    reason, peak_kib = out.stdout.split()
    assert reason == "header_too_large" and int(peak_kib) < 100 * 1024


MANIFESTS = {
    "nested 100,000 deep": b"[" * 100_000,
    "nested in an extra field": b'{"format": 1, "extra": ' + b"[" * 50 + b"]" * 50 + b"}",
    "too many objects": b"[" + b",".join([b"{}"] * 300) + b"]",
    "over the byte bound": b'{"pad": "' + b" " * 5000 + b'"}',
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_manifest_is_bounded_in_bytes_objects_and_depth(case):
    blob = zst(tar_member("polykit-artifact.json", MANIFESTS[case]) + TAR_END)
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(blob), limits=Limits(max_members=200, max_metadata_size=4096))
    assert err.value.reason == "bad_metadata"


ESCAPED_QUOTES = [b'"' + b'\\"' * 1000, b'"' + b'\\"' * 1000 + b"\\", b'"' + b'a\\\n' * 1000, b'"' + b"x" * 1000]


@pytest.mark.parametrize("text", ESCAPED_QUOTES, ids=["escaped quotes", "a final backslash", "escaped newlines", "unterminated"])
def test_the_strings_of_a_manifest_are_skipped_in_one_pass(text):
    # A string pattern that could fail at a quote is tried again from each later quote: quadratic
    # (an 80 KB manifest of escaped quotes took half a minute, 8 MiB would take days). Every
    # attempt must match, running to the end of the input when the string never closes.
    from polykit_client.artifact import _JSON_STRING

    assert _JSON_STRING.match(text).end() == len(text)


def test_a_manifest_of_escaped_quotes_is_refused_as_invalid_json():
    data = b'{"a": "' + b'\\"' * 200_000
    blob = zst(tar_member("polykit-artifact.json", data) + TAR_END)
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(blob))
    assert err.value.reason == "bad_metadata" and "not valid JSON" in str(err.value)


def test_brackets_inside_names_count_neither_as_nesting_nor_as_entries():
    files = {"pages/[slug]/{id}.js": b"1", "pages/[[[[[[[[[[...all]].js": b"2", "a\"[{[{": b"3"}
    files.update({f"p/[{i}]/[[x]].js": b"" for i in range(20)})
    meta = artifact.verify_stream(io.BytesIO(craft(files)), expected_key=KEY, limits=Limits(max_members=30))
    assert meta["files"].keys() == files.keys()


@pytest.mark.parametrize("logs", [{}, {"output.log": None, "other.log": None}, {"other.log": None}])
def test_the_log_member_is_required_and_alone(logs):
    meta = manifest({"a": b"1"})
    entry = meta["logs"]["output.log"]
    meta["logs"] = {name: entry for name in logs}
    with pytest.raises(ArtifactError) as err:
        artifact.verify_stream(io.BytesIO(craft({"a": b"1"}, meta=meta)), expected_key=KEY)
    assert err.value.reason == "bad_metadata" and "output.log" in str(err.value)


# --- on a real case-insensitive filesystem ----------------------------------------------------


@pytest.fixture
def insensitive_dir(tmp_path):
    """A folder on a case- and normalisation-insensitive FUSE mount (root, /dev/fuse, libfuse2, fusepy)."""
    import shutil
    import subprocess
    import sys
    import time

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("a FUSE mount needs root and /dev/fuse")
    probe = subprocess.run([sys.executable, "-c", "import fuse"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("fusepy or libfuse2 is not installed")
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("insensitive_fs.py")), str(back), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.ismount(mnt) or proc.poll() is not None:
                break
            time.sleep(0.05)
        if not os.path.ismount(mnt):
            pytest.skip("the FUSE filesystem could not be mounted here")
        (mnt / "Probe").mkdir()
        assert (mnt / "probe").is_dir() and (mnt / "PROBE").is_dir()
        (mnt / "Probe").rmdir()
        yield mnt
    finally:
        if os.path.ismount(mnt):
            tool = ["fusermount", "-u"] if shutil.which("fusermount") else ["umount", "-l"]
            subprocess.run([*tool, str(mnt)], capture_output=True)
        proc.terminate()
        proc.wait(10)


def escape_artifact() -> bytes:
    """``x/A`` a link to the top, ``x/a/B`` a link climbing further, and a file written through both."""
    x = "a1/a2/a3/a4/a5"
    links = {f"{x}/A": "../../../../..", f"{x}/a/B": "../../../../.."}
    path = f"{x}/a/b/.git/hooks/post-checkout"
    return craft({path: b"#!/bin/sh\n"}, symlinks=links)


def test_on_an_insensitive_mount_a_link_beside_a_folder_of_its_name_cannot_escape(insensitive_dir):
    staging = insensitive_dir / "ws" / "cache" / "restore"
    with pytest.raises(ArtifactError) as err:
        artifact.extract(io.BytesIO(escape_artifact()), staging / "outputs", logs_dir=staging / "logs", expected_key=KEY)
    assert err.value.reason == "path_conflict"
    written = [p for p in (insensitive_dir / "ws").rglob("*") if not p.is_dir()]
    assert written == []


def test_on_an_insensitive_mount_the_walk_never_passes_a_link_under_another_spelling(insensitive_dir, tmp_path):
    from polykit_client import nofollow

    outside = tmp_path / "outside"
    outside.mkdir()
    root = insensitive_dir / "root"
    root.mkdir()
    os.symlink(outside, root / "A")
    os.symlink(outside, root / NFC)
    for rel in ("a/x", f"{NFD}/x", "A/x"):
        with pytest.raises(nofollow.LinkInPath):
            nofollow.create_file(root, rel, 0o644)
    (root / "F").write_bytes(b"")
    with pytest.raises(FileExistsError):
        nofollow.create_file(root, "f", 0o644)  # O_EXCL: the second spelling is the same file
    assert not any(outside.iterdir())


def test_on_an_insensitive_mount_a_restore_round_trips(insensitive_dir, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    staging, pkg = insensitive_dir / "staging", insensitive_dir / "pkg"
    meta = artifact.extract(io.BytesIO(pack(src)), staging / "outputs", logs_dir=staging / "logs", expected_key=KEY)
    pkg.mkdir()
    artifact.place(staging / "outputs", pkg, meta)
    assert (pkg / "dist" / "sub" / "data.bin").read_bytes() == (src / "dist" / "sub" / "data.bin").read_bytes()
    assert os.readlink(pkg / "DIST" / "latest") == "app.js"


@pytest.mark.parametrize("hold", [1 << 20, 0])  # verified into memory, or into a staging folder
def test_on_an_insensitive_mount_a_restore_from_memory_or_staging_round_trips(insensitive_dir, tmp_path, hold):
    from polykit_client import restore

    src = tmp_path / "src"
    make_tree(src)
    (tmp_path / "artifact.zst").write_bytes(pack(src))
    (insensitive_dir / "tmp").mkdir()
    staged = restore.stage(tmp_path / "artifact.zst", KEY, Limits(), insensitive_dir / "tmp", hold=hold)
    pkg = insensitive_dir / "pkg"
    pkg.mkdir()
    staged.place(pkg)
    staged.release()
    assert (pkg / "dist" / "sub" / "data.bin").read_bytes() == (src / "dist" / "sub" / "data.bin").read_bytes()
    assert os.readlink(pkg / "DIST" / "latest") == "app.js"


def test_on_an_insensitive_mount_a_restore_from_memory_replaces_no_entry_spelled_otherwise(insensitive_dir):
    # The manifest check refuses such names first; were a filesystem to merge names it does not
    # compare, the second entry must not silently replace the first (or the folder holding it).
    from polykit_client import restore

    for files, refusal in (({"dist/A": (0o644, b"1"), "dist/a": (0o644, b"2")}, ArtifactError),
                           ({"dist/X": (0o644, b"1"), "dist/x/f": (0o644, b"2")}, LinkInPath)):
        pkg = insensitive_dir / f"pkg-{len(os.listdir(insensitive_dir))}"
        pkg.mkdir()
        with pytest.raises(refusal):
            restore.write_tree(pkg, files, {})
        assert os.listdir(pkg / "dist") == [sorted(files)[0][5:]] and (pkg / sorted(files)[0]).read_bytes() == b"1"
    pkg = insensitive_dir / "pkg-old"
    (pkg / "dist").mkdir(parents=True)
    (pkg / "dist" / "Old").write_text("left by an earlier build")
    restore.write_tree(pkg, {"dist/Old": (0o644, b"new")}, {})  # the same spelling is replaced
    assert (pkg / "dist" / "Old").read_bytes() == b"new"
    with pytest.raises(ArtifactError) as err:
        restore.write_tree(pkg, {"dist/old": (0o644, b"newer")}, {})
    assert err.value.reason == "path_conflict" and (pkg / "dist" / "Old").read_bytes() == b"new"


def test_pack_refuses_outputs_no_verifier_would_accept(tmp_path):
    src = tmp_path / "src"
    (src / "dist").mkdir(parents=True)
    (src / "dist" / "App.js").write_text("1")
    (src / "dist" / "app.js").write_text("2")
    with pytest.raises(ArtifactError) as err:
        pack(src)
    assert err.value.reason == "path_conflict"
    (src / "dist" / "App.js").unlink()
    for i in range(12):
        (src / "dist" / f"f{i}").write_text("")
    with pytest.raises(ArtifactError) as err:
        artifact.pack(io.BytesIO(), src, ["dist"], {}, cache_key=KEY, limits=Limits(max_members=10))
    assert err.value.reason == "too_many_members"


@pytest.mark.parametrize("where", ["file name", "folder name", "link target"])
def test_pack_refuses_names_that_are_not_utf8_before_writing(tmp_path, where):
    # os.listdir gives such names as surrogates; tarfile would write them under PAX
    # hdrcharset=BINARY, an artifact no verifier (server or client) accepts.
    dist = os.fsencode(tmp_path / "dist")
    os.makedirs(dist)
    if where == "file name":
        open(os.path.join(dist, b"caf\xe9.js"), "wb").close()
    elif where == "folder name":
        os.makedirs(os.path.join(dist, b"\xff", b"a"))
    else:
        os.symlink(b"caf\xe9.js", os.path.join(dist, b"link"))
    out = io.BytesIO()
    with pytest.raises(ArtifactError) as err:
        artifact.pack(out, tmp_path, ["dist"], {}, cache_key=KEY)
    assert err.value.reason in ("unsafe_path", "unsafe_link") and "not valid UTF-8" in str(err.value)
    assert out.getvalue() == b""


def test_the_header_layout_is_pinned_so_artifacts_verify_across_python_versions():
    # The verifier compares headers byte for byte with what the packer writes, and a client
    # on one Python uploads to a server on another: the bytes must not drift (3.11-3.13 agree).
    import hashlib

    from polykit_client.tarstream import header

    members = [("outputs/a.js", tarfile.REGTYPE, 0o644, 5), ("outputs/" + "d" * 150 + "/x", tarfile.REGTYPE, 0o755, 9),
               (f"outputs/{NFC}", tarfile.REGTYPE, 0o644, 1), ("outputs/e", tarfile.DIRTYPE, 0o755),
               ("outputs/l", tarfile.SYMTYPE, 0o777, 0, "../" + "x" * 120), ("outputs/big", tarfile.REGTYPE, 0o644, 9 << 30)]
    digest = hashlib.sha256(b"".join(header(*m) for m in members)).hexdigest()
    assert digest.startswith("77d9ec8e5dcb5982")


@pytest.mark.parametrize("name, kind, mode, size, target", [
    ("polykit-artifact.json", tarfile.REGTYPE, 0o644, 1234, ""),
    ("n" * 100, tarfile.REGTYPE, 0o644, 0, ""),  # the longest name of a plain ustar header
    ("n" * 101, tarfile.REGTYPE, 0o644, 0, ""),  # a PAX path
    ("d" * 99, tarfile.DIRTYPE, 0o755, 0, ""),  # 100 with its "/"
    ("d" * 100, tarfile.DIRTYPE, 0o755, 0, ""),  # 101 with its "/": a PAX path
    ("dir/", tarfile.DIRTYPE, 0o755, 0, ""),
    ("café.txt", tarfile.REGTYPE, 0o644, 5, ""),  # non-ASCII: a PAX path
    ("link", tarfile.SYMTYPE, 0o777, 0, "t" * 100),
    ("link", tarfile.SYMTYPE, 0o777, 0, "t" * 101),  # a PAX linkpath
    ("link", tarfile.SYMTYPE, 0o777, 0, "naïve"),
    ("big", tarfile.REGTYPE, 0o755, 8 ** 11 - 1, ""),
    ("huge", tarfile.REGTYPE, 0o755, 8 ** 11, ""),  # a PAX size
    ("modes", tarfile.REGTYPE, 0o107777, 7, ""),
])
def test_the_headers_the_packer_and_the_verifier_expect_are_what_tarfile_writes(name, kind, mode, size, target):
    """tarstream builds plain ustar headers itself (faster than tarfile); they must be tarfile's bytes."""
    from polykit_client import tarstream

    expected = tarstream.member_info(name, kind, mode & 0o7777, size, target).tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    assert tarstream.header(name, kind, mode & 0o7777, size, target) == expected


def test_decompression_contexts_are_reused_but_never_shared_by_two_open_readers():
    import io

    from polykit_client.zstd import DecompressingReader, ZstdError

    data = [zst(bytes([i]) * 10_000) for i in range(3)]
    first = DecompressingReader(io.BytesIO(data[0]))
    second = DecompressingReader(io.BytesIO(data[1]))  # while the first is open: a context of its own
    assert first.read(5000) == b"\0" * 5000
    assert second.read() == b"\1" * 10_000 and second.read() == b""
    assert first.read() == b"\0" * 5000 and first.read() == b""
    third = DecompressingReader(io.BytesIO(data[2]))  # reuses a released context
    assert third.read() == b"\2" * 10_000
    cut = DecompressingReader(io.BytesIO(data[0][:-3]))
    with pytest.raises(ZstdError):
        while cut.read(1000):  # a cut stream is still refused
            pass
    assert DecompressingReader(io.BytesIO(data[1])).read() == b"\1" * 10_000
