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
        return create_at(parent, name, mode)


def create_at(parent: int, name: str, mode: int) -> int:
    """A new file ``name`` in the open folder ``parent``, as :func:`create_file` makes it."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    # The umask must not change the mode asked for, nor a default ACL of the folder, which takes
    # the umask's place (acl(5)) and cannot be told without another system call: so always set.
    os.fchmod(fd, mode)
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
        move_at(src, dst, name)


def move_at(src: int, dst: int, name: str) -> bool:
    """:func:`move` between two open folders; True when a folder at the destination was removed."""
    st = os.lstat(name, dir_fd=src)
    try:
        old = os.lstat(name, dir_fd=dst)
    except FileNotFoundError:
        old = None
    removed = False
    if old is not None and stat.S_ISDIR(old.st_mode):
        if stat.S_ISDIR(st.st_mode):
            return False  # an empty folder that exists already
        shutil.rmtree(name, dir_fd=dst)
        removed = True
    try:
        os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
        return removed
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    _copy(src, dst, name, st)
    return removed


class Folders:
    """The folders of one tree, each walked once without following links and kept open while in use.

    Restoring thousands of files would walk the same few folders thousands of times (an
    ``open`` and, when creating, a ``mkdir`` per component per file). Here each folder is walked
    once, component by component with ``O_NOFOLLOW`` as :func:`parent_dir` does, and its
    descriptor kept; the :data:`KEEP` most recently used stay open (members come sorted, so
    one folder's files come together), which bounds the descriptors held whatever the tree.

    A kept descriptor keeps pointing at the folder it opened even if that folder is swapped
    for a link meanwhile, so writes through it never follow the link; to also be sure every
    file ended up at its path, each folder is checked when it is let go (evicted, or at
    :meth:`close` with ``check``): walked afresh from the root, it must still be the same
    folder (device and inode), or :class:`LinkInPath` is raised.
    """

    KEEP = 16

    def __init__(self, root: Path | str, *, create: bool) -> None:
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._create = create
        self._open: dict[str, tuple[int, int, int]] = {}  # path -> (fd, st_dev, st_ino), oldest first

    def parent(self, rel: str) -> tuple[int, str]:
        """``(fd of the folder holding rel, rel's last component)``; the fd stays owned here."""
        folder, _, name = rel.rpartition("/")
        return self.folder(folder), name

    def folder(self, path: str) -> int:
        """The open folder ``path`` (``""`` is the root), walked (and made, with ``create``) if not open yet."""
        if not path:
            return self._root
        entry = self._open.pop(path, None)
        if entry is not None:
            self._open[path] = entry  # now the most recently used
            return entry[0]
        fd, pos = self._root, 0
        cut = path.rfind("/")
        while cut > 0:  # the deepest folder on the way that is open already
            entry = self._open.pop(path[:cut], None)
            if entry is not None:
                self._open[path[:cut]] = entry
                fd, pos = entry[0], cut + 1
                break
            cut = path.rfind("/", 0, cut)
        while True:
            end = path.find("/", pos)
            end = len(path) if end < 0 else end
            child = _open_child(fd, path[pos:end], path, self._create)
            st = os.fstat(child)
            self._open[path[:end]] = (child, st.st_dev, st.st_ino)
            if len(self._open) > self.KEEP:
                oldest = next(iter(self._open))
                self._release(oldest, self._open.pop(oldest), check=True)
            if end == len(path):
                return child
            fd, pos = child, end + 1

    def forget(self, rel: str) -> None:
        """Close, unchecked, the open folders at or under ``rel`` (a folder that was removed)."""
        for path in [p for p in self._open if p == rel or p.startswith(rel + "/")]:
            os.close(self._open.pop(path)[0])

    def _release(self, path: str, entry: tuple[int, int, int], check: bool) -> None:
        fd, dev, ino = entry
        os.close(fd)
        if not check:
            return
        try:
            with parent_dir(self._root, path, create=False) as (parent, name):
                again = _open_child(parent, name, path, False)
        except FileNotFoundError:
            again = None
        if again is not None:
            st = os.fstat(again)
            os.close(again)
            if (st.st_dev, st.st_ino) == (dev, ino):
                return
        raise LinkInPath(errno.ELOOP, f"the folder {path!r} was moved or replaced while it was written to")

    def close(self, *, check: bool) -> None:
        """Let go of every folder (checked with ``check``), then of the root; a second call does nothing."""
        if self._root < 0:
            return
        try:
            while self._open:
                path = next(iter(self._open))
                self._release(path, self._open.pop(path), check)
        finally:
            while self._open:
                os.close(self._open.popitem()[1][0])
            os.close(self._root)
            self._root = -1


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
