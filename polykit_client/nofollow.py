"""Folder walks that never follow a symlink in any component of a path.

Checking a path and then using it (``is_symlink()``, then ``open()``) leaves a window in which a
folder can be swapped for a link, and on a case-insensitive or normalisation-insensitive
filesystem (macOS's default, vfat, ext4 with casefold) two spellings name one entry, so a
check made on names proves nothing about what the kernel will walk through. Here each
component is opened relative to its parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``, and
created with ``mkdir(dir_fd=...)`` when missing, so whatever the filesystem and whatever
happens meanwhile, a walk ends in a real folder under the root or fails with ``LinkInPath``.
Only the root itself is trusted: it is the caller's own folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LinkInPath(OSError):
    """A component of a path is a symlink or not a folder, so the walk stopped there."""


def _open_child(parent: int, part: str, path: str, create: bool) -> int:
    if create:
        try:
            os.mkdir(part, DIR_MODE, dir_fd=parent)
        except FileExistsError:
            pass
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LinkInPath(exc.errno, f"{path!r} would be written through the symlink or file {part!r}") from None
        raise


@contextmanager
def parent_dir(root: Path | str | int, rel: str, *, create: bool) -> Iterator[tuple[int, str]]:
    """Yield ``(fd of the folder holding rel, rel's last component)``, walked without following links.

    ``root`` is a path or an open folder descriptor (not closed here); ``create`` makes the
    missing folders on the way with mode 0755.
    """
    *folders, name = rel.split("/")
    fd = os.dup(root) if isinstance(root, int) else os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in folders:
            child = _open_child(fd, part, rel, create)
            os.close(fd)
            fd = child
        yield fd, name
    finally:
        os.close(fd)


def make_dirs(root: Path | str | int, rel: str) -> None:
    """Create the folder ``rel`` (and its parents) under ``root``; an existing real folder is fine."""
    with parent_dir(root, rel, create=True) as (parent, name):
        os.close(_open_child(parent, name, rel, True))


def create_file(root: Path | str | int, rel: str, mode: int) -> int:
    """A new file ``rel`` under ``root``, opened for writing with exactly ``mode``; never replaces anything."""
    with parent_dir(root, rel, create=True) as (parent, name):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    os.fchmod(fd, mode)  # the umask must not change the mode asked for
    return fd


def make_symlink(root: Path | str | int, rel: str, target: str) -> None:
    """Create the symlink ``rel -> target`` under ``root``; never replaces anything."""
    with parent_dir(root, rel, create=True) as (parent, name):
        os.symlink(target, name, dir_fd=parent)


def move(src_root: Path | str, dest_root: Path | str, rel: str) -> None:
    """Move the file, symlink or empty folder ``rel`` from one tree to the other, replacing what is there.

    A folder at the destination is replaced unless the source is a folder too (then it stays).
    A rename when both trees share a filesystem, a copy otherwise; neither side is walked
    through a link.
    """
    with parent_dir(src_root, rel, create=False) as (src, name), parent_dir(dest_root, rel, create=True) as (dst, _):
        st = os.lstat(name, dir_fd=src)
        try:
            old = os.lstat(name, dir_fd=dst)
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISDIR(old.st_mode):
            if stat.S_ISDIR(st.st_mode):
                return  # an empty folder that exists already
            shutil.rmtree(name, dir_fd=dst)
        try:
            os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        _copy(src, dst, name, st)


def _copy(src: int, dst: int, name: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(name, DIR_MODE, dir_fd=dst)
        return
    try:
        os.unlink(name, dir_fd=dst)
    except FileNotFoundError:
        pass
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
        return
    mode = stat.S_IMODE(st.st_mode)
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
    with open(fin, "rb") as reader:
        fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dst)
        with open(fout, "wb") as writer:
            os.fchmod(fout, mode)
            shutil.copyfileobj(reader, writer, 1024 * 1024)
