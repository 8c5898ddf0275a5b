"""What the cache did over time, and what each package's tasks save: kept in sqlite in the storage folder.

The application feeds this module its events (a lookup, an upload, a refusal, an artifact stored
or served); the status page, ``/v1/stats`` and ``/metrics`` read it back. Figures go to time
buckets (one a minute for a day, one an hour for a month) and to per-task totals, so a restart
keeps them. Events are summed in memory and written at most every ``FLUSH_SECONDS`` (and before
every read), so a request never waits for the disk; a crash loses at most those seconds.

The history only ever describes the cache: a database that cannot be written (a full disk, a
damaged file) costs a warning at most once a minute, never an answer; pending sums are kept
and written by a later flush.

Every table is bounded in rows whatever clients send: buckets by age, tasks and artifacts by
count (the least recently seen go first), and the stored key components by ``MAX_COMPONENTS``
bytes each (the manifest check bounds them before an upload is accepted).

What a hit saves: a polykit artifact's manifest carries ``duration_ms``, the time its task took
to build; each download of it (``GET``, not ``HEAD`` or a ``304``) saved a build that long.
Per task, *hits* are those downloads and *misses* the artifacts uploaded for it (each one built
after a miss). Tasks and artifacts are told apart by URL namespace (``""`` for none), as the
storage tells them apart.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from polykit_client.artifact import MAX_COMPONENTS

log = logging.getLogger("polykit_cache.history")

FILE_NAME = "status.sqlite3"
FLUSH_SECONDS = 5.0
MINUTE, HOUR, DAY = 60, 3600, 86400
KEEP_MINUTES = DAY  # minute buckets cover the last day
KEEP_HOURS = 30 * DAY  # hour buckets the last thirty days
MAX_TASKS = 1000  # packages' tasks with totals, and with the components of their newest artifact
MAX_ARTIFACTS = 100_000  # artifacts whose package, task and duration are known without opening them
SERVED_CACHE = 16384  # of those, the ones kept in memory by each worker (see History.served)
MAX_NAME = 200  # a package or task name longer than this is not indexed
TOP = 10  # tasks listed as saving most and as missing most
COUNTERS = ("hits", "misses", "uploads", "rejected", "bytes_in", "bytes_out", "saved_ms")
_COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_HITS, _MISSES, _BYTES_OUT = _COUNTER_INDEX["hits"], _COUNTER_INDEX["misses"], _COUNTER_INDEX["bytes_out"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS minutes (t INTEGER, protocol TEXT, {", ".join(f"{c} INTEGER DEFAULT 0" for c in COUNTERS)},
                                    PRIMARY KEY (t, protocol));
CREATE TABLE IF NOT EXISTS hours (t INTEGER, protocol TEXT, {", ".join(f"{c} INTEGER DEFAULT 0" for c in COUNTERS)},
                                  PRIMARY KEY (t, protocol));
CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, value INTEGER);
CREATE TABLE IF NOT EXISTS tasks (namespace TEXT, package TEXT, task TEXT, hits INTEGER DEFAULT 0,
                                  misses INTEGER DEFAULT 0, saved_ms INTEGER DEFAULT 0, last_seen REAL,
                                  PRIMARY KEY (namespace, package, task));
CREATE TABLE IF NOT EXISTS artifacts (namespace TEXT, key TEXT, package TEXT, task TEXT, duration_ms INTEGER,
                                      PRIMARY KEY (namespace, key));
CREATE TABLE IF NOT EXISTS newest (namespace TEXT, package TEXT, task TEXT, key TEXT, stored_at REAL,
                                   created_at INTEGER, duration_ms INTEGER, components TEXT,
                                   PRIMARY KEY (namespace, package, task));
"""


def _name_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME


def _duration(meta: dict) -> int:
    value = meta.get("duration_ms")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _rate(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None


class History:
    """The server's figures over time, in one sqlite database; thread-safe."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time, *, max_tasks: int = MAX_TASKS,
                 max_artifacts: int = MAX_ARTIFACTS) -> None:
        self.path = str(path)
        self._clock = clock
        self.max_tasks, self.max_artifacts = max_tasks, max_artifacts
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            # WAL: a flush appends and does not wait for a sync of the whole file (sqlite.org/wal.html).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._pending: dict[tuple[int, str], list[int]] = {}
        self._pending_tasks: dict[tuple[str, str, str], list[int]] = {}
        # (namespace, key) -> (the upload's version, (package, task, duration)); see served().
        self._served: dict[tuple[str, str], tuple[object, tuple]] = {}
        self._flushed = clock()
        self._warned = float("-inf")

    def _failed(self, what: str, exc: Exception) -> None:
        """A write that failed: one warning a minute at most; the request goes on."""
        now = time.monotonic()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("the status history could not %s (%s); the cache itself is not affected", what, exc)

    @classmethod
    def open(cls, folder: Path, clock: Callable[[], float] = time.time) -> "History":
        """The history kept in a storage folder; in memory only (with a warning) if the file cannot be used."""
        try:
            return cls(Path(folder) / FILE_NAME, clock)
        except (sqlite3.Error, OSError) as exc:
            log.warning("the status history cannot be kept in %s (%s); it lasts until the server stops",
                        Path(folder) / FILE_NAME, exc)
            return cls(":memory:", clock)

    # --- events ------------------------------------------------------------------------------

    def count(self, protocol: str, **counters: int) -> None:
        """Add to the current minute's bucket of a protocol (counters named in ``COUNTERS``)."""
        self._add(protocol, [(_COUNTER_INDEX[name], value) for name, value in counters.items()])

    def lookup(self, protocol: str, hit: bool, bytes_out: int = 0) -> None:
        """A hit (``bytes_out`` sent) or a miss: :meth:`count` without naming the counters, as
        every GET and HEAD counts one."""
        self._add(protocol, ((_HITS, 1), (_BYTES_OUT, bytes_out)) if hit else ((_MISSES, 1),))

    def _add(self, protocol: str, added) -> None:
        now = self._clock()
        bucket = int(now // MINUTE) * MINUTE
        with self._lock:
            row = self._pending.get((bucket, protocol))
            if row is None:
                row = self._pending[(bucket, protocol)] = [0] * len(COUNTERS)
            for index, value in added:
                row[index] += value
            due = now - self._flushed >= FLUSH_SECONDS
        if due:
            self.flush()

    def stored(self, key: str, meta: dict, namespace: str = "") -> None:
        """A verified polykit artifact was stored: remember whose it is and index it as its task's newest."""
        package, task = meta.get("package"), meta.get("task")
        if not (_name_ok(package) and _name_ok(task)):
            return
        components = meta.get("components")
        blob = json.dumps(components, sort_keys=True, separators=(",", ":")) if isinstance(components, dict) else None
        if blob is not None and len(blob) > MAX_COMPONENTS:
            blob = None  # the manifest check refuses this already; never store more than the bound
        created = meta.get("created_at") if isinstance(meta.get("created_at"), int) else None
        with self._lock:
            self._served.pop((namespace, key), None)
            self._task((namespace, package, task), misses=1)
            try:
                with self._db:  # one transaction: both rows or neither
                    self._db.execute("BEGIN")
                    self._db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)",
                                     (namespace, key, package, task, _duration(meta)))
                    self._db.execute("INSERT OR REPLACE INTO newest VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                     (namespace, package, task, key, self._clock(), created, _duration(meta), blob))
            except sqlite3.Error as exc:
                self._failed("index an artifact", exc)

    def served(self, key: str, read_meta: Callable[[], dict | None], namespace: str = "",
               version: object = None) -> int:
        """A polykit artifact was downloaded: the build time it saved, in ms (0 when unknown).

        ``read_meta`` reads the artifact's manifest; it is called only for an artifact stored
        before this index knew it (or pushed out of it), and what it finds is kept.
        ``version`` tells one upload of the key from another (its creation time): given, the
        artifact's package, task and duration are kept in memory for that upload, so a popular
        artifact is not looked up in the database on every download (at most SERVED_CACHE of
        them; an upload stored again since, by any worker, has another version and is read anew).
        """
        name = (namespace, key)
        cached = self._served.get(name) if version is not None else None
        if cached is not None and cached[0] == version:
            row = cached[1]
        else:
            row = self._served_row(key, read_meta, namespace)
            if row is None:
                return 0
            if version is not None:
                with self._lock:
                    self._served.pop(name, None)
                    if len(self._served) >= SERVED_CACHE:
                        self._served.pop(next(iter(self._served)))
                    self._served[name] = (version, row)
        package, task, duration = row
        if package is not None and task is not None:
            with self._lock:
                self._task((namespace, package, task), hits=1, saved_ms=duration)
        return duration

    def _served_row(self, key: str, read_meta: Callable[[], dict | None], namespace: str) -> tuple | None:
        """(package, task, duration) of an artifact from the index, else from its manifest (then
        indexed); None when the index cannot be read."""
        try:
            with self._lock:
                row = self._db.execute("SELECT package, task, duration_ms FROM artifacts WHERE namespace = ? AND key = ?",
                                       (namespace, key)).fetchone()
        except sqlite3.Error as exc:
            self._failed("be read", exc)
            return None
        if row is None:
            meta = read_meta() or {}
            package, task = meta.get("package"), meta.get("task")
            row = (package if _name_ok(package) else None, task if _name_ok(task) else None, _duration(meta))
            with self._lock:
                try:
                    self._db.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)", (namespace, key, *row))
                except sqlite3.Error as exc:
                    self._failed("index an artifact", exc)
        return tuple(row)

    def _task(self, name: tuple[str, str, str], hits: int = 0, misses: int = 0, saved_ms: int = 0) -> None:
        """Add to the pending totals of one (namespace, package, task)."""
        row = self._pending_tasks.setdefault(name, [0, 0, 0])
        row[0] += hits
        row[1] += misses
        row[2] += saved_ms

    # --- reads -------------------------------------------------------------------------------

    def newest(self, package: str, task: str, namespace: str = "") -> dict | None:
        """The artifact stored most recently for a package's task, with its key components, or None."""
        with self._lock:
            try:
                row = self._db.execute("SELECT key, stored_at, created_at, duration_ms, components FROM newest "
                                       "WHERE namespace = ? AND package = ? AND task = ?",
                                       (namespace, package, task)).fetchone()
            except sqlite3.Error as exc:
                self._failed("be read", exc)
                return None
        if row is None:
            return None
        key, stored_at, created_at, duration_ms, components = row
        return {"package": package, "task": task, "key": key, "stored_at": round(stored_at, 3),
                "created_at": created_at, "duration_ms": duration_ms,
                "components": json.loads(components) if components else None}

    def flush(self) -> None:
        """Write the pending sums and prune what is past its bound."""
        with self._lock:
            pending, self._pending = self._pending, {}
            tasks, self._pending_tasks = self._pending_tasks, {}
            now = self._clock()
            self._flushed = now
            db = self._db
            try:
                db.execute("BEGIN")
                setters = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)
                marks = ", ".join("?" * (len(COUNTERS) + 2))
                totals = [0] * len(COUNTERS)
                for (bucket, protocol), row in pending.items():
                    for table, t in (("minutes", bucket), ("hours", bucket // HOUR * HOUR)):
                        db.execute(f"INSERT INTO {table} VALUES ({marks}) ON CONFLICT (t, protocol) DO UPDATE SET {setters}",
                                   (t, protocol, *row))
                    totals = [a + b for a, b in zip(totals, row)]
                for name, value in zip(COUNTERS, totals):
                    if value:
                        db.execute("INSERT INTO totals VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + ?",
                                   (name, value, value))
                db.execute("INSERT OR IGNORE INTO totals VALUES ('since', ?)", (int(now),))
                for (namespace, package, task), (hits, misses, saved) in tasks.items():
                    db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, package, task) "
                               "DO UPDATE SET hits = hits + excluded.hits, misses = misses + excluded.misses, "
                               "saved_ms = saved_ms + excluded.saved_ms, last_seen = excluded.last_seen",
                               (namespace, package, task, hits, misses, saved, now))
                db.execute("DELETE FROM minutes WHERE t < ?", (now - KEEP_MINUTES,))
                db.execute("DELETE FROM hours WHERE t < ?", (now - KEEP_HOURS,))
                for table, order in (("tasks", "last_seen"), ("newest", "stored_at")):
                    db.execute(f"DELETE FROM {table} WHERE rowid IN "
                               f"(SELECT rowid FROM {table} ORDER BY {order} DESC LIMIT -1 OFFSET ?)", (self.max_tasks,))
                db.execute("DELETE FROM artifacts WHERE rowid <= (SELECT max(rowid) FROM artifacts) - ?",
                           (self.max_artifacts,))
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                self._failed("be written", exc)
                self._keep(pending, tasks)

    def _keep(self, pending: dict, tasks: dict) -> None:
        """Put sums that could not be written back for the next flush (tasks within their row bound)."""
        for where, source in ((self._pending, pending), (self._pending_tasks, tasks)):
            for name, row in source.items():
                if name not in where and where is self._pending_tasks and len(where) >= self.max_tasks:
                    continue
                kept = where.setdefault(name, [0] * len(row))
                for i, value in enumerate(row):
                    kept[i] += value

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()

    def summary(self) -> dict:
        """Everything the status page shows from the history (part of ``/v1/stats``); empty if it cannot be read."""
        self.flush()
        try:
            return self._summary()
        except sqlite3.Error as exc:
            self._failed("be read", exc)
            return History(":memory:", self._clock)._summary()

    def _summary(self) -> dict:
        now = self._clock()
        with self._lock:
            db = self._db
            windows = {
                "hour": self._window(db, "minutes", now - HOUR),
                "day": self._window(db, "minutes", now - DAY),
                "month": self._window(db, "hours", now - KEEP_HOURS),
            }
            totals = dict(db.execute("SELECT name, value FROM totals").fetchall())
            series = {
                table: [dict(zip(("t", "hits", "misses", "saved_ms"), row)) for row in db.execute(
                    f"SELECT t, sum(hits), sum(misses), sum(saved_ms) FROM {table} WHERE t >= ? GROUP BY t ORDER BY t",
                    (now - keep,))]
                for table, keep in (("minutes", KEEP_MINUTES), ("hours", KEEP_HOURS))
            }
            days = [{"day": time.strftime("%Y-%m-%d", time.gmtime(t)), "hits": h, "misses": m,
                     "saved_seconds": round(s / 1000, 3)} for t, h, m, s in db.execute(
                "SELECT t / 86400 * 86400 AS d, sum(hits), sum(misses), sum(saved_ms) FROM hours "
                "GROUP BY d ORDER BY d")]
            columns = "namespace, package, task, hits, misses, saved_ms"
            saving = db.execute(f"SELECT {columns} FROM tasks WHERE saved_ms > 0 "
                                "ORDER BY saved_ms DESC, namespace, package, task LIMIT ?", (TOP,)).fetchall()
            missing = db.execute(f"SELECT {columns} FROM tasks WHERE misses > 0 "
                                 "ORDER BY misses DESC, namespace, package, task LIMIT ?", (TOP,)).fetchall()
        all_time = {name: totals.get(name, 0) for name in COUNTERS}
        return {
            "since": totals.get("since"),
            "windows": windows,
            "all_time": self._figures(all_time),
            "minutes": series["minutes"],
            "hours": series["hours"],
            "days": days,
            "top_saving": [self._task_row(row) for row in saving],
            "top_missing": [self._task_row(row) for row in missing],
        }

    @staticmethod
    def _window(db: sqlite3.Connection, table: str, start: float) -> dict:
        sums = ", ".join(f"sum({c})" for c in COUNTERS)
        by_protocol = {}
        overall = dict.fromkeys(COUNTERS, 0)
        for protocol, *values in db.execute(f"SELECT protocol, {sums} FROM {table} WHERE t >= ? GROUP BY protocol "
                                            "ORDER BY protocol", (start,)):
            row = dict(zip(COUNTERS, values))
            for name in COUNTERS:
                overall[name] += row[name]
            if row["hits"] or row["misses"]:
                by_protocol[protocol] = {"hits": row["hits"], "misses": row["misses"],
                                         "hit_rate": _rate(row["hits"], row["misses"])}
        return {**History._figures(overall), "by_protocol": by_protocol}

    @staticmethod
    def _figures(row: dict) -> dict:
        out = {name: row[name] for name in COUNTERS if name != "saved_ms"}
        out["hit_rate"] = _rate(row["hits"], row["misses"])
        out["saved_seconds"] = round(row["saved_ms"] / 1000, 3)
        return out

    @staticmethod
    def _task_row(row: tuple) -> dict:
        namespace, package, task, hits, misses, saved_ms = row
        return {"namespace": namespace, "package": package, "task": task, "hits": hits, "misses": misses,
                "hit_rate": _rate(hits, misses), "saved_seconds": round(saved_ms / 1000, 3)}
