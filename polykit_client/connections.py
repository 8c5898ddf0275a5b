"""Keep-alive connections to the remote cache, reused from one request to the next.

A fresh clone of a large workspace downloads hundreds of artifacts; a TCP (and TLS) set-up for
each would cost more than many of the transfers. So each ``RemoteCache`` keeps up to MAX_IDLE
idle connections and hands them out again (RFC 9112 section 9.3: HTTP/1.1 connections are
persistent unless either side says ``close``).

A connection goes back to the pool only when its exchange ended cleanly: no error, no held-back
send error of a refused upload, no ``Connection: close``, and the whole answer body read (a
short unread body, such as the JSON of a 404, is read and dropped, up to MAX_DRAIN bytes). A
connection that saw anything else is closed, never reused: leftover bytes of one answer must not
be taken for the start of the next.

A server may close an idle connection at any moment (RFC 9112 section 9.3.1), so a request sent
on a reused one can fail before any answer arrives. That is not the server failing: the request
is sent once more on a new connection, as browsers and urllib3 do (``StaleConnection``).
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import urllib.error
import urllib.request
from typing import Hashable

# Idle connections kept per remote cache: as many as the downloads running at once (8), so a
# run's transfers reuse them all; more would only hold sockets open on the server.
MAX_IDLE = 8
# An answer body left unread (the JSON of a 404 or 409) is read and dropped up to this size so
# its connection can be reused; a longer one costs less as a new connection.
MAX_DRAIN = 64 * 1024
# What the server closing an idle connection looks like to the next request on it.
_CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class StaleConnection(Exception):
    """A reused connection failed before any answer arrived: the server had closed it while it
    was idle. The request is worth sending again, once, on a new connection; ``error`` is the
    failure itself, for when that is not possible."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Pool:
    """Idle connections of one remote cache, by destination; safe to share between threads."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[tuple[Hashable, http.client.HTTPConnection]] = []
        self._local = threading.local()

    def take(self, key: Hashable) -> http.client.HTTPConnection | None:
        """The most recently used idle connection to ``key`` that still looks open, or None."""
        if getattr(self._local, "fresh", False):
            self._local.fresh = False
            return None
        while True:
            with self._lock:
                found = next((i for i in range(len(self._idle) - 1, -1, -1) if self._idle[i][0] == key), None)
                if found is None:
                    return None
                _, conn = self._idle.pop(found)
            if conn.sock is not None and not _readable(conn.sock):
                return conn
            conn.close()

    def give(self, key: Hashable, conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` for a later request; the oldest idle one is closed beyond MAX_IDLE."""
        with self._lock:
            self._idle.append((key, conn))
            extra = self._idle[: max(0, len(self._idle) - self._max_idle)]
            del self._idle[: len(extra)]
        for _, old in extra:
            old.close()

    def fresh_next(self) -> None:
        """The next request of this thread gets a new connection (the retry after a stale one)."""
        self._local.fresh = True

    def close(self) -> None:
        """Close every idle connection (the server likely closed the others too)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()


def _readable(sock: socket.socket) -> bool:
    """An idle connection has nothing to read: data or end-of-file means the server closed it
    (or sent something unasked), so it is not used again."""
    try:
        if hasattr(select, "poll"):  # no limit on descriptor numbers, unlike select()
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class KeepAliveMixin:
    """An urllib handler's ``do_open`` that takes connections from a ``Pool``.

    It does what ``urllib.request.AbstractHTTPHandler.do_open`` does (the proxy's absolute form
    and the CONNECT tunnel, with Proxy-Authorization moved to the tunnel request) except closing
    the connection after one answer. The answer carries its lease; ``release`` ends it.
    """

    def __init__(self, pool: Pool, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool = pool

    def do_open(self, http_class, req: urllib.request.Request, **http_conn_args) -> http.client.HTTPResponse:
        if not req.host:
            raise urllib.error.URLError("no host given")
        # A tunnel's connection belongs to the host behind it, a plain one to the host it reaches.
        key = (req.type, req.host, req._tunnel_host)
        conn = self.pool.take(key)
        reused = conn is not None
        headers = dict(req.unredirected_hdrs)
        headers.update({k: v for k, v in req.headers.items() if k not in headers})
        headers = {name.title(): value for name, value in headers.items()}
        tunnel_headers = {}
        if "Proxy-Authorization" in headers and req._tunnel_host:
            tunnel_headers["Proxy-Authorization"] = headers.pop("Proxy-Authorization")  # never to the cache
        if conn is None:
            conn = http_class(req.host, timeout=req.timeout, **http_conn_args)
            if req._tunnel_host:
                conn.set_tunnel(req._tunnel_host, headers=tunnel_headers)
        deadline = getattr(req, "deadline", None)
        conn.deadline = deadline
        if deadline is not None and conn.sock is not None:
            deadline.watch(conn.sock)  # the socket in use is the one the watchdog shuts down
        try:
            conn.request(req.get_method(), req.selector, req.data, headers,
                         encode_chunked=req.has_header("Transfer-encoding"))
            response = conn.getresponse()
        except BaseException as exc:
            conn.close()
            if reused and isinstance(exc, _CLOSED) and not (deadline is not None and deadline.expired):
                raise StaleConnection(exc) from exc
            raise
        response.url = req.get_full_url()
        response.msg = response.reason
        response.lease = (self.pool, key, conn)
        return response


def release(response: http.client.HTTPResponse, clean: bool) -> None:
    """Close ``response``; its connection goes back to the pool only after a clean exchange
    (``clean``: the caller raised nothing) whose answer was read to its end."""
    pool, key, conn = getattr(response, "lease", (None, None, None))
    reusable = (conn is not None and clean and not response.will_close
                and getattr(conn, "_send_error", None) is None and _drained(response))
    response.close()
    if conn is None:
        return
    conn.deadline = None
    if reusable and conn.sock is not None:
        pool.give(key, conn)
    else:
        conn.close()


def _drained(response: http.client.HTTPResponse) -> bool:
    """Whether the answer body was read to its end, reading a short rest now."""
    if response.isclosed():
        return True
    if response.length is None or response.length > MAX_DRAIN:
        return False
    try:
        response.read()
    except (OSError, http.client.HTTPException, ValueError):
        return False
    return response.isclosed()
