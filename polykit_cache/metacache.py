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

The cache is bounded: at most ``limit`` copies, the oldest dropped first.
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
    """Values by key, each returned only for a file whose stat has the identity it was stored with."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._items: dict[str, tuple[Identity, T]] = {}

    def get(self, key: str, st: os.stat_result) -> T | None:
        """The value kept for ``key`` if it was read from the file ``st`` describes, else None."""
        found = self._items.get(key)
        if found is not None and found[0] == identity(st):
            return found[1]
        return None

    def put(self, key: str, st: os.stat_result, value: T) -> None:
        """Keep ``value`` for the file ``st`` describes (the oldest copy makes room at the bound)."""
        with self._lock:
            self._items.pop(key, None)
            if len(self._items) >= self._limit:
                self._items.pop(next(iter(self._items)))
            self._items[key] = (identity(st), value)

    def pop(self, key: str, default: object = None) -> object:
        """Drop the copy of ``key`` (its entry was removed or replaced)."""
        with self._lock:
            found = self._items.pop(key, None)
        return default if found is None else found[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
