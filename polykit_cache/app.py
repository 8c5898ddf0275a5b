"""The HTTP application: a plain WSGI callable with an explicit route table.

Handlers raise :class:`HTTPError`; one place renders every error as the JSON body of the spec
(``{"error": word, "message": sentence}``) and tracebacks go to the log only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Callable, Iterable
from wsgiref.util import FileWrapper

from polykit_client.artifact import ArtifactError, Limits, is_cache_key

from .auth import Access
from .config import Config
from .metrics import Metrics
from .storage import AlreadyStored, Storage, StorageFull
from .verification import IncompleteBody, receive

log = logging.getLogger("polykit_cache.app")
access_log = logging.getLogger("polykit_cache.access")

SEND_CHUNK = 256 * 1024
REASONS = {
    200: "OK", 201: "Created", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    507: "Insufficient Storage",
}


class HTTPError(Exception):
    """An answer other than success; rendered as JSON by the application."""

    def __init__(self, status: int, error: str, message: str, headers: Iterable[tuple[str, str]] = (), **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = list(headers)
        self.extra = extra


class Response:
    """Status, headers and a body iterable; ``length`` is what the access log records."""

    __slots__ = ("status", "headers", "body", "length")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: Iterable[bytes], length: int) -> None:
        self.status, self.headers, self.body, self.length = status, headers, body, length


def json_response(status: int, payload: dict, headers: Iterable[tuple[str, str]] = ()) -> Response:
    data = json.dumps(payload).encode() + b"\n"
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    return Response(status, head + list(headers), [data], len(data))


def error_body(status: int, error: str, message: str, **extra: object) -> dict:
    """The JSON object of every error answer."""
    return {"error": error, "message": message, **extra}


Handler = Callable[[dict, dict], Response]
# The environ key under which the server hands dispatch() an answer decided before the body.
REFUSED = "polykit.refused"
_KEY_PATH = r"/v1/artifacts/(?P<key>[^/]*)"


class CacheApp:
    """The WSGI application of one server; build it with :func:`make_app`."""

    def __init__(self, config: Config, storage: Storage, metrics: Metrics, access: Access) -> None:
        self.config = config
        self.storage = storage
        self.metrics = metrics
        self.access = access
        # A manifest is parsed in memory; 8 MiB of JSON (some 60,000 files) bounds what one
        # upload can make a worker hold, whatever the body's size.
        self.limits = Limits(max_unpacked_size=config.unpacked_limit, max_metadata_size=8 << 20, max_members=200_000)
        # (path pattern, handlers by method, open to everyone); PUT is the only write.
        # (path pattern, handlers by method, open to everyone, error renderer or None, protocol)
        self.routes: list[tuple] = [
            (re.compile(_KEY_PATH), {"GET": self.get_artifact, "HEAD": self.head_artifact, "PUT": self.put_artifact},
             False, None, "polykit"),
            (re.compile(r"/healthz"), {"GET": self.healthz, "HEAD": self.healthz}, True, None, "polykit"),
            (re.compile(r"/metrics"), {"GET": self.prometheus}, False, None, "polykit"),
            (re.compile(r"/v1/stats"), {"GET": self.stats}, False, None, "polykit"),
        ]

    def add_routes(self, protocol: str, entries: list) -> None:
        """Another tool's routes: (pattern, handlers, public[, error renderer]) each."""
        for entry in entries:
            pattern, handlers, public = entry[:3]
            self.routes.append((pattern, handlers, public, entry[3] if len(entry) > 3 else None, protocol))

    # --- WSGI entry --------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            response = self.dispatch(environ, method)
        except HTTPError as exc:
            response = json_response(exc.status, error_body(exc.status, exc.error, exc.message, **exc.extra), exc.headers)
        except Exception:
            log.exception("unexpected error answering %s %s", method, environ.get("PATH_INFO", ""))
            response = json_response(500, error_body(500, "internal_error", "The server failed to answer; see its log."))
        status = response.status
        start_response(f"{status} {REASONS.get(status, 'Unknown')}", response.headers)
        elapsed = time.perf_counter() - started
        self.metrics.request(method, status, elapsed, environ.get("polykit.protocol", "polykit"))
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s", self._access_line(environ, method, status, response.length, elapsed))
        if method == "HEAD":
            close = getattr(response.body, "close", None)
            if close is not None:
                close()
            return []
        return response.body

    def _access_line(self, environ: dict, method: str, status: int, length: int, elapsed: float) -> str:
        """One access log line; the Authorization header is never part of it."""
        host = environ.get("REMOTE_ADDR") or "-"
        path = environ.get("PATH_INFO", "")
        if self.config.access_log_format == "json":
            return json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "remote": host, "method": method, "path": path,
                "status": status, "bytes": length, "duration_ms": round(elapsed * 1000, 3),
                "user_agent": environ.get("HTTP_USER_AGENT", ""),
            })
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        path = json.dumps(path)[1:-1]  # a decoded path may hold quotes or newlines: never forge a line
        # NCSA common log format, with the duration in seconds appended.
        return f'{host} - - [{time.strftime("%d/%b/%Y:%H:%M:%S %z")}] "{method} {path} {protocol}" {status} {length} {elapsed:.4f}'

    def dispatch(self, environ: dict, method: str) -> Response:
        path = environ.get("PATH_INFO", "")
        # An answer the server decided before reading the body (see admit()) is rendered here, in
        # the shape of the route's protocol, so that metrics and the access log see it too.
        refused = environ.get(REFUSED)
        for pattern, handlers, public, render, protocol in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            environ["polykit.protocol"] = protocol
            try:
                if refused is not None:
                    raise refused
                if not public:
                    self._authorize(environ, write=method == "PUT")  # PUT is every protocol's only write
                return self._handler(handlers, method)(environ, match.groupdict())
            except HTTPError as exc:
                if render is not None:  # a protocol whose clients expect errors in their own shape
                    return render(exc)
                raise
        if refused is not None:
            raise refused
        raise HTTPError(404, "not_found", f"No such endpoint: {path}")

    def admit(self, environ: dict) -> HTTPError | None:
        """The refusal of a request decided from its method, path and headers alone, or None.

        The server asks this as soon as a request's head has arrived, before it reads the body:
        a request to no endpoint, without valid credentials or over the size limit is answered
        at once (never with ``100 Continue`` first, RFC 9110 section 10.1.1) and its body never
        reaches the spool. The answer itself is rendered by dispatch() under ``REFUSED``.
        """
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO", "")
        for pattern, handlers, public, _render, _protocol in self.routes:
            if pattern.fullmatch(path) is None:
                continue
            try:
                if not public:
                    self._authorize(environ, write=method == "PUT")
                self._handler(handlers, method)
                if method == "PUT" and environ.get("CONTENT_LENGTH"):
                    self.content_length(environ)  # 413 over the limit, 507 over the whole storage
            except HTTPError as exc:
                return exc
            return None
        return HTTPError(404, "not_found", f"No such endpoint: {path}")

    @staticmethod
    def _handler(handlers: dict, method: str) -> Handler:
        handler = handlers.get(method)
        if handler is None:
            allowed = ", ".join(sorted(handlers))
            raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here; use {allowed}.", [("Allow", allowed)])
        return handler

    def _authorize(self, environ: dict, write: bool) -> None:
        header = environ.get("HTTP_AUTHORIZATION")
        denied = self.access.check(header, write)
        if denied is None:
            return
        status, word, message = denied
        if write:
            self.metrics.reject("unauthorized" if status == 401 else "forbidden")
        challenge = 'Bearer realm="polykit-cache"' + (', error="invalid_token"' if header and status == 401 else "")
        headers = [("WWW-Authenticate", challenge)] if status == 401 else []
        raise HTTPError(status, word, message, headers)

    # --- artifacts ---------------------------------------------------------------------------

    def _key(self, params: dict) -> str:
        key = params["key"]
        if not is_cache_key(key):
            raise HTTPError(400, "bad_key", "A cache key is 64 lowercase hexadecimal characters (a SHA-256).")
        return key

    def _found(self, environ: dict, key: str):
        info = self.storage.lookup(key)
        if info is None:
            self.metrics.lookup(False)
            raise HTTPError(404, "not_found", f"No artifact is stored under {key}.")
        return info

    @staticmethod
    def _artifact_headers(info) -> list[tuple[str, str]]:
        return [
            ("Content-Type", "application/zstd"),
            ("Content-Length", str(info.size)),
            ("X-Artifact-Hash", info.sha256),
            ("ETag", f'"{info.sha256}"'),
            # Artifacts never change once stored (first write wins).
            ("Cache-Control", "public, max-age=31536000, immutable"),
        ]

    def _not_modified(self, environ: dict, info) -> Response | None:
        tags = environ.get("HTTP_IF_NONE_MATCH")
        if tags and (tags.strip() == "*" or f'"{info.sha256}"' in tags):
            self.metrics.lookup(True)
            return Response(304, [("ETag", f'"{info.sha256}"')], [], 0)
        return None

    def head_artifact(self, environ: dict, params: dict) -> Response:
        """Answer from the metadata alone; the artifact file is not opened."""
        key = self._key(params)
        info = self._found(environ, key)
        if not os.path.exists(info.path):  # removed behind our back (verify's quarantine, gc)
            self.storage.forget(key)
            self.metrics.lookup(False)
            raise HTTPError(404, "not_found", f"No artifact is stored under {key}.")
        self.storage.touch(key)
        cached = self._not_modified(environ, info)
        if cached is not None:
            return cached
        self.metrics.lookup(True)
        return Response(200, self._artifact_headers(info), [], 0)

    def get_artifact(self, environ: dict, params: dict) -> Response:
        key = self._key(params)
        info = self._found(environ, key)
        self.storage.touch(key)
        cached = self._not_modified(environ, info)
        if cached is not None:
            return cached
        try:
            fh = open(info.path, "rb")
        except FileNotFoundError:  # removed since its metadata was read
            self.storage.forget(key)
            self.metrics.lookup(False)
            raise HTTPError(404, "not_found", f"No artifact is stored under {key}.") from None
        self.metrics.lookup(True, info.size)
        # The server's file wrapper lets waitress's I/O thread send the file, freeing this worker.
        wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
        return Response(200, self._artifact_headers(info), wrapper(fh, SEND_CHUNK), info.size)

    def put_artifact(self, environ: dict, params: dict) -> Response:
        key = self._key(params)
        length = self.content_length(environ)
        if self.storage.exists(key):
            self.metrics.reject("exists")
            raise HTTPError(409, "exists", f"An artifact is already stored under {key}; artifacts are immutable.")
        try:
            received = receive(self.storage, environ["wsgi.input"], length, key, self.limits)
        except ArtifactError as exc:
            self.metrics.reject(exc.reason, length)
            raise HTTPError(422, "verification_failed", f"The artifact was refused: {exc}", reason=exc.reason) from None
        except IncompleteBody as exc:
            self.metrics.reject("incomplete_body")
            raise HTTPError(400, "incomplete_body", f"The request body is incomplete: {exc}.") from None
        except StorageFull:
            self.metrics.reject("storage_full", length)
            raise HTTPError(507, "storage_full", "The cache's disk is full; the artifact was not stored.") from None
        claimed = environ.get("HTTP_X_ARTIFACT_HASH")
        if claimed is not None and claimed.strip().lower() != received.sha256:
            received.temp.unlink(missing_ok=True)
            self.metrics.reject("body_hash_mismatch", received.size)
            raise HTTPError(422, "verification_failed", "The body does not match its X-Artifact-Hash header.", reason="body_hash_mismatch")
        try:
            info = self.storage.publish(key, received.temp, received.size, received.sha256)
        except AlreadyStored:
            self.metrics.reject("exists", received.size)
            raise HTTPError(409, "exists", f"An artifact is already stored under {key}; artifacts are immutable.") from None
        except StorageFull:
            self.metrics.reject("storage_full", received.size)
            raise HTTPError(507, "storage_full", "The cache's disk is full; the artifact was not stored.") from None
        self.metrics.upload(received.size)
        return json_response(
            201,
            {"key": key, "size": info.size, "sha256": info.sha256},
            [("Location", f"/v1/artifacts/{key}"), ("ETag", f'"{info.sha256}"')],
        )

    def content_length(self, environ: dict) -> int:
        """The upload's declared length, refused (411, 400, 413, 507) before the body is read."""
        raw = environ.get("CONTENT_LENGTH", "")
        if raw in ("", None):
            self.metrics.reject("no_length")
            raise HTTPError(411, "length_required", "An upload needs a Content-Length header.")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.metrics.reject("bad_length")
            raise HTTPError(400, "bad_length", f"Content-Length {raw!r} is not a byte count.") from None
        limit = self.config.max_artifact_size
        if length > limit:
            self.metrics.reject("too_large")
            raise HTTPError(413, "too_large", f"The artifact is {length} bytes, over the artifact size limit of {limit} bytes.", limit=limit)
        if self.storage.max_storage is not None and length > self.storage.max_storage:
            self.metrics.reject("storage_full")
            raise HTTPError(507, "storage_full", f"The artifact is {length} bytes, more than the whole cache may hold.")
        return length

    # --- service endpoints -------------------------------------------------------------------

    def healthz(self, environ: dict, params: dict) -> Response:
        return json_response(200, {"status": "ok"})

    def stats(self, environ: dict, params: dict) -> Response:
        return json_response(200, self.metrics.stats())

    def prometheus(self, environ: dict, params: dict) -> Response:
        data = self.metrics.prometheus().encode()
        return Response(
            200,
            [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Content-Length", str(len(data)))],
            [data],
            len(data),
        )


def make_app(config: Config, storage: Storage, metrics: Metrics | None = None, access: Access | None = None) -> CacheApp:
    """Build the WSGI application over an opened storage; without ``access`` the server is open."""
    from . import bazel, kv, nx, turbo  # the other tools' protocols build on this module

    access = access or Access(None, {}, config.allow_anonymous_read)
    app = CacheApp(config, storage, metrics or Metrics(storage.totals), access)
    # Fixed prefixes first: a bazel instance name could otherwise swallow them.
    for protocol, module in (("turbo", turbo), ("nx", nx), ("kv", kv), ("bazel", bazel)):
        app.add_routes(protocol, module.routes(app))
    return app
