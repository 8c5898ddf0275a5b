"""The artifact format (a zstd-compressed POSIX tar with a JSON manifest first): pack, verify, extract.

Both sides use this module: the client packs outputs and restores them, the server verifies an
upload before it stores it, with the same rules and the same bounds. Verification and
extraction are one pass over the stream, so neither side holds an artifact in memory, and
nothing is trusted that the manifest does not vouch for: the tar layer (:mod:`tarstream`)
compares every header byte with what :func:`pack` writes and bounds extended headers before
reading them; the manifest is bounded in bytes, entries and nesting before it is parsed; names
are compared case-folded and normalised (:func:`fold`). We never call ``tarfile``'s own
extraction: members are written through :mod:`nofollow`, which opens every path component
relative to its parent with ``O_NOFOLLOW``, and symlinks are made last (the tar filter
bypasses of CVE-2025-4517 and friends do not apply).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Protocol

from . import nofollow, zstd
from .nofollow import LinkInPath
from .tarstream import Member, TarFormatError, TarReader, TarWriter

FORMAT = 1
METADATA_NAME = "polykit-artifact.json"
OUTPUTS_PREFIX = "outputs/"
LOGS_PREFIX = "logs/"
LOG_NAME = "output.log"
FILE_MODES = (0o644, 0o755)
DIR_MODE = 0o755
LINK_MODE = 0o777
CHUNK = 1024 * 1024
DEFAULT_MAX_ARTIFACT_SIZE = 1 << 30  # the server's default limit; the client's default download bound
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INPUT_DIGEST = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
# The key components a manifest may carry (see components.py), as canonical JSON: the server keeps
# them for every package's task, so they are bounded apart from the rest of the manifest.
MAX_COMPONENTS = 512 * 1024


class ArtifactError(ValueError):
    """An artifact is malformed or unsafe; ``reason`` is a machine word for metrics and errors."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Bounds on what one artifact may unpack to: the decompression-bomb and tar-bomb guards.

    The defaults are the server's, and the client's too, so both sides accept the same
    artifacts. Together with the fixed bounds of :mod:`tarstream` (a PAX header) and
    ``MAX_MANIFEST_DEPTH`` they keep the memory of one verification a constant.
    """

    max_unpacked_size: int = 64 << 30
    max_members: int = 200_000  # tar members, and objects in the manifest
    max_metadata_size: int = 8 << 20  # bytes of manifest JSON
    max_window_log: int = zstd.MAX_WINDOW_LOG


def is_cache_key(key: str) -> bool:
    """A cache key is a SHA-256: exactly 64 lowercase hex characters."""
    return len(key) == 64 and _HEX64.fullmatch(key) is not None


def check_relpath(path: object, what: str = "path") -> str:
    """Refuse anything but a plain relative posix path that stays inside its folder."""
    if not isinstance(path, str) or not path:
        raise ArtifactError("unsafe_path", f"{what} must be a non-empty string")
    if len(path) > 4096 or "\x00" in path or "\\" in path:
        raise ArtifactError("unsafe_path", f"{what} {path!r} has a forbidden character or length")
    _check_utf8(path, what)
    if path.startswith("/"):
        raise ArtifactError("unsafe_path", f"{what} {path!r} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ArtifactError("unsafe_path", f"{what} {path!r} is not a normalised relative path")
    return path


def _check_utf8(text: str, what: str) -> None:
    """Names travel as UTF-8 (the manifest, PAX records): a name the filesystem gave us as bytes
    that are not UTF-8 (``os.listdir`` hands them over as surrogates) cannot be carried, and a
    tar writer would fall back to PAX ``hdrcharset=BINARY``, which no verifier accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ArtifactError("unsafe_path", f"{what} {text!r} is not valid UTF-8") from None


def check_symlink(path: str, target: object) -> str:
    """A link target is relative, climbs only at its start, and never above the package root.

    Allowing ``..`` only as leading components means the link resolves through real folders
    (no entry may sit under a symlink), so a chain of links cannot climb out either.
    """
    if not isinstance(target, str) or not target or len(target) > 4096 or "\x00" in target or "\\" in target:
        raise ArtifactError("unsafe_link", f"symlink {path!r} has an invalid target")
    if target.startswith("/"):
        raise ArtifactError("unsafe_link", f"symlink {path!r} points to an absolute path")
    _check_utf8(target, f"the target of symlink {path!r}")
    parts = target.split("/")
    climbs = 0
    while climbs < len(parts) and parts[climbs] == "..":
        climbs += 1
    rest = parts[climbs:]
    if "" in rest or ".." in rest or climbs > path.count("/"):
        raise ArtifactError("unsafe_link", f"symlink {path!r} -> {target!r} leaves the package")
    return target


def _check_file_entry(path: str, entry: object, modes: tuple[int, ...]) -> None:
    if not isinstance(entry, dict):
        raise ArtifactError("bad_metadata", f"entry {path!r} must be an object")
    sha, size, mode = entry.get("sha256"), entry.get("size"), entry.get("mode", 0o644)
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise ArtifactError("bad_metadata", f"entry {path!r} has no valid sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ArtifactError("bad_metadata", f"entry {path!r} has no valid size")
    if mode not in modes:
        raise ArtifactError("bad_metadata", f"entry {path!r} has mode {mode!r}, not one of {modes}")


def fold(path: str) -> str:
    """The spelling two filesystems could both take for ``path``: case-folded, canonically decomposed.

    macOS (APFS, HFS+), Windows, vfat and ext4 with casefold treat ``A``/``a`` and ``é`` in
    NFC/NFD as one name; comparing folded names makes the manifest rules hold on all of them
    (canonical caseless matching, The Unicode Standard §3.13, D145: NFD(casefold(NFD(x)))).
    """
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def _check_layout(kinds: dict[str, str]) -> None:
    """No two entries for one path and nothing under a file or a symlink, comparing folded names.

    On a case- or normalisation-insensitive filesystem ``x/A`` (a link) and ``x/a/f`` (a file)
    meet: the file would be written through the link. Refusing such names in the manifest,
    on the server and on every client alike, keeps an artifact's meaning the same everywhere.
    """
    folded: dict[str, tuple[str, str]] = {}
    for path, kind in kinds.items():
        other = folded.setdefault(fold(path), (path, kind))
        if other[0] != path:
            raise ArtifactError("path_conflict", f"{path!r} and {other[0]!r} are one path on a case-insensitive filesystem")
    checked: set[str] = set()  # folders whose whole chain of parents is known to be clear
    for path in kinds:
        parent = path.rpartition("/")[0]
        while parent and parent not in checked:
            above = folded.get(fold(parent))
            if above is not None and above[1] in ("file", "symlink"):
                raise ArtifactError("path_conflict", f"{path!r} lies under the {above[1]} {above[0]!r}")
            checked.add(parent)
            parent = parent.rpartition("/")[0]


def _bad_components(what: str) -> ArtifactError:
    return ArtifactError("bad_metadata", f"metadata field 'components': {what}")


def _check_map(value: object, what: str, values: str) -> dict:
    """A JSON object of strings to 64-hex digests ("digest"), to digests and nulls ("digest-or-null"),
    or to input digests ("input": a file's git blob id, 40 hex, or a folder's SHA-256, see cachekey.py)."""
    if not isinstance(value, dict):
        raise _bad_components(f"{what} must be an object")
    pattern = _INPUT_DIGEST if values == "input" else _HEX64
    for name, digest in value.items():
        if not isinstance(name, str) or not name:
            raise _bad_components(f"{what} has an empty name")
        if not (isinstance(digest, str) and pattern.fullmatch(digest) or digest is None and values == "digest-or-null"):
            raise _bad_components(f"{what} {name!r} must be a " + ("blob id or " if values == "input" else "") + "SHA-256 in hex")
    return value


def check_components(value: object) -> None:
    """The key components of a manifest: the shape ``components.for_manifest`` writes, within ``MAX_COMPONENTS``.

    Environment values are never carried, only their SHA-256, and everything is bounded here
    because the server indexes the components of every package's newest artifact.
    """
    if not isinstance(value, dict):
        raise _bad_components("must be an object")
    allowed = {"format", "package", "task", "command", "env", "inputs", "inputs_digest", "dependencies",
               "toolchain", "outputs"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _bad_components(f"unknown entry {unknown[0][:40]!r}")
    for name in ("format", "task", "command"):
        if not isinstance(value.get(name), str):
            raise _bad_components(f"{name} must be a string")
    package = value.get("package")
    if not (isinstance(package, dict) and set(package) == {"name", "path"}
            and all(isinstance(v, str) for v in package.values())):
        raise _bad_components("package must be an object of name and path")
    _check_map(value.get("env"), "env", "digest-or-null")
    _check_map(value.get("dependencies"), "dependencies", "digest")
    if "inputs" in value:
        _check_map(value["inputs"], "inputs", "input")
    elif not (isinstance(value.get("inputs_digest"), str) and _HEX64.fullmatch(value["inputs_digest"])):
        raise _bad_components("needs inputs or an inputs_digest")
    toolchain = value.get("toolchain")
    if not (isinstance(toolchain, dict) and set(toolchain) == {"language", "version"}
            and isinstance(toolchain["version"], str) and isinstance(toolchain["language"], (str, type(None)))):
        raise _bad_components("toolchain must be an object of language and version")
    outputs = value.get("outputs")
    if not (outputs is None or isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise _bad_components("outputs must be a list of strings or null")
    size = len(json.dumps(value, sort_keys=True, separators=(",", ":")))
    if size > MAX_COMPONENTS:
        raise _bad_components(f"{size} bytes, over {MAX_COMPONENTS}")


def check_manifest(meta: object, expected_key: str | None, limits: Limits) -> dict[str, tuple]:
    """Validate a manifest; return the tar members it promises, by member name."""
    if not isinstance(meta, dict):
        raise ArtifactError("bad_metadata", "metadata must be a JSON object")
    if meta.get("format") != FORMAT:
        raise ArtifactError("bad_metadata", f"unsupported artifact format {meta.get('format')!r}")
    key = meta.get("cache_key")
    if not isinstance(key, str) or not is_cache_key(key):
        raise ArtifactError("bad_metadata", "metadata has no valid cache_key")
    if expected_key is not None and key != expected_key:
        raise ArtifactError("key_mismatch", f"metadata names cache key {key}, not {expected_key}")
    for field in ("files", "symlinks", "logs"):
        if not isinstance(meta.get(field), dict):
            raise ArtifactError("bad_metadata", f"metadata field {field!r} must be an object")
    for field in ("package", "task", "command"):
        if field in meta and not isinstance(meta[field], str):
            raise ArtifactError("bad_metadata", f"metadata field {field!r} must be a string")
    for field in ("created_at", "duration_ms", "exit_code"):
        if field in meta and (not isinstance(meta[field], int) or isinstance(meta[field], bool)):
            raise ArtifactError("bad_metadata", f"metadata field {field!r} must be an integer")
    if "components" in meta:
        check_components(meta["components"])
    # The log is part of the format (it is replayed on every hit): an artifact without it is
    # refused here, on the server and on the client alike, never half used.
    if list(meta["logs"]) != [LOG_NAME]:
        raise ArtifactError("bad_metadata", f"metadata must list exactly one log, {LOG_NAME!r}")

    members: dict[str, tuple] = {}
    kinds: dict[str, str] = {}
    declared = 0
    for path, entry in meta["files"].items():
        check_relpath(path)
        if isinstance(entry, dict) and entry.get("type") == "dir":
            if entry.get("mode", DIR_MODE) != DIR_MODE:
                raise ArtifactError("bad_metadata", f"directory {path!r} must have mode 0o755")
            members[OUTPUTS_PREFIX + path] = ("dir", DIR_MODE)
            kinds[path] = "dir"
            continue
        _check_file_entry(path, entry, FILE_MODES)
        members[OUTPUTS_PREFIX + path] = ("file", entry["sha256"], entry["size"], entry.get("mode", 0o644))
        kinds[path] = "file"
        declared += entry["size"]
    for path, target in meta["symlinks"].items():
        check_relpath(path)
        check_symlink(path, target)
        if path in kinds:
            raise ArtifactError("path_conflict", f"{path!r} is listed both as a file and a symlink")
        members[OUTPUTS_PREFIX + path] = ("symlink", target)
        kinds[path] = "symlink"
    entry = meta["logs"][LOG_NAME]
    _check_file_entry(LOG_NAME, entry, (0o644,))
    members[LOGS_PREFIX + LOG_NAME] = ("file", entry["sha256"], entry["size"], 0o644)
    declared += entry["size"]
    if len(members) + 1 > limits.max_members:
        raise ArtifactError("too_many_members", f"artifact lists {len(members)} members, over {limits.max_members}")
    _check_layout(kinds)
    if declared > limits.max_unpacked_size:
        raise ArtifactError(
            "unpacked_too_large",
            f"metadata declares {declared} bytes unpacked, over the limit of {limits.max_unpacked_size}",
        )
    return members


class Sink(Protocol):
    """Where verified members go; extraction writes them to disk, verification drops them."""

    def begin(self, meta: dict) -> None: ...
    def open_file(self, name: str, mode: int) -> BinaryIO: ...
    def make_dir(self, name: str) -> None: ...
    def make_symlink(self, name: str, target: str) -> None: ...
    def finish(self) -> None: ...


class _Counter:
    """Counts decompressed bytes and stops at the bound, whatever the frame header claims."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.count += len(data)
        if self.count > self._limit:
            raise ArtifactError(
                "unpacked_too_large", f"artifact unpacks to more than {self._limit} bytes"
            )
        return data


@contextmanager
def _reading(raw: BinaryIO, limits: Limits) -> Iterator[TarReader]:
    """A tar reader over the decompressed, counted stream; its errors become ArtifactErrors."""
    counter = _Counter(zstd.DecompressingReader(raw, limits.max_window_log), limits.max_unpacked_size)
    try:
        yield TarReader(counter)
    except zstd.ZstdError as exc:
        raise ArtifactError("bad_zstd", str(exc)) from None
    except TarFormatError as exc:
        raise ArtifactError(exc.reason, str(exc)) from None
    except LinkInPath as exc:
        raise ArtifactError("unsafe_path", str(exc)) from None


def verify_stream(
    raw: BinaryIO,
    *,
    expected_key: str | None = None,
    limits: Limits = Limits(),
    sink: Sink | None = None,
) -> dict:
    """Read a compressed artifact to its end, checking every member; return its manifest.

    Raises :class:`ArtifactError` at the first problem. With a ``sink``, each member is handed
    over as it is checked; the caller must discard the sink's work if an error is raised.
    """
    with _reading(raw, limits) as tar:
        meta = _read_metadata_member(tar, limits)
        members = check_manifest(meta, expected_key, limits)
        if sink is not None:
            sink.begin(meta)  # the manifest is checked: its sizes are bounded and true of every member that follows
        while (info := tar.next()) is not None:
            _verify_member(tar, info, members, sink)
        if members:
            missing = ", ".join(sorted(members)[:5])
            raise ArtifactError("missing_member", f"artifact lacks members its metadata lists: {missing}")
        tar.finish()  # the rest of the stream is zero padding; anything else is smuggled data
        if sink is not None:
            sink.finish()
    return meta


# What a manifest may hold, whatever its byte size: one object per entry and a few around them,
# nested no deeper than the format's three levels (and a little room). Checked on the raw bytes,
# strings left out, before parsing: a hostile manifest costs neither memory nor recursion (the
# parse of 8 MiB of JSON within these bounds peaks near 110 MiB at worst, measured).
MAX_MANIFEST_DEPTH = 8
# A JSON string, or an unterminated one running to the end of the input (invalid JSON, which the
# parser then refuses). Every match attempt at a quote succeeds, so the removal is one linear
# pass: a pattern that can fail at a quote is retried from each later quote, quadratic in a
# manifest of escaped quotes (hours of CPU for 8 MiB).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _check_json_shape(data: bytes, limits: Limits) -> None:
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if brackets.count(b"{") + brackets.count(b"[") > limits.max_members + 16:
        raise ArtifactError("bad_metadata", f"{METADATA_NAME} holds more than {limits.max_members} entries")
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > MAX_MANIFEST_DEPTH:
            raise ArtifactError("bad_metadata", f"{METADATA_NAME} is nested deeper than {MAX_MANIFEST_DEPTH} levels")


def _read_metadata_member(tar: TarReader, limits: Limits) -> dict:
    first = tar.next()
    if first is None or first.name != METADATA_NAME or first.kind != "file" or first.mode != 0o644:
        raise ArtifactError("bad_metadata", f"the first member must be the file {METADATA_NAME}, mode 0644")
    if first.size > limits.max_metadata_size:
        raise ArtifactError("bad_metadata", f"{METADATA_NAME} is over {limits.max_metadata_size} bytes")
    data = b"".join(tar.data())
    _check_json_shape(data, limits)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError("bad_metadata", f"{METADATA_NAME} is not valid JSON: {exc}") from None


def _verify_member(tar: TarReader, info: Member, members: dict, sink: Sink | None) -> None:
    name = info.name
    expected = members.pop(name, None)
    if expected is None:  # a listed name was checked with its manifest entry; say what is wrong with this one
        if name.startswith(OUTPUTS_PREFIX):
            check_relpath(name[len(OUTPUTS_PREFIX):], "member")
        elif name.startswith(LOGS_PREFIX):
            check_relpath(name[len(LOGS_PREFIX):], "member")
        else:
            check_relpath(name, "member")
            raise ArtifactError("unlisted_member", f"member {name!r} is outside outputs/ and logs/")
        raise ArtifactError("unlisted_member", f"member {name!r} is not listed in the metadata (or repeated)")
    kind = expected[0]
    if kind == "dir":
        if info.kind != "dir":
            raise ArtifactError("type_mismatch", f"member {name!r} should be a directory")
        if info.mode != DIR_MODE:
            raise ArtifactError("mode_mismatch", f"directory {name!r} has mode {info.mode:o}, not {DIR_MODE:o}")
        if sink is not None:
            sink.make_dir(name)
        return
    if kind == "symlink":
        if info.kind != "symlink" or info.linkname != expected[1]:
            raise ArtifactError("type_mismatch", f"member {name!r} should be a symlink to {expected[1]!r}")
        if info.mode != LINK_MODE:
            raise ArtifactError("mode_mismatch", f"symlink {name!r} has mode {info.mode:o}, not {LINK_MODE:o}")
        if sink is not None:
            sink.make_symlink(name, expected[1])
        return
    _, sha, size, mode = expected
    if info.kind != "file":
        raise ArtifactError("type_mismatch", f"member {name!r} should be a regular file")
    if info.size != size:
        raise ArtifactError("size_mismatch", f"member {name!r} has {info.size} bytes, metadata says {size}")
    if info.mode != mode:
        raise ArtifactError("mode_mismatch", f"member {name!r} has mode {info.mode:o}, metadata says {mode:o}")
    out = sink.open_file(name, mode) if sink is not None else None
    digest = hashlib.sha256()
    try:
        for chunk in tar.data():
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if digest.hexdigest() != sha:
        raise ArtifactError("hash_mismatch", f"member {name!r} does not match its sha256")


class DirSink:
    """Writes verified members under fresh folders, never through a link, symlinks last.

    Every path is walked from its root one component at a time without following links
    (see :class:`nofollow.Folders`, which keeps the folders in use open and checks each one
    is still in place when it lets it go), and files are created with ``O_EXCL``: a name that
    an insensitive filesystem merges with an earlier one fails instead of landing elsewhere.
    Symlinks are only created once every file and folder is written, so no write can pass
    through a link the artifact itself made. Use it as a context manager: its folders are
    closed on the way out, whatever happened.
    """

    def __init__(self, outputs_dir: Path, logs_dir: Path | None) -> None:
        self._roots = {OUTPUTS_PREFIX: nofollow.Folders(outputs_dir, create=True),
                       LOGS_PREFIX: nofollow.Folders(logs_dir, create=True) if logs_dir is not None else None}
        self._links: list[tuple[str, str]] = []

    def _where(self, name: str) -> tuple[nofollow.Folders | None, str]:
        prefix = OUTPUTS_PREFIX if name.startswith(OUTPUTS_PREFIX) else LOGS_PREFIX
        return self._roots[prefix], name[len(prefix):]

    def begin(self, meta: dict) -> None:
        pass

    def open_file(self, name: str, mode: int) -> BinaryIO:
        folders, rel = self._where(name)
        if folders is None:
            return open(os.devnull, "wb")
        parent, last = folders.parent(rel)
        try:
            return os.fdopen(nofollow.create_at(parent, last, mode), "wb")
        except FileExistsError:
            raise ArtifactError("path_conflict", f"member {name!r} names an entry that exists already") from None

    def make_dir(self, name: str) -> None:
        folders, rel = self._where(name)
        if folders is not None:
            folders.folder(rel)

    def make_symlink(self, name: str, target: str) -> None:
        self._links.append((name, target))

    def finish(self) -> None:
        for name, target in self._links:
            folders, rel = self._where(name)
            if folders is None:
                continue
            parent, last = folders.parent(rel)
            try:
                os.symlink(target, last, dir_fd=parent)
            except FileExistsError:
                raise ArtifactError("path_conflict", f"member {name!r} names an entry that exists already") from None
        for folders in self._roots.values():
            if folders is not None:
                folders.close(check=True)

    def close(self) -> None:
        for folders in self._roots.values():
            if folders is not None:
                folders.close(check=False)

    def __enter__(self) -> "DirSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def extract(
    raw: BinaryIO,
    outputs_dir: Path,
    *,
    logs_dir: Path | None = None,
    expected_key: str | None = None,
    limits: Limits = Limits(),
) -> dict:
    """Verify and unpack an artifact into empty folders; return its manifest.

    ``outputs_dir`` (and ``logs_dir``) must not exist or be empty. On any error what was written
    is left for the caller to remove: extract into a staging folder and move it into place.
    """
    for folder in (outputs_dir, logs_dir):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            if any(folder.iterdir()):
                raise FileExistsError(f"{folder} is not empty")
    with DirSink(outputs_dir, logs_dir) as sink:
        return verify_stream(raw, expected_key=expected_key, limits=limits, sink=sink)


def place(staging: Path, dest: Path, meta: dict) -> None:
    """Move an extracted artifact's outputs from ``staging`` into ``dest``: files and folders, then links.

    No component of either side is followed through a symlink: a folder of the package that is
    a link (one the build left, or one swapped in meanwhile) stops the restore with
    :class:`nofollow.LinkInPath`, an ``OSError`` naming it. It is the package's state, not the
    artifact's fault, so it is not an :class:`ArtifactError`: a sound cache entry is kept.
    Each folder is walked once on each side (see :class:`nofollow.Folders`).
    """
    src = nofollow.Folders(staging, create=False)
    try:
        dst = nofollow.Folders(dest, create=True)
        try:
            for rel in sorted(meta["files"]) + sorted(meta["symlinks"]):
                src_fd, name = src.parent(rel)
                dst_fd, _ = dst.parent(rel)
                if nofollow.move_at(src_fd, dst_fd, name):
                    dst.forget(rel)
            dst.close(check=True)
        finally:
            dst.close(check=False)
        src.close(check=True)
    finally:
        src.close(check=False)


def read_metadata(raw: BinaryIO, limits: Limits = Limits()) -> dict:
    """Read and validate only the manifest at the head of an artifact."""
    with _reading(raw, limits) as tar:
        meta = _read_metadata_member(tar, limits)
    check_manifest(meta, None, limits)
    return meta


# --- packing -------------------------------------------------------------------------------


def _file_mode(st_mode: int) -> int:
    return 0o755 if st_mode & 0o111 else 0o644


def hash_file(path: Path | str) -> tuple[str, int]:
    """SHA-256 and size of a file, read in large chunks."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        return digest.hexdigest(), fh.tell()


# Packing reads each output twice: once to hash it for the manifest, which comes first in the
# archive, and once to write it. The bodies of small files are kept from the first read instead,
# up to this many bytes in all, so an output of thousands of small files is read once (and is
# then exactly what was hashed); larger files, and the rest, are read again and rehashed.
KEEP_SMALL_FILE = 64 * 1024
KEEP_BUDGET = 32 << 20


def collect_outputs(root: Path, paths: Iterable[str], kept: dict[str, bytes] | None = None) -> tuple[dict, dict]:
    """Describe the given relative paths (folders walked, symlinks kept) as manifest listings.

    With ``kept``, the bodies of small files are put there too (see :data:`KEEP_BUDGET`).
    """
    files: dict[str, dict] = {}
    links: dict[str, str] = {}
    budget = KEEP_BUDGET if kept is not None else 0

    def visit(rel: str) -> None:
        nonlocal budget
        full = root / rel
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            links[rel] = check_symlink(rel, os.readlink(full))
        elif stat.S_ISREG(st.st_mode):
            if st.st_size <= min(KEEP_SMALL_FILE, budget):
                body = _read_small(full)
                if body is not None:
                    kept[rel] = body
                    budget -= len(body)
                    files[rel] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body),
                                  "mode": _file_mode(st.st_mode)}
                    return
            sha, size = hash_file(full)
            files[rel] = {"sha256": sha, "size": size, "mode": _file_mode(st.st_mode)}
        elif stat.S_ISDIR(st.st_mode):
            children = sorted(os.listdir(full))
            if not children:
                files[rel] = {"type": "dir", "mode": DIR_MODE}
            for child in children:
                visit(f"{rel}/{child}")
        else:
            raise ArtifactError("bad_member_type", f"output {rel!r} is not a file, folder or symlink")

    for rel in sorted(set(paths)):
        visit(check_relpath(rel, "output"))
    return dict(sorted(files.items())), dict(sorted(links.items()))


def _read_small(path: Path) -> bytes | None:
    """The whole body of a small file, or None when it has grown past :data:`KEEP_SMALL_FILE`."""
    with open(path, "rb", buffering=0) as fh:
        body = fh.read(KEEP_SMALL_FILE + 1)
        while len(body) <= KEEP_SMALL_FILE and (more := fh.read(KEEP_SMALL_FILE + 1 - len(body))):
            body += more
    return body if len(body) <= KEEP_SMALL_FILE else None


class HashingReader:
    """Hashes and counts what passes through a read: a file changed while packing is caught,
    and a stored artifact is rehashed while it is reverified, in one read."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _log_entry(log: bytes | Path) -> dict:
    """The manifest entry of the log, given as bytes or as a file (a long log never sits in memory)."""
    if isinstance(log, Path):
        sha, size = hash_file(log)
        return {"sha256": sha, "size": size}
    return {"sha256": hashlib.sha256(log).hexdigest(), "size": len(log)}


def pack(
    dest: BinaryIO,
    root: Path,
    outputs: Iterable[str],
    metadata: dict,
    *,
    log: bytes | Path = b"",
    cache_key: str,
    level: int = zstd.DEFAULT_LEVEL,
    limits: Limits = Limits(),
) -> dict:
    """Write a deterministic artifact of ``outputs`` (paths relative to ``root``) to ``dest``.

    Same files and same metadata give the same bytes: members are sorted and carry no times,
    owners or umask-dependent modes. Returns the manifest written. Outputs that no verifier
    would accept (names one filesystem merges, a manifest over the bounds) raise
    :class:`ArtifactError` before anything is written.
    """
    prepared = prepare(root, outputs, metadata, log=log, cache_key=cache_key, limits=limits)
    prepared.write(dest, level)
    return prepared.meta


def prepare(
    root: Path,
    outputs: Iterable[str],
    metadata: dict,
    *,
    log: bytes | Path = b"",
    cache_key: str,
    limits: Limits = Limits(),
) -> "Prepared":
    """The first half of :func:`pack`: hash the outputs and check the manifest, write nothing.

    The bytes of small outputs and of a short log are held from here on (see
    :data:`KEEP_BUDGET`), so what :meth:`Prepared.write` writes later is what was hashed now;
    larger files are hashed again as they are written.
    """
    if not is_cache_key(cache_key):
        raise ArtifactError("bad_metadata", f"invalid cache key {cache_key!r}")
    root = Path(root)
    kept: dict[str, bytes] = {}
    files, links = collect_outputs(root, outputs, kept)
    if isinstance(log, Path) and os.stat(log).st_size <= KEEP_SMALL_FILE:
        body = _read_small(log)
        log = body if body is not None else log
    meta = dict(metadata)
    meta.update(
        format=FORMAT,
        cache_key=cache_key,
        files=files,
        symlinks=links,
        logs={LOG_NAME: _log_entry(log)},
    )
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(blob) > limits.max_metadata_size:
        raise ArtifactError("bad_metadata", f"the manifest would be over {limits.max_metadata_size} bytes")
    _check_json_shape(blob, limits)
    check_manifest(meta, cache_key, limits)
    return Prepared(root, meta, blob, kept, log)


@dataclass
class Prepared:
    """Outputs hashed and a manifest checked by :func:`prepare`, ready to be written."""

    root: Path
    meta: dict
    blob: bytes  # the manifest's JSON
    kept: dict[str, bytes]
    log: bytes | Path

    def write(self, dest: BinaryIO, level: int = zstd.DEFAULT_LEVEL) -> None:
        """The artifact, compressed into ``dest``; once only (the kept bodies are let go as written)."""
        files, links, kept = self.meta["files"], self.meta["symlinks"], self.kept
        with zstd.CompressingWriter(dest, level) as writer:
            tar = TarWriter(writer)
            _add_file(tar, METADATA_NAME, 0o644, self.blob)
            entries = [(p, "file") for p in files] + [(p, "link") for p in links]
            for rel, kind in sorted(entries):
                name = OUTPUTS_PREFIX + rel
                if kind == "link":
                    tar.add(name, tarfile.SYMTYPE, LINK_MODE, target=links[rel])
                    continue
                entry = files[rel]
                if entry.get("type") == "dir":
                    tar.add(name, tarfile.DIRTYPE, DIR_MODE)
                elif rel in kept:
                    _add_file(tar, name, entry["mode"], kept.pop(rel))
                else:
                    with open(self.root / rel, "rb", buffering=0) as fh:
                        _copy_file(tar, name, entry, fh, f"output {rel!r}")
            entry = self.meta["logs"][LOG_NAME]
            if isinstance(self.log, Path):
                with open(self.log, "rb", buffering=0) as fh:
                    _copy_file(tar, LOGS_PREFIX + LOG_NAME, dict(entry, mode=0o644), fh, "the log")
            else:
                _add_file(tar, LOGS_PREFIX + LOG_NAME, 0o644, self.log)
            tar.close()


def _add_file(tar: TarWriter, name: str, mode: int, body: bytes) -> None:
    """A file member whose bytes are in memory (the manifest, a small output read once, a short log)."""
    tar.add(name, tarfile.REGTYPE, mode, len(body))
    tar.data(body)
    tar.end_data(len(body))


def _copy_file(tar: TarWriter, name: str, entry: dict, fh: BinaryIO, what: str) -> None:
    """A file member read from ``fh``: exactly the size the manifest says, hashed again on the way,
    so a file changed since it was hashed fails the pack instead of contradicting its manifest."""
    size = entry["size"]
    tar.add(name, tarfile.REGTYPE, entry["mode"], size)
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = fh.read(min(left, CHUNK))
        if not chunk:
            raise ArtifactError("changed_while_packing", f"{what} changed while it was packed")
        digest.update(chunk)
        tar.data(chunk)
        left -= len(chunk)
    tar.end_data(size)
    if digest.hexdigest() != entry["sha256"]:
        raise ArtifactError("changed_while_packing", f"{what} changed while it was packed")
