"""``--workers N``: a supervisor process and N forked workers serving one storage.

One Python process runs Python code on one core at a time, so a server with more cores runs
more processes. The supervisor binds the listening sockets and recovers the storage, then forks
the workers, which inherit both: the kernel gives each new connection to whichever worker
accepts it first. The supervisor serves nothing itself; it only

- restarts a worker that dies (a crash, the OOM killer, a SIGKILL): the others keep serving, and
  their requests are not disturbed; only the dead worker's own connections are cut;
- passes SIGHUP on to every worker (each rereads the token file);
- on SIGTERM or SIGINT passes SIGTERM on and waits for every worker to finish its requests.

The supervisor forks while it has a single thread and no open database connection, so a
worker starts from a clean copy. A worker whose supervisor is gone (killed with SIGKILL) stops
by itself instead of serving on unsupervised.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

log = logging.getLogger("polykit_cache.supervisor")

# A worker that dies sooner than this after it started is restarted only after this long, so a
# worker that cannot start (a broken disk) does not make the supervisor spin.
RESTART_PAUSE = 1.0
# How often a worker checks that its supervisor is still there.
ORPHAN_CHECK = 1.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Supervisor:
    """Runs ``work(slot)`` in ``count`` forked processes until SIGTERM; ``work`` returns the exit status."""

    def __init__(self, count: int, work: Callable[[int], int]) -> None:
        self.count = count
        self._work = work
        self._children: dict[int, int] = {}  # pid -> slot
        self._started: dict[int, float] = {}  # slot -> monotonic start
        self._stopping = False

    def run(self) -> int:
        """Start the workers and keep them running; returns 0 once all stopped after SIGTERM/SIGINT."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hangup)
        for slot in range(self.count):
            if not self._stopping:
                self._spawn(slot)
        while self._children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            slot = self._children.pop(pid, None)
            if slot is None:
                continue
            if self._stopping:
                log.info("worker %d (pid %d) stopped", slot, pid)
                continue
            log.error("worker %d (pid %d) %s; starting another", slot, pid, _describe(status))
            if time.monotonic() - self._started.get(slot, 0.0) < RESTART_PAUSE:
                time.sleep(RESTART_PAUSE)
            if not self._stopping:
                self._spawn(slot)
        log.info("stopped")
        return 0

    def pids(self) -> list[int]:
        return list(self._children)

    def _spawn(self, slot: int) -> None:
        # Signals wait until the child has its own handlers (it must not run the supervisor's).
        # And the supervisor's own wait until the child is on its list, so a SIGTERM reaches it.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot)  # never returns
            self._children[pid] = slot
            self._started[slot] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        log.info("worker %d started (pid %d)", slot, pid)

    def _child(self, slot: int) -> None:
        status = 1
        try:
            for signum in FORWARDED:
                signal.signal(signum, signal.SIG_DFL)
            # SIGHUP stays blocked until the server has its handler (Server.run unblocks it), so a
            # reload asked for while the worker starts is done then rather than lost or fatal.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
            _watch_supervisor(os.getppid())
            status = self._work(slot)
        except BaseException:
            log.exception("worker %d failed", slot)
        finally:
            logging.shutdown()
            os._exit(status)

    def _stop(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("stopping %d workers", len(self._children))
        self._stopping = True
        self._signal_all(signal.SIGTERM)

    def _hangup(self, signum: int, frame: object) -> None:
        log.info("passing SIGHUP on to %d workers", len(self._children))
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self._children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _watch_supervisor(parent: int) -> None:
    """Stop this worker (SIGTERM to itself) once its supervisor is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
