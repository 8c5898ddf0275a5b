"""A verified artifact waiting for its task's turn, and how it is placed into the package.

An artifact is verified completely (every member against the manifest) before anything of the
package is touched. Where its members wait meanwhile depends on their size, which the checked
manifest declares before the first member is read:

- up to :data:`HOLD_UNPACKED` bytes in all, in memory (:class:`Held`): in its turn the task
  writes each file straight to its place in the package. A build's typical output (a few files,
  a log) then costs its own files and folders and nothing more: a staging folder with its
  ``outputs``, ``logs`` and subfolders, then a rename into the package, cost some eight
  folders and three files per one-file artifact, and creating inodes is what a restore of
  hundreds of small artifacts spends its time on.
- anything larger, in a private staging folder (:class:`Staged`), moved into the package in
  the task's turn: memory stays bounded by a constant per download whatever a server sends.

Both ways place the same entries with the same walk (:mod:`nofollow`): every folder opened
relative to its parent without following links, files and folders first, symlinks last, so a
folder of the package that is (or becomes) a link stops the restore with
:class:`nofollow.LinkInPath` instead of being written through.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path
from typing import BinaryIO

from . import artifact, nofollow
from .artifact import LOGS_PREFIX, OUTPUTS_PREFIX, ArtifactError, Limits

# The unpacked bytes (files and log, as the manifest declares them) of an artifact verified into
# memory; a larger one goes through a staging folder.
HOLD_UNPACKED = 8 << 20
# What all artifacts held in memory hold together, at most. The prefetcher verifies every hit as
# it arrives and each waits for its task's turn, so without this bound a fresh checkout's hits
# would all wait in memory at once; past it, a small artifact waits in a staging folder too.
HOLD_TOTAL = 64 << 20


class Budget:
    """Bytes that held artifacts may still take; thread-safe."""

    def __init__(self, total: int) -> None:
        self._left = total
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when fewer are left."""
        with self._lock:
            if size > self._left:
                return False
            self._left -= size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self._left += size


HELD = Budget(HOLD_TOTAL)  # the process's: every restore shares it


class Staged:
    """An artifact verified into a staging folder; ``path`` is the artifact file itself."""

    def __init__(self, path: Path, staging: Path, meta: dict) -> None:
        self.path, self.staging, self.meta = path, staging, meta

    @property
    def log(self) -> Path:
        """The task's captured output, as a file."""
        return self.staging / "logs" / artifact.LOG_NAME

    def place(self, dest: Path) -> None:
        """Move the outputs into ``dest`` (see :func:`artifact.place`)."""
        artifact.place(self.staging / "outputs", dest, self.meta)

    def release(self) -> None:
        """Drop the verified members (the artifact file is the caller's)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        """Drop everything: the members and the artifact file (a download no task took)."""
        self.release()
        self.path.unlink(missing_ok=True)


class Held(Staged):
    """An artifact verified into memory: ``files`` maps each path to ``(mode, body)``, or to None
    for an empty folder; ``links`` maps each symlink to its target."""

    def __init__(self, path: Path, meta: dict, files: dict[str, tuple[int, bytes] | None], links: dict[str, str],
                 log: bytes, budget: Budget, reserved: int) -> None:
        self.path, self.meta, self.files, self.links = path, meta, files, links
        self._log = log
        self._budget, self._reserved = budget, reserved

    @property
    def log(self) -> bytes:  # type: ignore[override]
        """The task's captured output, as bytes (bounded by :data:`HOLD_UNPACKED`)."""
        return self._log

    def place(self, dest: Path) -> None:
        """Write the outputs into ``dest``, replacing what is there: files and folders, then links."""
        write_tree(dest, self.files, self.links)

    def release(self) -> None:
        self.files, self.links, self._log = {}, {}, b""
        self._budget.give(self._reserved)
        self._reserved = 0


def stage(path: Path, key: str, limits: Limits, tmp: Path, hold: int = HOLD_UNPACKED,
          budget: Budget = HELD) -> Staged:
    """Verify the artifact file ``path`` completely; its members wait in memory (at most ``hold``
    bytes, taken from ``budget`` until the result is released) or in a staging folder under ``tmp``.

    Raises :class:`artifact.ArtifactError` (nothing is kept) when the artifact fails verification.
    """
    staging = tmp / f"restore-{key[:16]}-{os.getpid()}-{threading.get_ident()}"
    sink = _Choosing(staging, hold, budget)
    try:
        with open(path, "rb", buffering=0) as fh, sink:  # the decompressor reads in large blocks of its own
            meta = artifact.verify_stream(fh, expected_key=key, limits=limits, sink=sink)
    except BaseException:
        budget.give(sink.reserved)
        if sink.dir is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if sink.dir is not None:
        return Staged(path, staging, meta)
    return Held(path, meta, sink.files, sink.links, sink.logs.get(artifact.LOG_NAME, (0, b""))[1],
                budget, sink.reserved)


class _Body:
    """One member's bytes as they are verified, appended to its listing when closed."""

    def __init__(self, into: dict, rel: str, mode: int) -> None:
        self._into, self._rel, self._mode = into, rel, mode
        self._parts: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self._parts.append(bytes(data))

    def close(self) -> None:
        self._into[self._rel] = (self._mode, b"".join(self._parts))


class _Choosing:
    """The sink of :func:`stage`: memory when the checked manifest declares at most ``hold``
    bytes and ``budget`` still has them, else a :class:`artifact.DirSink` in a fresh staging folder."""

    def __init__(self, staging: Path, hold: int, budget: Budget) -> None:
        self._staging, self._hold, self._budget = staging, hold, budget
        self.reserved = 0  # taken from the budget, for the Held (or given back on failure)
        self.dir: artifact.DirSink | None = None
        self.files: dict[str, tuple[int, bytes] | None] = {}
        self.links: dict[str, str] = {}
        self.logs: dict[str, tuple[int, bytes]] = {}

    def begin(self, meta: dict) -> None:
        declared = sum(entry.get("size", 0) for entry in meta["files"].values())
        declared += sum(entry["size"] for entry in meta["logs"].values())
        if declared <= self._hold and self._budget.take(declared):
            self.reserved = declared
            return
        if self._staging.exists():
            shutil.rmtree(self._staging)
        (self._staging / "outputs").mkdir(parents=True)
        (self._staging / "logs").mkdir()
        self.dir = artifact.DirSink(self._staging / "outputs", self._staging / "logs")

    def open_file(self, name: str, mode: int) -> BinaryIO:
        if self.dir is not None:
            return self.dir.open_file(name, mode)
        if name.startswith(OUTPUTS_PREFIX):
            return _Body(self.files, name[len(OUTPUTS_PREFIX):], mode)  # type: ignore[return-value]
        return _Body(self.logs, name[len(LOGS_PREFIX):], mode)  # type: ignore[return-value]

    def make_dir(self, name: str) -> None:
        if self.dir is not None:
            self.dir.make_dir(name)
        else:
            self.files[name[len(OUTPUTS_PREFIX):]] = None

    def make_symlink(self, name: str, target: str) -> None:
        if self.dir is not None:
            self.dir.make_symlink(name, target)
        else:
            self.links[name[len(OUTPUTS_PREFIX):]] = target

    def finish(self) -> None:
        if self.dir is not None:
            self.dir.finish()

    def __enter__(self) -> "_Choosing":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            self.dir.close()


def write_tree(dest: Path, files: dict[str, tuple[int, bytes] | None], links: dict[str, str]) -> None:
    """Write files (``(mode, body)``, or None for an empty folder) and then symlinks under ``dest``.

    What is in the way is replaced, as a rename would replace it: a file or link at a file's
    path is unlinked, a folder there removed with its content (a folder that is wanted stays).
    But an entry the folder lists under another spelling is not: on a filesystem that takes two
    names for one (beyond the case and normalisation the manifest check compares) it may be
    another of this artifact's entries, which would be lost silently, where a staging folder's
    ``O_EXCL`` refuses the artifact. The restore stops with ``path_conflict`` instead.
    No component is followed through a link (see :class:`nofollow.Folders`, which also checks,
    as it lets each folder go, that it is still the folder written to).
    """
    folders = nofollow.Folders(dest, create=True)
    listings: dict[str, set[str]] = {}  # a folder's names as it was first found in the way, by its path
    try:
        for rel in sorted(files):
            entry = files[rel]
            if entry is None:
                folders.folder(rel)
                continue
            mode, body = entry
            parent, name = folders.parent(rel)
            fd = _replacing(folders, listings, rel, parent, name, lambda: nofollow.create_at(parent, name, mode))
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        for rel in sorted(links):
            parent, name = folders.parent(rel)
            _replacing(folders, listings, rel, parent, name, lambda: os.symlink(links[rel], name, dir_fd=parent))
        folders.close(check=True)
    finally:
        folders.close(check=False)


def _replacing(folders: nofollow.Folders, listings: dict[str, set[str]], rel: str, parent: int, name: str, make):
    """``make()`` a new entry; when something is at its name already, remove that and make it again
    (only when the folder lists it under this very name: see :func:`write_tree`).

    Each folder is listed once, at its first entry in the way, not once per entry: a restore over
    a previous build's outputs finds every file in the way. Names this restore made later are not
    in that listing, which is right: an entry in the way under one of them is another spelling of
    an entry of this artifact."""
    try:
        return make()
    except FileExistsError:
        pass
    folder = os.path.dirname(rel)
    listing = listings.get(folder)
    if listing is None:
        listing = listings[folder] = set(os.listdir(parent))
    if name not in listing:
        raise ArtifactError("path_conflict", f"{rel!r} names an entry of the package spelled otherwise") from None
    if stat.S_ISDIR(os.lstat(name, dir_fd=parent).st_mode):
        folders.forget(rel)
        shutil.rmtree(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)
    return make()
