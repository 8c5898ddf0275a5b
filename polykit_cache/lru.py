"""The disk store's index of entries: sizes, what they cost against ``--max-storage``, and the
least-recently-used order that eviction follows.

Two implementations of one interface:

- :class:`MemoryIndex`, one process's ordered dictionary (a single server process);
- :class:`SharedIndex`, a table in the workers' shared SQLite database (``--workers N``), so the
  bound is one bound over every worker's uploads and the order counts every worker's reads.

Both are rebuilt from the files at start-up (sizes and mtimes; see ``Storage.load_index``): the
index is a cache of what the folder holds, never the only record of it. The storage also
writes a use to the file's mtime when the mtime is older than :data:`PERSIST_USE_NS`, so the
order survives a restart without a write per read.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

from .sharedstate import begin_write, connect

# A use is written to the file's mtime at most this often (see Storage.touch).
PERSIST_USE_NS = 60 * 10**9
# Uses a worker gathers before it writes them without waiting for its timer (bounds its memory).
MAX_PENDING_USES = 4096


class MemoryIndex:
    """The index of one process; thread-safe."""

    def __init__(self, cost_of: Callable[[int], int]) -> None:
        self._cost_of = cost_of
        self._lock = threading.Lock()
        # key -> [last use in ns, size], least recently used first
        self._uses: OrderedDict[str, list[int]] = OrderedDict()
        self.count = self.bytes = self.cost = self.evictions = 0

    def load(self, entries: Iterable[tuple[str, int, int]]) -> None:
        """Replace the index with (key, last use in ns, size) entries."""
        ordered = OrderedDict((key, [used, size]) for key, used, size in sorted(entries, key=lambda e: e[1]))
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
            self._uses[key] = [now, size]
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

    def touch(self, key: str, now: int) -> None:
        """Record a use of an entry (nothing for a key not indexed)."""
        with self._lock:
            use = self._uses.get(key)
            if use is not None:
                use[0] = now
                self._uses.move_to_end(key)

    def flush(self) -> None:
        """Nothing to write: every use is in the order at once."""

    def take_victims(self, limit: int) -> list[tuple[str, int]]:
        """Remove least recently used entries until the cost is within ``limit``; their (key, size)."""
        victims: list[tuple[str, int]] = []
        with self._lock:
            while self._uses and self.cost > limit:
                key, (_, size) = self._uses.popitem(last=False)
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


# The tables of the index; dropped and made anew by every load (the index is rebuilt at each start).
TABLES = (
    "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, size INTEGER NOT NULL, cost INTEGER NOT NULL,"
    " used INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_by_use ON entries (used)",
    "CREATE TABLE IF NOT EXISTS entry_totals (id INTEGER PRIMARY KEY CHECK (id = 1), count INTEGER NOT NULL,"
    " bytes INTEGER NOT NULL, cost INTEGER NOT NULL, evictions INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO entry_totals (id, count, bytes, cost, evictions) VALUES (1, 0, 0, 0, 0)",
)


class SharedIndex:
    """The index in the shared database, seen by every worker.

    Entries come and go in one transaction each, with the running totals in a row of their
    own changed in the same transaction: the ``--max-storage`` bound is exact in bytes over
    every worker's uploads, and reading the totals never sums the table.

    Uses are gathered instead: a read must not wait for SQLite's write lock, so each worker
    keeps the latest use of each key it served in memory and writes them all in one
    transaction (:meth:`flush`), on its timer (:mod:`.flusher`, every
    :data:`.sharedstate.FLUSH_SECONDS`), when it has gathered :data:`MAX_PENDING_USES`, and
    before it chooses victims. So the order an eviction follows counts this worker's reads
    exactly and another worker's up to its last tick: an entry read by another worker within
    the last tenth of a second may be evicted as if it had not been, never an entry beyond
    the bound. A use is written as the later of the two (``MAX``), so batches may land in any order.
    """

    def __init__(self, path: Path | str, cost_of: Callable[[int], int]) -> None:
        self.path = Path(path)
        self._cost_of = cost_of
        self._lock = threading.Lock()
        self._db = connect(self.path)
        self._write(lambda db: [db.execute(sql) for sql in TABLES])
        self._pending: dict[str, int] = {}  # key -> latest use this worker has not written yet
        self._pending_lock = threading.Lock()

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
        rows = [(key, size, self._cost_of(size), used) for key, used, size in entries]

        def work(db: sqlite3.Connection) -> None:
            # Made anew, so a database left by another version of the server never matters.
            db.execute("DROP TABLE IF EXISTS entries")
            db.execute("DROP TABLE IF EXISTS entry_totals")
            for sql in TABLES:
                db.execute(sql)
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?)", rows)
            db.execute("UPDATE entry_totals SET count = (SELECT COUNT(*) FROM entries),"
                       " bytes = (SELECT COALESCE(SUM(size), 0) FROM entries),"
                       " cost = (SELECT COALESCE(SUM(cost), 0) FROM entries), evictions = 0")

        with self._pending_lock:
            self._pending.clear()
        self._write(work)

    def add(self, key: str, size: int, now: int) -> None:
        cost = self._cost_of(size)

        def work(db: sqlite3.Connection) -> None:
            _delete(db, key)
            db.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", (key, size, cost, now))
            db.execute("UPDATE entry_totals SET count = count + 1, bytes = bytes + ?, cost = cost + ?", (size, cost))

        self._write(work)

    def remove(self, key: str) -> bool:
        return bool(self._write(lambda db: _delete(db, key)))

    def contains(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None

    def touch(self, key: str, now: int) -> None:
        """Gather a use; it is written with the next batch (nothing is written for a key not indexed)."""
        with self._pending_lock:
            if now > self._pending.get(key, -1):
                self._pending[key] = now
            full = len(self._pending) >= MAX_PENDING_USES
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the gathered uses, in one transaction; kept for the next try if that fails."""
        with self._pending_lock:
            if not self._pending:
                return
        self._write(self._apply_uses)

    def _apply_uses(self, db: sqlite3.Connection) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        try:
            db.executemany("UPDATE entries SET used = MAX(used, ?) WHERE key = ?",
                           [(used, key) for key, used in pending.items()])
        except BaseException:
            with self._pending_lock:
                for key, used in pending.items():
                    if used > self._pending.get(key, -1):
                        self._pending[key] = used
            raise

    def take_victims(self, limit: int) -> list[tuple[str, int]]:
        def work(db: sqlite3.Connection) -> list[tuple[str, int]]:
            (cost,) = db.execute("SELECT cost FROM entry_totals").fetchone()
            victims: list[tuple[str, int]] = []
            if cost <= limit:
                return victims
            self._apply_uses(db)  # this worker's own reads count before anything is chosen
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
