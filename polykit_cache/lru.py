"""The disk store's index of entries: sizes, what they cost against ``--max-storage``, and the
least-recently-used order that eviction follows.

Two implementations of one interface:

- :class:`MemoryIndex`, one process's ordered dictionary (a single server process);
- :class:`SharedIndex`, a table in the workers' shared SQLite database (``--workers N``), so the
  bound is one bound over every worker's uploads and the order counts every worker's reads.

Both are rebuilt from the files at start-up (sizes and mtimes; see ``Storage.load_index``): the
index is a cache of what the folder holds, never the only record of it. Each use is also
written to the file's mtime now and then (:attr:`PERSIST_USE_NS`), so the order survives a
restart without a write per read.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from .sharedstate import begin_write, connect

# A use is written to the file's mtime at most this often.
PERSIST_USE_NS = 60 * 10**9
# Entries whose last written use a worker remembers (then it forgets them all and starts again).
RECENT_USES = 65536


class MemoryIndex:
    """The index of one process; thread-safe."""

    def __init__(self, cost_of: Callable[[int], int]) -> None:
        self._cost_of = cost_of
        self._lock = threading.Lock()
        # key -> [last use in ns, size, last use written to the file's mtime], least recently used first
        self._uses: OrderedDict[str, list[int]] = OrderedDict()
        self.count = self.bytes = self.cost = self.evictions = 0

    def load(self, entries: Iterable[tuple[str, int, int]]) -> None:
        """Replace the index with (key, last use in ns, size) entries."""
        ordered = OrderedDict((key, [used, size, used]) for key, used, size in sorted(entries, key=lambda e: e[1]))
        with self._lock:
            self._uses = ordered
            self.count = len(ordered)
            self.bytes = sum(use[1] for use in ordered.values())
            self.cost = sum(self._cost_of(use[1]) for use in ordered.values())

    def entries(self) -> list[tuple[str, int, int]]:
        """Every (key, last use in ns, size), to hand the index over to a shared one."""
        with self._lock:
            return [(key, use[0], use[1]) for key, use in self._uses.items()]

    def add(self, key: str, size: int, now: int) -> None:
        """Record a new entry, or a replaced one, as just used."""
        with self._lock:
            old = self._uses.pop(key, None)
            if old is not None:
                self._drop(old[1])
            self._uses[key] = [now, size, now]
            self.count += 1
            self.bytes += size
            self.cost += self._cost_of(size)

    def remove(self, key: str) -> bool:
        """Forget an entry; False when it was not indexed."""
        with self._lock:
            use = self._uses.pop(key, None)
            if use is not None:
                self._drop(use[1])
            return use is not None

    def _drop(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        self.cost -= self._cost_of(size)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._uses

    def touch(self, key: str, now: int) -> bool:
        """Record a use; True when it is time to write it to the file's mtime too."""
        with self._lock:
            use = self._uses.get(key)
            if use is None:
                return False
            use[0] = now
            self._uses.move_to_end(key)
            if now - use[2] > PERSIST_USE_NS:
                use[2] = now
                return True
            return False

    def take_victims(self, limit: int) -> list[tuple[str, int]]:
        """Remove least recently used entries until the cost is within ``limit``; their (key, size)."""
        victims: list[tuple[str, int]] = []
        with self._lock:
            while self._uses and self.cost > limit:
                key, (_, size, _) = self._uses.popitem(last=False)
                self._drop(size)
                victims.append((key, size))
            self.evictions += len(victims)
        return victims

    def totals(self) -> tuple[int, int, int]:
        """(entries, bytes, evictions so far)."""
        with self._lock:
            return self.count, self.bytes, self.evictions

    def total_cost(self) -> int:
        with self._lock:
            return self.cost

    def use_range(self) -> tuple[int, int] | None:
        """Last use (ns) of the least and of the most recently used entry."""
        with self._lock:
            times = [use[0] for use in self._uses.values()]
        return (min(times), max(times)) if times else None


SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, cost INTEGER NOT NULL,
    used INTEGER NOT NULL, persisted INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_use ON entries (used);
CREATE TABLE IF NOT EXISTS entry_totals (
    id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    cost INTEGER NOT NULL, evictions INTEGER NOT NULL, uses INTEGER NOT NULL);
INSERT OR IGNORE INTO entry_totals VALUES (1, 0, 0, 0, 0, 0);
"""


class SharedIndex:
    """The index in the shared database: every change is one transaction, seen by every worker.

    The running totals live in a row of their own, changed in the same transaction as the
    entries, so reading them never sums the table. The row also numbers the writes that change
    the order (``uses``): a use of the entry whose write was the last of them changes nothing,
    so it is not written again (a popular entry read over and over takes the one write lock once). A write lasts microseconds; SQLite
    serialises the workers' writes with its file locks (WAL mode, see :mod:`.sharedstate`).
    """

    def __init__(self, path: Path | str, cost_of: Callable[[int], int]) -> None:
        self.path = Path(path)
        self._cost_of = cost_of
        self._lock = threading.Lock()
        self._db = connect(self.path)
        self._db.executescript(SCHEMA)
        # key -> (the order number of this worker's last write of its use, its last use written to the file)
        self._recent: dict[str, tuple[int, int]] = {}

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> object:
        with self._lock:
            begin_write(self._db)
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def load(self, entries: Iterable[tuple[str, int, int]]) -> None:
        rows = [(key, size, self._cost_of(size), used, used) for key, used, size in entries]

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM entries")
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("UPDATE entry_totals SET count = (SELECT COUNT(*) FROM entries),"
                       " bytes = (SELECT COALESCE(SUM(size), 0) FROM entries),"
                       " cost = (SELECT COALESCE(SUM(cost), 0) FROM entries), evictions = 0")

        self._write(work)

    def add(self, key: str, size: int, now: int) -> None:
        cost = self._cost_of(size)

        def work(db: sqlite3.Connection) -> None:
            _delete(db, key)
            db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", (key, size, cost, now, now))
            db.execute("UPDATE entry_totals SET count = count + 1, bytes = bytes + ?, cost = cost + ?,"
                       " uses = uses + 1", (size, cost))

        self._write(work)

    def remove(self, key: str) -> bool:
        return bool(self._write(lambda db: _delete(db, key)))

    def contains(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None

    def touch(self, key: str, now: int) -> bool:
        with self._lock:
            (uses,) = self._db.execute("SELECT uses FROM entry_totals").fetchone()  # a read: no lock taken
            number, persisted = self._recent.get(key, (-1, 0))
            if number == uses and now - persisted <= PERSIST_USE_NS:
                return False  # it is the most recently used already

        def work(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT persisted FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return False
            persist = now - row[0] > PERSIST_USE_NS
            persisted = now if persist else row[0]
            db.execute("UPDATE entries SET used = ?, persisted = ? WHERE key = ?", (now, persisted, key))
            db.execute("UPDATE entry_totals SET uses = uses + 1")
            (number,) = db.execute("SELECT uses FROM entry_totals").fetchone()
            if len(self._recent) >= RECENT_USES:
                self._recent.clear()
            self._recent[key] = (number, persisted)
            return persist

        return bool(self._write(work))

    def take_victims(self, limit: int) -> list[tuple[str, int]]:
        def work(db: sqlite3.Connection) -> list[tuple[str, int]]:
            (cost,) = db.execute("SELECT cost FROM entry_totals").fetchone()
            victims: list[tuple[str, int]] = []
            if cost <= limit:
                return victims
            for key, size, entry_cost in db.execute("SELECT key, size, cost FROM entries ORDER BY used"):
                if cost <= limit:
                    break
                victims.append((key, size))
                cost -= entry_cost
            db.executemany("DELETE FROM entries WHERE key = ?", [(key,) for key, _ in victims])
            db.execute("UPDATE entry_totals SET count = count - ?, bytes = bytes - ?, cost = ?,"
                       " evictions = evictions + ?", (len(victims), sum(s for _, s in victims), cost, len(victims)))
            return victims

        return self._write(work)  # type: ignore[return-value]

    def totals(self) -> tuple[int, int, int]:
        with self._lock:
            count, size, evictions = self._db.execute("SELECT count, bytes, evictions FROM entry_totals").fetchone()
        return count, size, evictions

    def total_cost(self) -> int:
        with self._lock:
            return self._db.execute("SELECT cost FROM entry_totals").fetchone()[0]

    def use_range(self) -> tuple[int, int] | None:
        with self._lock:
            low, high = self._db.execute("SELECT MIN(used), MAX(used) FROM entries").fetchone()
        return (low, high) if low is not None else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _delete(db: sqlite3.Connection, key: str) -> bool:
    """Remove an entry and take it out of the totals; False when there was none."""
    row = db.execute("SELECT size, cost FROM entries WHERE key = ?", (key,)).fetchone()
    if row is None:
        return False
    db.execute("DELETE FROM entries WHERE key = ?", (key,))
    db.execute("UPDATE entry_totals SET count = count - 1, bytes = bytes - ?, cost = cost - ?", row)
    return True
