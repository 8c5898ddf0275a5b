"""The artifact format (a zstd-compressed POSIX tar with a JSON manifest first): pack, verify, extract.

Both sides use this module: the client packs outputs and restores them, the server verifies an
upload before it stores it. Verification and extraction are one pass over the stream, so neither
side holds an artifact in memory, and nothing is trusted that the manifest does not vouch for.
We never call ``tarfile``'s own extraction: every member is checked here and written with
``O_EXCL``/``O_NOFOLLOW`` (the tar filter bypasses of CVE-2025-4517 and friends do not apply).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Protocol

from . import zstd

FORMAT = 1
METADATA_NAME = "polykit-artifact.json"
OUTPUTS_PREFIX = "outputs/"
LOGS_PREFIX = "logs/"
LOG_NAME = "output.log"
FILE_MODES = (0o644, 0o755)
DIR_MODE = 0o755
CHUNK = 1024 * 1024
DEFAULT_MAX_ARTIFACT_SIZE = 1 << 30  # the server's default limit; the client's default download bound
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    """An artifact is malformed or unsafe; ``reason`` is a machine word for metrics and errors."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Bounds on what one artifact may unpack to: the decompression-bomb and tar-bomb guards."""

    max_unpacked_size: int = 64 << 30
    max_members: int = 1_000_000
    max_metadata_size: int = 64 << 20
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
    if path.startswith("/"):
        raise ArtifactError("unsafe_path", f"{what} {path!r} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ArtifactError("unsafe_path", f"{what} {path!r} is not a normalised relative path")
    return path


def check_symlink(path: str, target: object) -> str:
    """A link target is relative, climbs only at its start, and never above the package root.

    Allowing ``..`` only as leading components means the link resolves through real folders
    (no entry may sit under a symlink), so a chain of links cannot climb out either.
    """
    if not isinstance(target, str) or not target or "\x00" in target or "\\" in target:
        raise ArtifactError("unsafe_link", f"symlink {path!r} has an invalid target")
    if target.startswith("/"):
        raise ArtifactError("unsafe_link", f"symlink {path!r} points to an absolute path")
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
    for name, entry in meta["logs"].items():
        check_relpath(name, "log name")
        _check_file_entry(name, entry, (0o644,))
        members[LOGS_PREFIX + name] = ("file", entry["sha256"], entry["size"], 0o644)
        declared += entry["size"]
    for path in kinds:
        parent = path.rpartition("/")[0]
        while parent:
            if kinds.get(parent) in ("file", "symlink"):
                raise ArtifactError("path_conflict", f"{path!r} lies under the {kinds[parent]} {parent!r}")
            parent = parent.rpartition("/")[0]
    if len(members) + 1 > limits.max_members:
        raise ArtifactError("too_many_members", f"artifact lists {len(members)} members, over {limits.max_members}")
    if declared > limits.max_unpacked_size:
        raise ArtifactError(
            "unpacked_too_large",
            f"metadata declares {declared} bytes unpacked, over the limit of {limits.max_unpacked_size}",
        )
    return members


class Sink(Protocol):
    """Where verified members go; extraction writes them to disk, verification drops them."""

    def open_file(self, name: str, mode: int) -> BinaryIO: ...
    def make_dir(self, name: str) -> None: ...
    def make_symlink(self, name: str, target: str) -> None: ...


class _Counter:
    """Counts decompressed bytes and stops at the bound, whatever the frame header claims.

    It also remembers where the last non-zero byte was, so data hidden after the end of the
    tar archive is found even when ``tarfile`` has already buffered it.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.count = 0
        self.last_nonzero = -1

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        used = len(data.rstrip(b"\0"))
        if used:
            self.last_nonzero = self.count + used - 1
        self.count += len(data)
        if self.count > self._limit:
            raise ArtifactError(
                "unpacked_too_large", f"artifact unpacks to more than {self._limit} bytes"
            )
        return data


def _tar_errors():
    return (tarfile.TarError, EOFError)


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
    counter = _Counter(zstd.DecompressingReader(raw, limits.max_window_log), limits.max_unpacked_size)
    try:
        tar = tarfile.open(fileobj=counter, mode="r|", bufsize=CHUNK)
        meta = _read_metadata_member(tar, limits)
        members = check_manifest(meta, expected_key, limits)
        count = 1
        end = tar.offset
        while (info := tar.next()) is not None:
            count += 1
            end = info.offset_data + (-(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if info.isreg() else 0)
            if count > limits.max_members:
                raise ArtifactError("too_many_members", f"artifact has more than {limits.max_members} members")
            _verify_member(tar, info, members, sink)
            tar.members.clear()  # stream mode keeps every TarInfo; we need none of them
        if members:
            missing = ", ".join(sorted(members)[:5])
            raise ArtifactError("missing_member", f"artifact lacks members its metadata lists: {missing}")
        # The rest of the stream is the tar's zero padding; anything else is smuggled data.
        while counter.read(CHUNK):
            pass
        if counter.last_nonzero >= end:
            raise ArtifactError("trailing_data", "artifact has data after the end of its tar archive")
    except zstd.ZstdError as exc:
        raise ArtifactError("bad_zstd", str(exc)) from None
    except _tar_errors() as exc:
        raise ArtifactError("bad_tar", f"not a valid tar archive: {exc}") from None
    return meta


def _read_metadata_member(tar: tarfile.TarFile, limits: Limits) -> dict:
    first = tar.next()
    if first is None or first.name != METADATA_NAME or not first.isreg():
        raise ArtifactError("bad_metadata", f"the first member must be the file {METADATA_NAME}")
    if first.size > limits.max_metadata_size:
        raise ArtifactError("bad_metadata", f"{METADATA_NAME} is over {limits.max_metadata_size} bytes")
    data = tar.extractfile(first).read()
    if len(data) != first.size:
        raise ArtifactError("bad_tar", f"{METADATA_NAME} is truncated")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError("bad_metadata", f"{METADATA_NAME} is not valid JSON: {exc}") from None


def _verify_member(tar: tarfile.TarFile, info: tarfile.TarInfo, members: dict, sink: Sink | None) -> None:
    name = info.name
    if name.startswith(OUTPUTS_PREFIX):
        check_relpath(name[len(OUTPUTS_PREFIX):], "member")
    elif name.startswith(LOGS_PREFIX):
        check_relpath(name[len(LOGS_PREFIX):], "member")
    else:
        check_relpath(name, "member")
        raise ArtifactError("unlisted_member", f"member {name!r} is outside outputs/ and logs/")
    expected = members.pop(name, None)
    if expected is None:
        raise ArtifactError("unlisted_member", f"member {name!r} is not listed in the metadata (or repeated)")
    kind = expected[0]
    if not (info.isreg() or info.isdir() or info.issym()):
        raise ArtifactError("bad_member_type", f"member {name!r} is a device, fifo or hard link")
    if kind == "dir":
        if not info.isdir():
            raise ArtifactError("type_mismatch", f"member {name!r} should be a directory")
        if sink is not None:
            sink.make_dir(name)
        return
    if kind == "symlink":
        if not info.issym() or info.linkname != expected[1]:
            raise ArtifactError("type_mismatch", f"member {name!r} should be a symlink to {expected[1]!r}")
        if sink is not None:
            sink.make_symlink(name, expected[1])
        return
    _, sha, size, mode = expected
    if not info.isreg():
        raise ArtifactError("type_mismatch", f"member {name!r} should be a regular file")
    if info.size != size:
        raise ArtifactError("size_mismatch", f"member {name!r} has {info.size} bytes, metadata says {size}")
    if info.mode & 0o7777 != mode:
        raise ArtifactError("mode_mismatch", f"member {name!r} has mode {info.mode & 0o7777:o}, metadata says {mode:o}")
    src = tar.extractfile(info)
    out = sink.open_file(name, mode) if sink is not None else None
    digest = hashlib.sha256()
    got = 0
    try:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if got != size:
        raise ArtifactError("size_mismatch", f"member {name!r} is truncated")
    if digest.hexdigest() != sha:
        raise ArtifactError("hash_mismatch", f"member {name!r} does not match its sha256")


class _DirSink:
    """Writes verified members under fresh folders, refusing to follow or replace anything."""

    def __init__(self, outputs_dir: Path, logs_dir: Path | None) -> None:
        self._roots = {OUTPUTS_PREFIX: outputs_dir, LOGS_PREFIX: logs_dir}

    def _path(self, name: str) -> Path | None:
        prefix = OUTPUTS_PREFIX if name.startswith(OUTPUTS_PREFIX) else LOGS_PREFIX
        root = self._roots[prefix]
        if root is None:
            return None
        path = root / name[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def open_file(self, name: str, mode: int) -> BinaryIO:
        path = self._path(name)
        if path is None:
            return open(os.devnull, "wb")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        os.fchmod(fd, mode)  # the umask must not change what the manifest promised
        return os.fdopen(fd, "wb")

    def make_dir(self, name: str) -> None:
        path = self._path(name)
        if path is not None:
            path.mkdir(mode=DIR_MODE, exist_ok=True)

    def make_symlink(self, name: str, target: str) -> None:
        path = self._path(name)
        if path is not None:
            os.symlink(target, path)


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
    return verify_stream(raw, expected_key=expected_key, limits=limits, sink=_DirSink(outputs_dir, logs_dir))


def read_metadata(raw: BinaryIO, limits: Limits = Limits()) -> dict:
    """Read and validate only the manifest at the head of an artifact."""
    counter = _Counter(zstd.DecompressingReader(raw, limits.max_window_log), limits.max_unpacked_size)
    try:
        tar = tarfile.open(fileobj=counter, mode="r|", bufsize=64 * 1024)
        meta = _read_metadata_member(tar, limits)
    except zstd.ZstdError as exc:
        raise ArtifactError("bad_zstd", str(exc)) from None
    except _tar_errors() as exc:
        raise ArtifactError("bad_tar", f"not a valid tar archive: {exc}") from None
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


def collect_outputs(root: Path, paths: Iterable[str]) -> tuple[dict, dict]:
    """Describe the given relative paths (folders walked, symlinks kept) as manifest listings."""
    files: dict[str, dict] = {}
    links: dict[str, str] = {}

    def visit(rel: str) -> None:
        full = root / rel
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            links[rel] = check_symlink(rel, os.readlink(full))
        elif stat.S_ISREG(st.st_mode):
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


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = target
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(
    dest: BinaryIO,
    root: Path,
    outputs: Iterable[str],
    metadata: dict,
    *,
    log: bytes | Path = b"",
    cache_key: str,
    level: int = zstd.DEFAULT_LEVEL,
) -> dict:
    """Write a deterministic artifact of ``outputs`` (paths relative to ``root``) to ``dest``.

    Same files and same metadata give the same bytes: members are sorted and carry no times,
    owners or umask-dependent modes. Returns the manifest written.
    """
    if not is_cache_key(cache_key):
        raise ArtifactError("bad_metadata", f"invalid cache key {cache_key!r}")
    root = Path(root)
    files, links = collect_outputs(root, outputs)
    meta = dict(metadata)
    meta.update(
        format=FORMAT,
        cache_key=cache_key,
        files=files,
        symlinks=links,
        logs={LOG_NAME: _log_entry(log)},
    )
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    with zstd.CompressingWriter(dest, level) as writer:
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
            tar.addfile(_tarinfo(METADATA_NAME, tarfile.REGTYPE, 0o644, len(blob)), io.BytesIO(blob))
            entries = [(p, "file") for p in files] + [(p, "link") for p in links]
            for rel, kind in sorted(entries):
                name = OUTPUTS_PREFIX + rel
                if kind == "link":
                    tar.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, target=links[rel]))
                    continue
                entry = files[rel]
                if entry.get("type") == "dir":
                    tar.addfile(_tarinfo(name, tarfile.DIRTYPE, DIR_MODE))
                    continue
                with open(root / rel, "rb") as fh:
                    reader = HashingReader(fh)
                    tar.addfile(_tarinfo(name, tarfile.REGTYPE, entry["mode"], entry["size"]), reader)
                if reader.digest.hexdigest() != entry["sha256"]:
                    raise ArtifactError("changed_while_packing", f"output {rel!r} changed while it was packed")
            entry = meta["logs"][LOG_NAME]
            with (open(log, "rb") if isinstance(log, Path) else io.BytesIO(log)) as fh:
                reader = HashingReader(fh)
                tar.addfile(_tarinfo(LOGS_PREFIX + LOG_NAME, tarfile.REGTYPE, 0o644, entry["size"]), reader)
            if reader.digest.hexdigest() != entry["sha256"]:
                raise ArtifactError("changed_while_packing", "the log changed while it was packed")
    return meta
