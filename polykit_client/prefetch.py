"""Remote hits fetched ahead of their tasks' turn: one batch query, then a few bundles of downloads.

A task's key depends on the keys of its dependencies, not on their outputs, so every key of a
run is known before the first task starts. The server is asked about all of them in one request
(``POST /v1/artifacts``); the hits are then downloaded in a few bundles at once (``POST
/v1/bundles``: many artifacts in one streamed answer, grouped in the tasks' order by the sizes
the query gave), and each artifact, as its frame arrives, has its body checked against its
SHA-256 and is verified member by member (into memory, or into a private staging folder when it
is large: see ``restore.py``), while the tasks run. A request per artifact cost more CPU on both
sides than verifying it. An artifact too large for a bundle, the rest of a bundle that broke
off, and every hit of a server without bundles are fetched with one ``GET`` each. Cache I/O is
not CPU work, so these threads do not count against ``-j``.

Nothing reaches the package from here: the task, in its turn and under its lock, checks what
the artifact places against its declared outputs and moves it in (``runner.py``). A task whose
dependency failed is skipped as before, and what was fetched for it is thrown away.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

from .timing import phase

if TYPE_CHECKING:  # pragma: no cover
    from .localcache import LocalCache
    from .remote import Progress, RemoteCache
    from .restore import Staged

# Downloads in flight at once. They wait on the network and on the disk, and hashing releases
# the GIL, so a few more than the cores keep a loopback or LAN link busy; memory stays bounded
# (each streams in 256 KiB blocks), and the disk holds no more than the run downloads anyway.
DOWNLOAD_THREADS = 8
# A bundle holds at most this many bytes of artifacts (by the sizes the batch query answered),
# and the hits are spread over BUNDLES_AT_ONCE bundles or more (of BUNDLE_KEYS_LEAST keys at the
# least), so that a few download and verify side by side, each on its own connection. An artifact
# over BUNDLE_BYTES comes by its own GET, which the server sends from its I/O thread without
# holding a worker.
BUNDLE_BYTES = 8 << 20
BUNDLES_AT_ONCE = 4
BUNDLE_KEYS_LEAST = 8
BUNDLE_KEYS = 1000  # the server's bound on the keys of one request


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
        held: dict[str, int | None] = {}
        try:
            with phase("remote: batch query"):
                self.remote = self._make_remote()
                if self.remote is not None and self.remote.enabled:
                    held = self.remote.which(keys) or {}
        finally:
            with self._lock:  # one step, so a task sees either no answer or the answer with its downloads
                hits: list[str] = []
                for key in keys:
                    if self._closed or key not in held:
                        continue
                    if held[key] is None:
                        self._absent.add(key)
                    elif key not in self._taken and key not in self._futures:
                        self._futures[key] = Future()
                        hits.append(key)
                for group in bundles(hits, held):
                    futures = [self._futures[key] for key in group]
                    if len(group) == 1 and held[group[0]] > BUNDLE_BYTES:
                        self._pool.submit(self._fetch_into, group[0], futures[0])
                    else:
                        self._pool.submit(self._fetch_bundle, group, sum(held[key] for key in group), futures)
                self._asked.set()

    def _fetch_bundle(self, keys: list[str], size: int, futures: list[Future]) -> None:
        """Download ``keys`` in one bundle, each artifact verified as its frame arrives; what the
        bundle does not bring (it broke off, or the server has no bundles) is fetched key by key."""
        pending = dict(zip(keys, futures))
        files: dict[str, tuple[BinaryIO, Path]] = {}

        def open_dest(key: str) -> "tuple[BinaryIO, Progress | None]":
            fh, temp = self.local.new_temp()
            files[key] = (fh, temp)
            return fh, self._progress(key)

        def done(key: str, ok: bool) -> None:
            fh, temp = files.pop(key, (None, None))
            if fh is not None:
                fh.close()
            future = pending.pop(key)
            if not future.set_running_or_notify_cancel():  # thrown away by close()
                ok = False
            elif not ok:
                future.set_result(None)
            if not ok:
                if temp is not None:
                    temp.unlink(missing_ok=True)
                return
            try:
                with phase("remote: verifying", threads=True):
                    future.set_result(self._stage(key, temp))
            except BaseException as exc:
                temp.unlink(missing_ok=True)
                future.set_exception(exc)

        rest: list[str] | None
        try:
            with phase("remote: bundles", threads=True):
                rest = self.remote.fetch_bundle(keys, size, open_dest, done)
        except Exception:  # the backend says what failed; whatever slipped past it, the rest come one by one
            rest = list(pending)
        finally:
            for fh, temp in files.values():  # a frame cut short
                fh.close()
                temp.unlink(missing_ok=True)
        for key in keys if rest is None else rest:
            future = pending.pop(key, None)
            if future is not None:
                self._fetch_into(key, future)
        for future in pending.values():  # nothing may wait for ever on a frame that never came
            if future.set_running_or_notify_cancel():
                future.set_result(None)

    def _fetch_into(self, key: str, future: Future) -> None:
        """One download by its own GET, its outcome set on ``future`` (unless close() threw it away)."""
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(self._fetch(key))
        except BaseException as exc:
            future.set_exception(exc)

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


def bundles(keys: list[str], sizes: dict[str, int | None]) -> list[list[str]]:
    """``keys`` in order, cut into bundles of at most BUNDLE_BYTES and BUNDLE_KEYS, and spread over
    BUNDLES_AT_ONCE of them where each still gets BUNDLE_KEYS_LEAST keys; an artifact over
    BUNDLE_BYTES is a group of its own (a GET)."""
    most = min(BUNDLE_KEYS, max(BUNDLE_KEYS_LEAST, math.ceil(len(keys) / BUNDLES_AT_ONCE)))
    groups: list[list[str]] = []
    group: list[str] = []
    total = 0
    for key in keys:
        size = sizes[key] or 0
        if size > BUNDLE_BYTES:
            groups.append([key])
            continue
        if group and (len(group) >= most or total + size > BUNDLE_BYTES):
            groups.append(group)
            group, total = [], 0
        group.append(key)
        total += size
    if group:
        groups.append(group)
    return groups
