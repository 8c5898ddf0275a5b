"""Group commit: concurrent uploads share one sync of the storage's filesystem.

An upload is answered ``201`` only once its bytes, its metadata and its name are durable, which
takes two syncs: one before its name appears (so a power loss never leaves a name on a torn
file) and one after (so the name itself survives). Each costs a journal commit and a device
cache flush, a millisecond or more, whether it covers one file or fifty. So one thread syncs
for everyone: a caller of :meth:`GroupSync.wait` waits for a sync that *started after* it
called (a sync already running may have missed its writes), and every caller that arrived
during one sync is served by the next one. At N concurrent uploads, one sync round serves up to
N of them instead of N syncs.

The sync is ``syncfs(2)`` on the storage folder: one call makes every file, extended attribute
and directory entry of that filesystem durable (Linux; elsewhere ``sync(2)``, which does the same
for every filesystem). Its errors (EIO, ENOSPC) reach every waiter of that round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Callable


def filesystem_sync(folder: str) -> Callable[[], None]:
    """A function that makes everything written on ``folder``'s filesystem durable."""
    libc_name = ctypes.util.find_library("c")
    syncfs = getattr(ctypes.CDLL(libc_name, use_errno=True), "syncfs", None) if libc_name else None
    if syncfs is None:
        return os.sync
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def sync() -> None:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")

    return sync


class GroupSync:
    """One thread that runs ``sync`` in rounds for every thread waiting on it."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._wanted = 0  # the round the latest caller needs
        self._started = 0  # rounds started
        self._done = 0  # rounds finished
        self._errors: dict[int, Exception] = {}  # a failed round's error, until its waiters saw it
        self._waiting: dict[int, int] = {}  # round -> callers still to be woken
        self._pid = 0  # the process the thread runs in (a forked worker needs its own)

    def wait(self) -> None:
        """Return once a sync that started after this call has finished; raise its OSError."""
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="group-sync", daemon=True).start()
            mine = self._started + 1
            self._wanted = mine
            self._waiting[mine] = self._waiting.get(mine, 0) + 1
            self._cond.notify_all()
            while self._done < mine:
                self._cond.wait()
            self._waiting[mine] -= 1
            error = self._errors.get(mine)
            if not self._waiting[mine]:
                del self._waiting[mine]
                self._errors.pop(mine, None)
        if isinstance(error, OSError):  # a fresh one per waiter: they raise it in their own threads
            raise OSError(error.errno, error.strerror) from error
        if error is not None:
            raise RuntimeError(f"the storage sync failed: {error}") from error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._wanted <= self._started:
                    self._cond.wait()
                self._started += 1
                current = self._started
            try:
                self._sync()
            except Exception as exc:  # the waiters raise it; the thread goes on
                with self._cond:
                    self._errors[current] = exc
            with self._cond:
                self._done = current
                self._cond.notify_all()
