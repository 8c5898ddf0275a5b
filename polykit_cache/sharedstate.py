"""State that the worker processes of one server share: an SQLite database in WAL mode.

With ``--workers N`` every worker answers requests on its own, yet ``/metrics`` and
``/v1/stats`` must count every worker's requests whichever worker answers the scrape. So each
worker adds its counts to one table here at the end of every request, in one short
transaction, and a scrape sums the table. SQLite serialises writers across processes with its
own file locks, and WAL mode (https://sqlite.org/wal.html) lets readers go on beside a writer.

The figures are counters, not data: they need no durability, so commits do not sync
(``synchronous=OFF``); a power loss forgets counts, never an artifact. The supervisor empties
the table when the server starts, as a restarted single process starts its counters at zero.
A worker that crashes loses nothing it counted: its counts were committed request by request.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

# The database beside the stored objects (the disk store's folder, or the S3 store's tier).
FILE_NAME = "server-state.sqlite3"
# How long a worker waits for another's write transaction before giving up (they last microseconds).
BUSY_TIMEOUT_MS = 30_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (series TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
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

    def add(self, deltas: Mapping[tuple, float]) -> None:
        """Add counts to their series, all in one transaction."""
        if not deltas:
            return
        rows = [(json.dumps(series), value) for series, value in deltas.items()]
        with self._lock:
            begin_write(self._db)
            try:
                self._db.executemany(
                    "INSERT INTO counters VALUES (?, ?) ON CONFLICT(series) DO UPDATE SET value = value + excluded.value",
                    rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def totals(self) -> dict[tuple, float]:
        """Every series with its total over all workers."""
        with self._lock:
            rows: Iterable[tuple[str, float]] = self._db.execute("SELECT series, value FROM counters").fetchall()
        return {_series(text): value for text, value in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _series(text: str) -> tuple:
    """A series name back from its JSON (lists become tuples, so it is a dictionary key again)."""
    return tuple(json.loads(text))
