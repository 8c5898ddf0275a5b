"""Entry metadata kept in memory, each copy used only for the very file it was read from.

Reading an entry's metadata costs a ``getxattr`` (or a file read) and a JSON parse on every GET
and HEAD; the ``stat`` or ``fstat`` the read path takes anyway says whether a copy kept from an
earlier request still belongs to the file: same inode on the same device, same size and same
inode change time (``ctime``). Every change of an entry makes a new file or changes its ctime,
whichever worker process made it:

- a new upload (also one replacing an entry, or one after an eviction) is a new file, linked
  or renamed from its own temporary;
- setting the metadata attribute, and recording a use as the file's mtime, change the ctime;
- a deleted or evicted entry has no file to stat, so its copy is never reached (and is dropped
  by the worker that removed it).

Only a new file of the same size on a reused inode number, linked within one tick of the
filesystem's clock of the old one's last change, would match; its ``Content-Length`` is right
all the same, and clients check the body against its digest.

The same rule keeps the bytes of small entries (see ``Storage``): a GET of a popular entry
then takes one ``stat`` and no ``open``, ``read`` or ``close``. Wrong bytes would be a wrong
answer (a Bazel action result or a key-value entry carries no digest a client checks), so bytes
are kept only for a file whose ctime is older than its stat by ``SETTLE_NS`` (see :func:`settled`).

The cache is bounded: at most ``limit`` copies and, for bytes, at most ``max_bytes`` of them
together, the oldest dropped first.
"""

from __future__ import annotations

import os
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

Identity = tuple[int, int, int, int]

# Timestamps come from a clock that ticks coarsely (the kernel's coarse clock, some milliseconds;
# whole seconds on some filesystems), so a change within one tick of the last one (a file
# rewritten in place, a new file on a reused inode number) can leave the ctime as it was. Two
# seconds cover both ticks and the coarse clock's lag behind the system clock.
SETTLE_NS = 2 * 10**9


def settled(st: os.stat_result, seen_ns: int) -> bool:
    """Whether any later change of the file ``st`` describes must give it another ctime.

    ``seen_ns``: the system clock read before the stat was taken, the file then open (so its inode
    cannot be reused meanwhile). A change after the stat is stamped at least ``seen_ns`` less a
    tick; if the ctime seen is older than that by more than a tick, the new ctime differs from it.
    This is git's rule for "racily clean" index entries.
    """
    return st.st_ctime_ns < seen_ns - SETTLE_NS


def identity(st: os.stat_result) -> Identity:
    """What must not change for a copy of a file's metadata to stay valid."""
    return st.st_ino, st.st_dev, st.st_size, st.st_ctime_ns


class IdentityCache(Generic[T]):
    """Values by key, each returned only for a file whose stat has the identity it was stored with.

    With ``max_bytes``, the values are ``bytes`` and their lengths together stay within it.
    """

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self._limit = limit
        self._max_bytes = max_bytes
        self._bytes = 0  # the lengths of the values kept, when max_bytes bounds them
        self._lock = threading.Lock()
        self._items: dict[str, tuple[Identity, T]] = {}

    def get(self, key: str, st: os.stat_result) -> T | None:
        """The value kept for ``key`` if it was read from the file ``st`` describes, else None."""
        found = self._items.get(key)
        if found is not None and found[0] == identity(st):
            return found[1]
        return None

    def put(self, key: str, st: os.stat_result, value: T, seen_ns: int | None = None) -> None:
        """Keep ``value`` for the file ``st`` describes (the oldest copies make room at the bounds).

        With ``seen_ns`` (see :func:`settled`), a file changed too recently for its identity to
        tell a later change is not kept (a GET reads it again until it has settled).
        """
        size = 0 if self._max_bytes is None else len(value)  # type: ignore[arg-type]
        if self._max_bytes is not None and size > self._max_bytes or seen_ns is not None and not settled(st, seen_ns):
            self.pop(key)
            return
        with self._lock:
            self._drop(key)
            while self._items and (len(self._items) >= self._limit
                                   or self._max_bytes is not None and self._bytes + size > self._max_bytes):
                self._drop(next(iter(self._items)))
            self._items[key] = (identity(st), value)
            self._bytes += size

    def _drop(self, key: str) -> T | None:
        found = self._items.pop(key, None)
        if found is None:
            return None
        if self._max_bytes is not None:
            self._bytes -= len(found[1])  # type: ignore[arg-type]
        return found[1]

    def pop(self, key: str, default: object = None) -> object:
        """Drop the copy of ``key`` (its entry was removed or replaced)."""
        with self._lock:
            found = self._drop(key)
        return default if found is None else found

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        """The lengths of the values kept together (0 unless ``max_bytes`` bounds them)."""
        return self._bytes

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
