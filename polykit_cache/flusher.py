"""A worker process's batched writes to the shared database, run on a timer and at exit.

With ``--workers N`` a worker keeps what it counted (:class:`.metrics.Metrics`) and the uses
it saw (:class:`.lru.SharedIndex`) in memory, and one thread writes them every
:data:`.sharedstate.FLUSH_SECONDS`: a request never waits for the database, and a busy worker
takes SQLite's write lock ten times a second instead of once or twice per request. The last
batch is written when the worker stops (SIGTERM); a worker killed with SIGKILL loses only what
it gathered since the last tick (see the README, *Worker processes*).

A batch that cannot be written (a full disk, a locked database past its timeout) is kept by
its owner for the next tick and costs a warning at most once a minute, never a request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from .sharedstate import FLUSH_SECONDS

log = logging.getLogger("polykit_cache.flusher")

# A failing write is logged at most this often, in seconds.
WARN_EVERY = 60.0


class Flusher:
    """Calls each of ``tasks`` every ``seconds`` on a daemon thread, and once more on :meth:`stop`."""

    def __init__(self, tasks: Sequence[Callable[[], object]], seconds: float = FLUSH_SECONDS) -> None:
        self._tasks = list(tasks)
        self._seconds = seconds
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shared-state-flusher", daemon=True)
        self._warned = float("-inf")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer, then write what is left (the worker's last batch)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.run_once()

    def run_once(self) -> None:
        for task in self._tasks:
            try:
                task()
            except Exception as exc:  # kept by the task for the next tick
                now = time.monotonic()
                if now - self._warned >= WARN_EVERY:
                    self._warned = now
                    log.warning("could not write to the workers' shared database (%s); trying again", exc)

    def _loop(self) -> None:
        while not self._stopping.wait(self._seconds):
            self.run_once()
