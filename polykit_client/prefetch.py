"""Remote hits fetched ahead of their tasks' turn: one batch query, then every download at once.

A task's key depends on the keys of its dependencies, not on their outputs, so every key of a
run is known before the first task starts. The server is asked about all of them in one request
(``POST /v1/artifacts``); each hit is downloaded, its body checked against its SHA-256 and the
artifact verified member by member (into memory, or into a private staging folder when it is
large: see ``restore.py``), on a pool of threads, while the tasks run. Cache I/O is not CPU
work, so this pool does not count against ``-j``.

Nothing reaches the package from here: the task, in its turn and under its lock, checks what
the artifact places against its declared outputs and moves it in (``runner.py``). A task whose
dependency failed is skipped as before, and what was fetched for it is thrown away.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .timing import phase

if TYPE_CHECKING:  # pragma: no cover
    from .localcache import LocalCache
    from .remote import Progress, RemoteCache
    from .restore import Staged

# Downloads in flight at once. They wait on the network and on the disk, and hashing releases
# the GIL, so a few more than the cores keep a loopback or LAN link busy; memory stays bounded
# (each streams in 256 KiB blocks), and the disk holds no more than the run downloads anyway.
DOWNLOAD_THREADS = 8


# What the prefetcher knows of a key.
UNKNOWN, ABSENT = "unknown", "absent"


class Prefetcher:
    """Asks the server about a run's keys and fetches its hits, in background threads.

    ``make_remote()`` gives the backend (or None), on the query's own thread, so that making it
    (importing the HTTP client) does not delay the first task.
    ``stage(key, path)`` verifies a downloaded artifact and returns its
    ``Staged``; it raises ``ArtifactError`` for an artifact that fails verification, which the
    task reports in its turn. ``progress(key)`` gives a download's progress display, or None.
    """

    def __init__(self, make_remote: "Callable[[], RemoteCache | None]", local: "LocalCache",
                 stage: "Callable[[str, Path], Staged]", progress: Callable[[str], "Progress | None"] = lambda key: None,
                 threads: int = DOWNLOAD_THREADS) -> None:
        self._make_remote = make_remote
        self.remote: RemoteCache | None = None
        self.local, self._stage, self._progress = local, stage, progress
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="polykit-download")
        self._lock = threading.Lock()
        self._asked = threading.Event()
        self._futures: dict[str, Future] = {}
        self._absent: set[str] = set()
        self._taken: set[str] = set()  # asked for before the answer came: the task fetches it itself
        self._closed = False
        self._query: threading.Thread | None = None

    def start(self, keys: list[str]) -> None:
        """Ask about ``keys`` and start the downloads of the hits, without waiting for either."""
        self._query = threading.Thread(target=self._ask, args=(list(keys),), name="polykit-query", daemon=True)
        self._query.start()

    def _ask(self, keys: list[str]) -> None:
        held: dict[str, bool] = {}
        try:
            with phase("remote: batch query"):
                self.remote = self._make_remote()
                if self.remote is not None and self.remote.enabled:
                    held = self.remote.which(keys) or {}
        finally:
            with self._lock:  # one step, so a task sees either no answer or the answer with its downloads
                for key in keys:
                    if self._closed:
                        break
                    if held.get(key) is False:
                        self._absent.add(key)
                    elif held.get(key) is True and key not in self._taken:
                        self._futures[key] = self._pool.submit(self._fetch, key)
                self._asked.set()

    def _fetch(self, key: str) -> "Staged | None":
        """Download and verify one artifact; None when the download failed (the backend warned)."""
        fh, temp = self.local.new_temp()
        try:
            with fh, phase("remote: downloads", threads=True):
                ok = self.remote.fetch(key, fh, self._progress(key))
            if ok:
                with phase("remote: verifying", threads=True):
                    return self._stage(key, temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        temp.unlink(missing_ok=True)
        return None

    def take(self, key: str) -> Future | str:
        """The download of ``key`` (a future of a ``Staged`` or None), or ABSENT, or UNKNOWN.

        Never waits for the batch answer: a task that comes first (the first wave of a cold
        build) asks for itself, as it would without the batch query, and its key is left out
        of the downloads started later. The caller owns what it takes.
        """
        with self._lock:
            if not self._asked.is_set():
                self._taken.add(key)
                return UNKNOWN
            future = self._futures.pop(key, None)
            if future is not None:
                return future
            return ABSENT if key in self._absent else UNKNOWN

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the batch answer (and the downloads it starts to be queued); True once it came."""
        return self._asked.wait(timeout)

    def absent(self, key: str) -> bool:
        """Whether the batch answer said the server lacks ``key`` (so an upload need not ask again).

        Recorded for every key asked about, the ones tasks took early included."""
        with self._lock:
            return key in self._absent

    def close(self) -> None:
        """Stop what has not started and throw away what no task took (a skipped task's hit)."""
        with self._lock:
            self._closed = True
            left = list(self._futures.values())
            self._futures.clear()
        for future in left:
            future.cancel()
        self._pool.shutdown(wait=True)
        for future in left:
            if future.cancelled():
                continue
            try:
                staged = future.result()
            except Exception:
                continue
            if staged is not None:
                staged.discard()
