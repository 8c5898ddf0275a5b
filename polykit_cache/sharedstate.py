"""State that the worker processes of one server share: an SQLite database in WAL mode.

With ``--workers N`` every worker answers requests on its own, yet ``/metrics`` and
``/v1/stats`` must count every worker's requests whichever worker answers the scrape. A
transaction per request would cost a worker more than a small request itself, so each worker
sums its counts in memory and adds them to one table here in batches: every
:data:`FLUSH_SECONDS` (see :mod:`.flusher`), and when it stops. SQLite serialises writers
across processes with its own file locks, and WAL mode (https://sqlite.org/wal.html) lets
readers go on beside a writer.

A scrape still counts every request answered before it, whichever worker answered: the
worker answering it adds its own counts, then asks the others (:meth:`SharedState.settle`) and
waits until each live worker has written a batch taken after the scrape began. Each worker
records in the ``workers`` table when it took its last batch (``time.monotonic()``, one clock
for every process of the machine), and looks at the wanted time (``scrapes``) on its timer even when
it has nothing to add. What a scrape may miss: the counts of a worker that does not write
within :data:`SETTLE_SECONDS` (stopped or stuck), since its last batch; they show in the next
scrape after it writes. A worker killed with SIGKILL loses what it counted since its last
batch (at most :data:`FLUSH_SECONDS` of its requests).

The figures are counters, not data: they need no durability, so commits do not sync
(``synchronous=OFF``); a power loss forgets counts, never an artifact. The supervisor empties
the table when the server starts, as a restarted single process starts its counters at zero.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

# The database beside the stored objects (the disk store's folder, or the S3 store's tier).
FILE_NAME = "server-state.sqlite3"
# How long a worker waits for another's write transaction before giving up (they last microseconds).
BUSY_TIMEOUT_MS = 30_000

# How often a worker adds its counts (and its uses, see lru.py) to the database, in seconds.
FLUSH_SECONDS = 0.1
# How long a scrape waits for the other workers' batches before answering without a silent one's.
SETTLE_SECONDS = 2.0
# How often a waiting scrape looks again, in seconds.
SETTLE_POLL = 0.002

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (series TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (slot INTEGER PRIMARY KEY, pid INTEGER NOT NULL, flushed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS scrapes (id INTEGER PRIMARY KEY CHECK (id = 1), wanted REAL NOT NULL);
INSERT OR IGNORE INTO scrapes VALUES (1, 0);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection for one process's threads (callers hold their own lock around it), in WAL mode.

    Transactions are opened by hand (``BEGIN IMMEDIATE``: the write lock at once, so two
    workers never both read then fail to upgrade). Nothing here needs to survive a power loss
    (counters start at zero, the index is rebuilt from the files at start-up), so no commit syncs.
    """
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    return db


# Waits for another process's write transaction, in seconds: short at first (they last tens of
# microseconds), longer after each try.
WRITE_WAIT_FIRST, WRITE_WAIT_MOST = 50e-6, 2e-3


def begin_write(db: sqlite3.Connection) -> None:
    """Open a write transaction (``BEGIN IMMEDIATE``), waiting for another process's in short steps.

    SQLite's own busy handler sleeps a whole millisecond and more between tries, longer than a
    cached request takes; writes here last microseconds, so a worker tries again sooner.
    """
    delay = WRITE_WAIT_FIRST
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    db.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not str(exc).startswith(("database is locked", "database is busy")) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, WRITE_WAIT_MOST)
    finally:
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


class SharedState:
    """One process's connection to the shared database; thread-safe (one connection, one lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = connect(self.path)
        self._db.executescript(SCHEMA)
        self.slot: int | None = None  # this process's worker slot, once it joined

    @classmethod
    def create(cls, folder: Path | str) -> "SharedState":
        """A fresh state for a server starting on ``folder``: counters at zero, the start time recorded."""
        path = Path(folder) / FILE_NAME
        try:
            state = cls(path)
        except sqlite3.DatabaseError:
            # Damaged (a disk error, a copy made mid-write): it only ever holds what a start
            # rebuilds, so it is made anew.
            for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                name.unlink(missing_ok=True)
            state = cls(path)
        with state._lock:
            state._db.execute("BEGIN IMMEDIATE")
            state._db.execute("DELETE FROM counters")
            state._db.execute("DELETE FROM workers")
            state._db.execute("UPDATE scrapes SET wanted = 0")
            state._db.execute("INSERT OR REPLACE INTO settings VALUES ('started', ?)", (repr(time.time()),))
            state._db.execute("COMMIT")
        return state

    def reopen(self) -> "SharedState":
        """A new connection to the same database (a forked worker must not share its parent's)."""
        return SharedState(self.path)

    def started(self) -> float:
        """When the server (not this worker) started, in seconds since the epoch."""
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = 'started'").fetchone()
        return float(row[0]) if row else time.time()

    def join(self, slot: int) -> None:
        """Take part as worker ``slot`` (a restarted worker takes its predecessor's row): scrapes
        wait for this process's batches from now on, and it has nothing unwritten yet."""
        self.slot = slot
        with self._lock:
            begin_write(self._db)
            self._db.execute("INSERT OR REPLACE INTO workers VALUES (?, ?, ?)", (slot, os.getpid(), time.monotonic()))
            self._db.execute("COMMIT")

    def leave(self) -> None:
        """A worker stopping (after its last batch): scrapes no longer wait for it."""
        if self.slot is None:
            return
        with self._lock:
            begin_write(self._db)
            self._db.execute("DELETE FROM workers WHERE slot = ? AND pid = ?", (self.slot, os.getpid()))
            self._db.execute("COMMIT")
        self.slot = None

    def add(self, deltas: Mapping[tuple, float], taken: float | None = None) -> None:
        """Add a batch of counts to their series, all in one transaction.

        ``taken`` is when the batch was taken (``time.monotonic()``): every count made before
        then is in it or in an earlier batch, which is what a scrape waits for (:meth:`settle`).
        """
        if not deltas and taken is None:
            return
        rows = [(json.dumps(series), value) for series, value in deltas.items()]
        with self._lock:
            begin_write(self._db)
            try:
                self._db.executemany(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT(series) DO UPDATE SET value = value + excluded.value",
                    rows)
                if taken is not None and self.slot is not None:
                    self._db.execute("UPDATE workers SET flushed = MAX(flushed, ?) WHERE slot = ? AND pid = ?",
                                     (taken, self.slot, os.getpid()))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def wanted(self, since: float) -> bool:
        """Whether a scrape waits for a batch taken after ``since`` (this worker's last one)."""
        with self._lock:
            (wanted,) = self._db.execute("SELECT wanted FROM scrapes").fetchone()
        return wanted > since

    def settle(self, since: float, seconds: float = SETTLE_SECONDS) -> list[int]:
        """Wait until every other live worker has written a batch taken after ``since``; returns
        the slots of those that did not within ``seconds`` (their latest counts are missing)."""
        with self._lock:
            begin_write(self._db)
            self._db.execute("UPDATE scrapes SET wanted = MAX(wanted, ?)", (since,))
            self._db.execute("COMMIT")
        deadline = time.monotonic() + seconds
        while True:
            with self._lock:
                behind = self._db.execute("SELECT slot, pid FROM workers WHERE flushed < ? AND pid != ?",
                                          (since, os.getpid())).fetchall()
            behind = [slot for slot, pid in behind if _alive(pid)]
            if not behind or time.monotonic() > deadline:
                return behind
            time.sleep(SETTLE_POLL)

    def totals(self) -> dict[tuple, float]:
        """Every series with its total over all workers."""
        with self._lock:
            rows: Iterable[tuple[str, float]] = self._db.execute("SELECT series, value FROM counters").fetchall()
        return {_series(text): value for text, value in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _alive(pid: int) -> bool:
    """Whether a worker's process is still there (a killed one's batches will never come)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the number was reused by another user's process: not a worker
        return False
    return True


def _series(text: str) -> tuple:
    """A series name back from its JSON (lists become tuples, so it is a dictionary key again)."""
    return tuple(json.loads(text))
