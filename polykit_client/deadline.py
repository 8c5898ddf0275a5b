"""An overall deadline for each transfer, enforced by one watchdog thread.

A socket timeout bounds each read or send, not a transfer: a server (or proxy) that sends one
byte just inside every timeout keeps a download of a large body going for as long as it likes,
and an endless run of ``100 Continue`` answers or trailer lines does the same before a body has
even begun. So every transfer also gets a deadline. When it passes, the watchdog shuts the
transfer's sockets down (shutdown(2) makes a ``recv`` or ``send`` blocked in another thread
return at once); the blocked call then fails like a dropped connection, and the transfer, seeing
``expired``, reports the deadline instead. A watchdog costs one thread, which exists only while
transfers are in flight and, after the last, until the deadline it last waited for has passed,
plus :data:`LINGER` seconds (a transfer that ends does not wake it).

The thread is woken only when it has to be: by a deadline sooner than the one it waits for, not
by every transfer that starts or ends. A run's downloads are many and short, and each wake-up
would be a hand-over of the interpreter lock between threads for nothing (a deadline that ended
meanwhile is simply found gone when the thread next looks).
"""

from __future__ import annotations

import math
import socket
import threading
import time

# How long an idle watchdog thread waits for the next transfer before it ends: a run's transfers
# follow one another closely, and a thread started for each one costs more than a small download.
LINGER = 2.0


class Deadline:
    """The deadline of one transfer; ``close()`` it when the transfer is over."""

    def __init__(self, watchdog: Watchdog, seconds: float) -> None:
        self._watchdog = watchdog
        self.started = time.monotonic()
        self.seconds = seconds
        self.expires = self.started + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes (at once, if it has passed already)."""
        with self._watchdog.lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def extend(self, seconds: float) -> None:
        """Allow ``seconds`` from the start in all, once the size of the body is known."""
        with self._watchdog.lock:
            if not self.expired and seconds > self.seconds:
                self.seconds = seconds
                self.expires = self.started + seconds

    def close(self) -> None:
        self._watchdog.forget(self)

    def _expire(self) -> None:
        """Called by the watchdog with its lock held."""
        self.expired = True
        for sock in self._sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: ssl.SSLSocket.shutdown would drop its
    # TLS state under a thread that is reading. A socket closed meanwhile has no descriptor.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """Expires the deadlines of one remote cache's transfers; safe to share between threads."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._active: set[Deadline] = set()
        self._thread: threading.Thread | None = None
        self._wakes_at = math.inf  # when the thread's current wait ends

    def start(self, seconds: float) -> Deadline:
        """A new deadline ``seconds`` from now, watched until it is closed."""
        deadline = Deadline(self, seconds)
        with self.lock:
            self._active.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="polykit-deadlines", daemon=True)
                self._thread.start()
                self._wakes_at = deadline.expires  # its first look is at this one, whenever it comes
            elif deadline.expires < self._wakes_at:
                self.lock.notify()
        return deadline

    def forget(self, deadline: Deadline) -> None:
        with self.lock:
            self._active.discard(deadline)  # no wake-up: the thread finds it gone when it next looks

    def _loop(self) -> None:
        idle = False
        with self.lock:
            while True:
                now = time.monotonic()
                for deadline in [d for d in self._active if d.expires <= now]:
                    deadline._expire()
                    self._active.discard(deadline)
                if self._active:
                    idle, self._wakes_at = False, min(d.expires for d in self._active)
                elif idle:
                    break  # nothing in flight for LINGER seconds: the next transfer starts a new thread
                else:
                    idle, self._wakes_at = True, now + LINGER
                # A wait beyond TIMEOUT_MAX (some 292 years) raises OverflowError, which would
                # end this thread and leave every later deadline unwatched.
                self.lock.wait(min(self._wakes_at - now, threading.TIMEOUT_MAX))
            self._thread = None
            self._wakes_at = math.inf
