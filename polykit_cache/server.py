"""Serving the application with waitress: tuning for large bodies, JSON errors, clean shutdown.

waitress answers some requests itself before the application sees them (an over-limit
Content-Length, a malformed request line); its plain-text error pages are replaced here so that
every error a client gets has the spec's JSON body.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Callable

from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from .config import Config

log = logging.getLogger("polykit_cache.server")

_WORDS = {400: "bad_request", 413: "too_large", 431: "headers_too_large", 501: "not_implemented", 500: "internal_error"}


class JsonErrorTask(ErrorTask):
    """waitress's own error answers, with a JSON body instead of plain text."""

    def execute(self) -> None:
        err = self.request.error
        payload = {"error": _WORDS.get(err.code, "bad_request"), "message": f"{err.reason}: {err.body}"}
        if err.code == 413:
            # waitress refuses at >= its setting, which is one above the artifact limit.
            limit = self.channel.server.adj.max_request_body_size - 1
            payload["message"] = f"The request body is over the artifact size limit of {limit} bytes."
            payload["limit"] = limit
        body = json.dumps(payload).encode() + b"\n"
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


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
        # Forwarding headers from anyone but the trusted proxy are dropped, never believed.
        "clear_untrusted_proxy_headers": True,
        **({"trusted_proxy": config.trusted_proxy, "trusted_proxy_headers": set(config.trusted_proxy_headers)}
           if config.trusted_proxy else {}),
    }


class Server:
    """A started waitress server; ``run()`` blocks until ``close()`` or SIGTERM/SIGINT."""

    def __init__(self, app: Callable, config: Config) -> None:
        socket_map: dict = {}
        self._server = create_server(app, map=socket_map, **waitress_settings(config))
        for candidate in [self._server, *socket_map.values()]:
            if hasattr(candidate, "channel_class"):
                candidate.channel_class = JsonErrorChannel
        self._closed = threading.Event()

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def host(self) -> str:
        return self._server.effective_host

    def run(self, install_signals: bool = True, on_hangup: Callable[[], None] | None = None) -> None:
        if install_signals:
            # waitress only stops on KeyboardInterrupt/SystemExit; turn SIGTERM into the same.
            signal.signal(signal.SIGTERM, _raise_exit)
            signal.signal(signal.SIGINT, _raise_exit)
            if on_hangup is not None:
                signal.signal(signal.SIGHUP, lambda signum, frame: on_hangup())
        try:
            self._server.run()  # returns (after closing) on SystemExit or KeyboardInterrupt
        except (SystemExit, KeyboardInterrupt):
            pass
        finally:
            self.close()
        log.info("stopped")

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._server.close()


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)
