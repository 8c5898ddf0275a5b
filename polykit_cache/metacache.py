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
then takes one ``stat`` and no ``open``, ``read`` or ``close``.

The cache is bounded: at most ``limit`` copies and, for bytes, at most ``max_bytes`` of them
together, the oldest dropped first.
"""

from __future__ import annotations

import os
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

Identity = tuple[int, int, int, int]


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

    def put(self, key: str, st: os.stat_result, value: T) -> None:
        """Keep ``value`` for the file ``st`` describes (the oldest copies make room at the bounds)."""
        size = 0 if self._max_bytes is None else len(value)  # type: ignore[arg-type]
        if self._max_bytes is not None and size > self._max_bytes:
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
