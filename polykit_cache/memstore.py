"""A store in memory, for tests: app and protocol tests run on it without a disk.

Several instances may share one :class:`Backing` (as several servers share one bucket); the
backing's lock makes a commit's check and write one step, so the first write wins across them.
``capacity`` bounds the bytes held; a stage or commit beyond it is StorageFull.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import replace
from typing import BinaryIO, Iterator, Mapping

from .store import REPLACEABLE, RESERVED_META, Staged, Stat, Store, StorageFull, Usage, check_space


class Backing:
    """The objects several memory stores share: (space, name) -> (Stat, bytes)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], tuple[Stat, bytes]] = {}
        self.used = 0


class _MemoryStaged(Staged):
    """A staged upload in memory, refused once it outgrows the backing's capacity."""

    def __init__(self, capacity: int | None) -> None:
        super().__init__(io.BytesIO())
        self._capacity = capacity

    def write(self, data: bytes) -> None:
        if self._capacity is not None and self.size + len(data) > self._capacity:
            raise StorageFull(f"the memory store holds at most {self._capacity} bytes")
        super().write(data)


class MemoryStore(Store):
    """Objects in a dict; thread-safe."""

    def __init__(self, backing: Backing | None = None) -> None:
        self.backing = backing or Backing()
        self.max_storage = self.backing.capacity
        self.uses: dict[tuple[str, str], float] = {}

    def stat(self, space: str, name: str, use: bool = False) -> Stat | None:
        check_space(space)
        with self.backing.lock:
            found = self.backing.objects.get((space, name))
            if found is not None and use:
                self.uses[(space, name)] = time.time()
        return found[0] if found else None

    def open(self, space: str, name: str, use: bool = True) -> tuple[Stat, BinaryIO] | None:
        check_space(space)
        with self.backing.lock:
            found = self.backing.objects.get((space, name))
            if found is not None and use:
                self.uses[(space, name)] = time.time()
        return (found[0], io.BytesIO(found[1])) if found else None

    def stage(self) -> Staged:
        return _MemoryStaged(self.backing.capacity)

    def commit(self, space: str, name: str, staged: Staged, meta: Mapping[str, object] | None = None) -> bool:
        check_space(space)
        extra = dict(meta or {})
        if RESERVED_META & set(extra):
            raise ValueError(f"metadata may not use {sorted(RESERVED_META & set(extra))}")
        data = staged.fh.getvalue()
        stat = Stat(space, name, len(data), staged.sha256, time.time(), extra)
        with self.backing.lock:
            old = self.backing.objects.get((space, name))
            if old is not None and space not in REPLACEABLE:
                return False
            freed = len(old[1]) if old else 0
            capacity = self.backing.capacity
            if capacity is not None and self.backing.used - freed + len(data) > capacity:
                raise StorageFull(f"the memory store holds at most {capacity} bytes")
            self.backing.objects[(space, name)] = (stat, data)
            self.backing.used += len(data) - freed
        return True

    def delete(self, space: str, name: str) -> bool:
        check_space(space)
        with self.backing.lock:
            old = self.backing.objects.pop((space, name), None)
            if old is not None:
                self.backing.used -= len(old[1])
        return old is not None

    def scan(self, space: str, prefix: str = "") -> Iterator[Stat]:
        check_space(space)
        with self.backing.lock:
            found = [stat for (s, n), (stat, _) in self.backing.objects.items() if s == space and n.startswith(prefix)]
        return iter(found)

    def usage(self) -> Usage:
        with self.backing.lock:
            return Usage(len(self.backing.objects), self.backing.used, 0)

    def fits(self, size: int) -> bool:
        return self.backing.capacity is None or size <= self.backing.capacity

    def corrupt(self, space: str, name: str, data: bytes) -> None:
        """Replace an object's bytes behind the store's back, keeping its metadata (for tests)."""
        with self.backing.lock:
            stat, _ = self.backing.objects[(space, name)]
            self.backing.objects[(space, name)] = (replace(stat, size=len(data)), data)
