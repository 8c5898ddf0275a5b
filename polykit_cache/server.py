"""Serving the application with waitress: tuning, bounded connections, clean shutdown.

The connection layer (refusals before the body, waitress's own errors in the JSON shape, the
connection limit) lives in :mod:`.channel`; this module sets waitress up and runs it.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Callable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.task import ThreadedTaskDispatcher

from .channel import Admit, Listener
from .config import Config

log = logging.getLogger("polykit_cache.server")


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
    """A started waitress server; ``run()`` blocks until ``close()`` or SIGTERM/SIGINT."""

    def __init__(self, app: Callable, config: Config, admit: Admit | None = None,
                 sockets: list[socket.socket] | None = None) -> None:
        """``admit`` judges each request on its head alone (see :meth:`CacheApp.admit`); the app's own by default.

        ``sockets`` are listening sockets bound already (:func:`bind`), shared by worker processes.
        """
        if admit is None:
            admit = getattr(app, "admit", None)
        self._adj = Adjustments(**waitress_settings(config))
        self._map: dict = {}
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(self._adj.threads)
        # One listener per address the bind name resolves to (as waitress's create_server does).
        if sockets is None:
            self._listeners = [
                Listener(app, admit, map=self._map, dispatcher=self._dispatcher, adj=self._adj, sockinfo=sockinfo)
                for sockinfo in self._adj.listen
            ]
        else:
            self._listeners = [
                Listener(app, admit, map=self._map, dispatcher=self._dispatcher, adj=self._adj, _sock=sock,
                         bind_socket=False, sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))
                for sock in sockets
            ]
        self._closed = threading.Event()

    @property
    def port(self) -> int:
        return int(self._listeners[0].effective_port)

    @property
    def host(self) -> str:
        return self._listeners[0].effective_host

    def run(self, install_signals: bool = True, on_hangup: Callable[[], None] | None = None) -> None:
        if install_signals:
            # waitress only stops on KeyboardInterrupt/SystemExit; turn SIGTERM into the same.
            signal.signal(signal.SIGTERM, _raise_exit)
            signal.signal(signal.SIGINT, _raise_exit)
            if on_hangup is not None:
                signal.signal(signal.SIGHUP, lambda signum, frame: on_hangup())
                # A worker process starts with SIGHUP blocked (see supervisor.py): one sent
                # meanwhile is delivered now.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGHUP,))
        try:
            wasyncore.loop(timeout=self._adj.asyncore_loop_timeout, map=self._map, use_poll=self._adj.asyncore_use_poll)
        except (SystemExit, KeyboardInterrupt):
            pass
        finally:
            if install_signals:
                # One stop is enough: a second signal (Ctrl-C reaches a supervisor and its workers
                # alike) must not cut the shutdown short while requests finish.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            # Workers first (up to 5 s for running requests): they wake the I/O loop through the
            # listeners' triggers, which close() closes.
            self._dispatcher.shutdown()
            self.close()
        log.info("stopped")

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            for listener in self._listeners:
                listener.close()


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


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
