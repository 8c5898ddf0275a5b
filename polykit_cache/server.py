"""Serving the application with waitress: tuning, bounded connections, clean shutdown.

The connection layer (refusals before the body, waitress's own errors in the JSON shape, the
connection limit) lives in :mod:`.channel`; this module sets waitress up and runs it.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Callable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.task import ThreadedTaskDispatcher

from .channel import Admit, Listener, Spool
from .config import Config

log = logging.getLogger("polykit_cache.server")

# After SIGTERM, SIGINT or close(): how long requests in progress may take to finish and be sent
# before their connections are closed. Under `docker stop`'s 10 s before SIGKILL.
DRAIN_SECONDS = 8.0


def waitress_settings(config: Config) -> dict:
    """The waitress adjustments we rely on (see the stack notes for the measurements)."""
    return {
        "host": config.bind,
        "port": config.port,
        "threads": config.threads,
        # waitress refuses at Content-Length >= this value; a body of exactly the limit is allowed.
        "max_request_body_size": config.max_artifact_size + 1,
        # Large receive buffers: 8 KiB reads cap uploads at a few hundred MB/s.
        "recv_bytes": 256 * 1024,
        "asyncore_use_poll": True,
        "ident": "polykit-cache",
        # Open connections; at the limit the one idle longest is closed to make room (channel.py).
        "connection_limit": config.max_connections,
        # A connection with no request in progress and nothing sent or received for this long is
        # closed, checked every few seconds.
        "channel_timeout": config.idle_timeout,
        "cleanup_interval": max(1, min(5, config.idle_timeout)),
        # A request head (request line and headers) larger than this is a 431.
        "max_request_header_size": 64 * 1024,
        # Forwarding headers from anyone but the trusted proxy are dropped, never believed.
        "clear_untrusted_proxy_headers": True,
        **({"trusted_proxy": config.trusted_proxy, "trusted_proxy_headers": set(config.trusted_proxy_headers)}
           if config.trusted_proxy else {}),
    }


class Server:
    """A started waitress server; ``run()`` blocks until ``close()`` or SIGTERM/SIGINT, then drains.

    Stopping (RFC 9112 section 9.6, "tear-down"): the listening sockets close, idle connections
    (kept alive between requests) close at once, and a connection in the middle of a request
    closes once its answer is sent (with ``Connection: close``). After ``DRAIN_SECONDS`` (or
    ``drain_seconds``) what is left is closed, so a client that never finishes cannot hold the stop up.
    """

    def __init__(self, app: Callable, config: Config, admit: Admit | None = None,
                 sockets: list[socket.socket] | None = None, drain_seconds: float = DRAIN_SECONDS,
                 spool: Spool | None = None) -> None:
        """``admit`` judges each request on its head alone (see :meth:`CacheApp.admit`); the app's own by default.
        ``spool`` gives the file an admitted upload's body is written into (see :meth:`CacheApp.body_spool`);
        the app's own by default.

        ``sockets`` are listening sockets bound already (:func:`bind`), shared by worker processes.
        ``drain_seconds`` bounds the drain when the server stops.
        """
        if admit is None:
            admit = getattr(app, "admit", None)
        if spool is None:
            spool = getattr(app, "body_spool", None)
        self.app = app
        self._adj = Adjustments(**waitress_settings(config))
        self._map: dict = {}
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(self._adj.threads)
        # One listener per address the bind name resolves to (as waitress's create_server does).
        if sockets is None:
            self._listeners = [
                Listener(app, admit, spool, map=self._map, dispatcher=self._dispatcher, adj=self._adj, sockinfo=sockinfo)
                for sockinfo in self._adj.listen
            ]
        else:
            self._listeners = [
                Listener(app, admit, spool, map=self._map, dispatcher=self._dispatcher, adj=self._adj, _sock=sock,
                         bind_socket=False, sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))
                for sock in sockets
            ]
        # Asked to stop (close() or a signal); read by the I/O thread at each turn of its loop.
        self._drain_seconds = drain_seconds
        self._stop_asked = False
        # The listeners' triggers (the pipes that wake the I/O thread) are closed: none may be pulled.
        self._finished = False
        self._wake_lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._listeners[0].effective_port)

    @property
    def host(self) -> str:
        return self._listeners[0].effective_host

    def run(self, install_signals: bool = True, on_hangup: Callable[[], None] | None = None) -> None:
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGINT, self._on_stop_signal)
            if on_hangup is not None:
                signal.signal(signal.SIGHUP, lambda signum, frame: on_hangup())
                # A worker process starts with SIGHUP blocked (see supervisor.py): one sent
                # meanwhile is delivered now.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGHUP,))
        try:
            self._serve()
        finally:
            if install_signals:
                # One stop is enough: a second signal (Ctrl-C reaches a supervisor and its workers
                # alike) must not cut the drain short.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Connections left after the drain are closed first, so a request still running
            # stops at its next write; then the workers (up to 5 s); then the triggers they pull.
            self._close_connections()
            self._dispatcher.shutdown()
            with self._wake_lock:
                self._finished = True
                for listener in self._listeners:
                    listener.close()
        log.info("stopped")

    def close(self) -> None:
        """Stop and drain (see the class); returns at once, ``run()`` returns when done. Any thread may call it."""
        with self._wake_lock:
            self._stop_asked = True
            if not self._finished:
                self._wake()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        # Runs in the main thread, which is the I/O thread: no lock (it may hold it), only the
        # flag and a byte into the trigger's pipe so the loop's poll() returns now.
        self._stop_asked = True
        self._wake()

    def _wake(self) -> None:
        self._listeners[0].pull_trigger()

    def _serve(self) -> None:
        """waitress's I/O loop, one poll at a time, with the drain once a stop is asked."""
        deadline = None
        while self._map:
            if self._stop_asked and deadline is None:
                log.info("stopping: no new connections; requests in progress have %.0f s to finish", self._drain_seconds)
                deadline = time.monotonic() + self._drain_seconds
                for listener in self._listeners:
                    listener.drain()
            if deadline is not None:
                if not any(listener.active_channels for listener in self._listeners):
                    return
                if time.monotonic() >= deadline:
                    log.warning("closing %d connections still busy after %.0f s",
                                sum(len(listener.active_channels) for listener in self._listeners), self._drain_seconds)
                    return
            wasyncore.loop(timeout=self._adj.asyncore_loop_timeout, map=self._map,
                           use_poll=self._adj.asyncore_use_poll, count=1)

    def _close_connections(self) -> None:
        for listener in self._listeners:
            for channel in list(listener.active_channels.values()):
                channel.shed()


def bind(config: Config) -> list[socket.socket]:
    """Listening sockets for every address the bind name resolves to, as waitress would make them.

    Made once by the supervisor and inherited by every worker: the kernel hands each new
    connection to one worker's accept, and a worker's death closes only its own connections.
    """
    adj = Adjustments(**waitress_settings(config))
    sockets: list[socket.socket] = []
    try:
        port = None
        for family, kind, proto, address in adj.listen:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port is not None and address[1] == 0:  # port 0: every address on the one picked first
                address = (address[0], port, *address[2:])
            sock.bind(address)
            port = sock.getsockname()[1]
            sock.listen(adj.backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
