"""The HTTP application: a plain WSGI callable over the declared route table (:mod:`routes`).

Every request is first admitted from its method, path and headers alone (:meth:`CacheApp.admit`,
which the server layer also calls before it reads a body), then handled. Handlers raise
:class:`HTTPError`; one place renders it in the route's error shape (the spec's
``{"error": word, "message": sentence}`` for polykit) and tracebacks go to the log only.
"""

from __future__ import annotations

import json
import logging
import time
from typing import BinaryIO, Callable, Iterable, Iterator
from urllib.parse import parse_qsl

from polykit_client import bundle
from polykit_client.artifact import ArtifactError, Limits, is_cache_key, read_metadata

from . import bazel, kv, nx, statuspage, turbo
from .auth import Access
from .blobs import check_segments
from .config import Config
from .history import History
from .http import SEND_CHUNK, HTTPError, Response, file_body, file_chunks, json_response, render_json_error, status_line
from .metrics import Metrics
from .outcomes import parse_length, read_body, refuse
from .routes import Route, Router
from .store import Stat, Staged, Store, StorageFull, StorageUnavailable, entry_name
from .verification import SPOOLED, IncompleteBody, receive

log = logging.getLogger("polykit_cache.app")
access_log = logging.getLogger("polykit_cache.access")

__all__ = ["ADMITTED", "ADMITTED_WRITE", "CacheApp", "HTTPError", "REFUSED", "SPOOLED", "Response", "SEND_CHUNK",
           "json_response", "make_app"]

# The environ key under which the server layer hands the application an answer it decided before
# reading the body (an admit() refusal, or an error waitress found itself): an HTTPError.
REFUSED = "polykit.refused"
# Set by admit() on a request it lets through: True when it writes (so its credentials were
# checked), which the server layer keeps over anonymous connections at the connection limit.
ADMITTED_WRITE = "polykit.admitted_write"
# Also set by admit() on a request it lets through: its (route, parameters). The server layer
# hands the application the very environ it admitted when the request has no body (nothing
# arrives after the head that admission could depend on), and the application then neither
# routes nor admits it again. A request with a body gets a new environ and is admitted again.
ADMITTED = "polykit.admitted"

# Bounds on what the request line may make the server parse. Real clients' paths are well under
# 300 characters (a Bazel instance, a 64-character hash); turbo passes one team parameter.
MAX_PATH = 2048
MAX_QUERY = 4096
# A body sent with a read (turbo's batch query) is held in memory: this is its bound unless the
# route declares another; writes are bounded by --max-artifact-size.
READ_BODY_LIMIT = 64 * 1024
# The batch query (``POST /v1/artifacts``) names at most this many keys, in a JSON body of at
# most QUERY_BODY_LIMIT bytes (1,000 keys take about 67 KB); a client asks in slices of this size.
MAX_QUERY_KEYS = 1000
QUERY_BODY_LIMIT = 128 * 1024
# The artifacts' bytes one bundle carries at most: half of waitress's 16 MiB output high-water
# mark, so the worker writing a bundle never waits for its reader (see download_artifacts).
BUNDLE_BYTES = 8 << 20


class CacheApp:
    """The WSGI application of one server; build it with :func:`make_app`."""

    def __init__(self, config: Config, storage: Store, metrics: Metrics, access: Access) -> None:
        self.config = config
        self.storage = storage
        self.metrics = metrics
        self.access = access
        # A manifest is parsed in memory; 8 MiB of JSON (some 60,000 files) bounds what one
        # upload can make a worker hold, whatever the body's size.
        self.limits = Limits(max_unpacked_size=config.unpacked_limit, max_metadata_size=8 << 20, max_members=200_000)
        self.router = Router([])
        # The access log's timestamps for the current second: (second, common format, ISO 8601).
        self._stamps: tuple[int, str, str] = (-1, "", "")

    def polykit_routes(self) -> list[Route]:
        """The polykit protocol itself (``/v1``) and the service endpoints."""
        return [
            Route("polykit", "v1", r"/v1/artifacts/(?P<key>[^/]*)",
                  {"GET": self.get_artifact, "HEAD": self.head_artifact, "PUT": self.put_artifact},
                  writes=frozenset({"PUT"}), samples=(f"/v1/artifacts/{'ab' * 32}", "/v1/artifacts/x")),
            # The batch query only reads, whatever its method (RFC 9110 9.3.3: a POST may be a query).
            Route("polykit", "v1", r"/v1/artifacts", {"POST": self.query_artifacts}, reads=frozenset({"POST"}),
                  read_body_limit=QUERY_BODY_LIMIT, samples=("/v1/artifacts",)),
            # Many artifacts in one answer. Not under /v1/artifacts/: every path there names a key
            # (a bad one is 400 bad_key), so no name of this route could be told from a key's.
            Route("polykit", "v1", r"/v1/bundles", {"POST": self.download_artifacts}, reads=frozenset({"POST"}),
                  read_body_limit=QUERY_BODY_LIMIT, samples=("/v1/bundles",)),
            Route("polykit", "v1", r"/v1/stats", {"GET": self.stats}, samples=("/v1/stats",)),
            Route("polykit", "healthz", r"/healthz", {"GET": self.healthz}, public=True, samples=("/healthz",)),
            Route("polykit", "metrics", r"/metrics", {"GET": self.prometheus}, samples=("/metrics",)),
            Route("polykit", "v1", r"/v1/tasks", {"GET": self.newest_task}, samples=("/v1/tasks",)),
            Route("polykit", "", r"/", {"GET": self.status_page}, samples=("/",)),
        ]

    # --- admission ---------------------------------------------------------------------------

    def admit(self, environ: dict) -> HTTPError | None:
        """Whether a request is refused from its method, path, query string and headers alone.

        ``environ`` is the request's WSGI environ without its body. None lets the request
        through; otherwise the refusal: an unknown route (404), a method it does not serve (405),
        a path or query over its bound (414), missing or invalid credentials (401), a read token
        writing (403), or a body refused by its Content-Length (400, 411, 413, 507). Nothing is
        counted or logged here: the server layer calls this as soon as a request's head has
        arrived, before it reads the body or sends ``100 Continue`` (RFC 9110 section 10.1.1),
        and then calls the application with the refusal under ``REFUSED`` and an empty body, so
        the answer takes the route's error shape and is counted and logged like any other.
        """
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            found = self._route(environ.get("PATH_INFO", ""))
            self._admission(found[0], method, environ)
        except HTTPError as exc:
            return exc
        environ[ADMITTED_WRITE] = found[0].is_write(method)
        environ[ADMITTED] = found
        return None

    def _route(self, path: str) -> tuple[Route, dict]:
        """The route of a path within the bounds of the request line, or 414/404; 400 for a bad namespace."""
        if len(path) > MAX_PATH:
            raise refuse("uri_too_long", f"The path is {len(path)} characters long; the limit is {MAX_PATH}.")
        found = self.router.match(path)
        if found is None:
            raise refuse("not_found", f"No such endpoint: {path}")
        namespace = found[1]["namespace"]
        if namespace:
            # Validated like a key, since it becomes part of every stored entry's name.
            check_segments(namespace.split("/"), "A namespace (the path before the protocol)")
        return found

    def _admission(self, route: Route, method: str, environ: dict) -> None:
        """Refuse from the method, query and headers alone: 414, 405, 401/403, or the body's declared length."""
        query = environ.get("QUERY_STRING", "")
        if len(query) > MAX_QUERY:
            raise refuse("uri_too_long", f"The query string is {len(query)} characters long; the limit is {MAX_QUERY}.")
        if method not in route.handlers:
            raise refuse("method_not_allowed", f"{method[:20]} is not allowed here; use {route.allowed}.",
                         [("Allow", route.allowed)])
        write = route.is_write(method)
        # A CORS preflight never carries credentials (Fetch standard, "CORS-preflight request"),
        # and it reads nothing: OPTIONS is open wherever a route serves it.
        if not route.public and method != "OPTIONS":
            self._authorize(route, environ.get("HTTP_AUTHORIZATION"), write)
        chunked = environ.get("HTTP_TRANSFER_ENCODING") is not None
        raw = environ.get("CONTENT_LENGTH") or None
        if write and method not in route.bodiless:
            if not (chunked and raw is None):  # a chunked body's length is known only once read
                self._check_upload_length(raw)
        else:
            # A read's body is held in memory, so it must declare its length: a chunked one
            # would be spooled up to the artifact size limit before any handler could look.
            if chunked:
                raise refuse("no_length", f"A {method[:20]} here takes a body only with a Content-Length.", count=False)
            if raw is None:
                return  # no body, the common case
            length = parse_length(raw) or 0
            limit = 0 if method in route.bodiless else route.read_body_limit or READ_BODY_LIMIT
            if length > limit:
                raise refuse("too_large", f"A {method} here takes a body of at most {limit} bytes.", count=False, limit=limit)

    def _authorize(self, route: Route, header: str | None, write: bool) -> None:
        denied = self.access.check(header, write)
        if denied is None:
            return
        status = denied[0]
        if status == 401 and write and not header and self.access.allow_anonymous_read:
            status = route.anonymous_write_status  # some clients take a 401 on upload as fatal
        # Both schemes a token may come in (RFC 9110 11.6.1: one challenge per header line).
        bearer = 'Bearer realm="polykit-cache"' + (', error="invalid_token"' if header else "")
        headers = [("WWW-Authenticate", bearer), ("WWW-Authenticate", 'Basic realm="polykit-cache", charset="UTF-8"')]
        raise refuse("unauthorized" if status == 401 else "forbidden", denied[2], headers if status == 401 else [],
                     count=write)

    def _check_upload_length(self, raw: str | None) -> int:
        """The upload's declared length, refused (411, 400, 413, 507) before the body is read."""
        length = parse_length(raw)
        if length is None:
            raise refuse("no_length", "An upload needs a Content-Length header.")
        limit = self.config.max_artifact_size
        if length > limit:
            raise refuse("too_large", f"The upload is {length} bytes, over the artifact size limit of {limit} bytes.", limit=limit)
        if not self.storage.fits(length):
            raise refuse("storage_full", f"The upload is {length} bytes, more than the whole cache may hold.")
        return length

    def body_spool(self, environ: dict) -> Staged | None:
        """Where the server writes the body of an upload it admitted (``admit``), before any byte of
        it arrives: the store's own staged file (:meth:`Store.spool`), or None for its own spool.

        The body is then written once and hashed on the way in; the handler finds it under
        ``SPOOLED`` and verifies it in place. The server discards it when the request ends in any
        other way (refused, cut off, failed), and only admitted writes get one: a request without
        valid credentials never writes to the store.
        """
        return self.storage.spool()

    def content_length(self, environ: dict) -> int:
        """The length of an admitted upload (a chunked one is measured by the server before the app runs)."""
        return self._check_upload_length(environ.get("CONTENT_LENGTH"))

    # --- WSGI entry --------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO", "")
        route: Route | None = None
        try:
            refused = environ.get(REFUSED)
            if refused is not None:  # decided by the server layer before the body (see admit())
                route = self.router.owner(path) if len(path) <= MAX_PATH else None
                raise refused
            admitted = environ.get(ADMITTED)  # admitted by the server layer from this very environ
            route, params = admitted if admitted is not None else self._route(path)
            environ["polykit.protocol"] = route.protocol
            environ["polykit.namespace"] = params["namespace"]
            if admitted is None:
                self._admission(route, method, environ)
            response = route.handlers[method](environ, params)
        except StorageUnavailable as exc:
            # The store (a bucket) cannot be reached: clients build instead (spec: any 5xx is a miss).
            log.warning("storage unavailable answering %s %s: %s", method[:20], path[:MAX_PATH], exc)
            error = refuse("unavailable", "The cache's storage cannot be reached now; build instead.",
                           [("Retry-After", "5")], count=False)
            response = (route.render if route else render_json_error)(error)
        except HTTPError as exc:
            if exc.reject is not None:
                self.metrics.reject(exc.reject, exc.received, route.protocol if route else None)
            response = (route.render if route else render_json_error)(exc)
        except Exception:
            log.exception("unexpected error answering %s %s", method[:20], path[:MAX_PATH])
            error = HTTPError(500, "internal_error", "The server failed to answer; see its log.")
            response = (route.render if route else render_json_error)(error)
        status = response.status
        start_response(status_line(status), response.headers)
        elapsed = time.perf_counter() - started
        self.metrics.request(method, status, elapsed, route.protocol if route else None)
        if access_log.isEnabledFor(logging.INFO):
            line = self._access_line(environ, method, status, response.length, elapsed)
            # The record is made here: Logger.info() would first walk the stack for the file and
            # line of the call, which no access line shows. Filters and handlers apply as usual.
            access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, line, None, None))
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
        second = int(time.time())
        stamps = self._stamps
        if stamps[0] != second:  # formatted once a second, not once a request
            local = time.localtime(second)
            stamps = self._stamps = (second, time.strftime("%d/%b/%Y:%H:%M:%S %z", local),
                                     time.strftime("%Y-%m-%dT%H:%M:%S%z", local))
        if self.config.access_log_format == "json":
            return json.dumps({
                "time": stamps[2], "remote": host, "method": method, "path": path,
                "status": status, "bytes": length, "duration_ms": round(elapsed * 1000, 3),
                "user_agent": environ.get("HTTP_USER_AGENT", ""),
            })
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
        path = json.dumps(path)[1:-1]  # a decoded path may hold quotes or newlines: never forge a line
        # NCSA common log format, with the duration in seconds appended.
        return f'{host} - - [{stamps[1]}] "{method} {path} {protocol}" {status} {length} {elapsed:.4f}'

    # --- artifacts ---------------------------------------------------------------------------

    def _key(self, params: dict) -> str:
        key = params["key"]
        if not is_cache_key(key):
            raise refuse("bad_key", "A cache key is 64 lowercase hexadecimal characters (a SHA-256).")
        return key

    # An artifact in a URL namespace is named ``@<namespace>/<key>`` in the store's ``polykit``
    # space (store.entry_name); every artifact is verified alike before it is stored.

    def _name(self, environ: dict, key: str) -> str:
        return entry_name(environ.get("polykit.namespace", ""), key)

    def _missing(self, environ: dict, key: str) -> HTTPError:
        self.metrics.lookup(False, namespace=environ.get("polykit.namespace", ""))
        return refuse("not_found", f"No artifact is stored under {key}.")

    def _lookup_hit(self, environ: dict, size: int = 0) -> None:
        self.metrics.lookup(True, size, namespace=environ.get("polykit.namespace", ""))

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
            self._lookup_hit(environ)
            return Response(304, [("ETag", f'"{info.sha256}"')], [], 0)
        return None

    def head_artifact(self, environ: dict, params: dict) -> Response:
        """Answer from the metadata alone; the artifact is not opened."""
        key = self._key(params)
        info = self.storage.stat("polykit", self._name(environ, key), use=True)
        if info is None or info.sha256 is None:
            raise self._missing(environ, key)
        cached = self._not_modified(environ, info)
        if cached is not None:
            return cached
        self._lookup_hit(environ)
        return Response(200, self._artifact_headers(info), [], 0)

    def get_artifact(self, environ: dict, params: dict) -> Response:
        key = self._key(params)
        name = self._name(environ, key)
        if environ.get("HTTP_IF_NONE_MATCH"):
            info = self.storage.stat("polykit", name, use=True)
            cached = self._not_modified(environ, info) if info is not None and info.sha256 else None
            if cached is not None:
                return cached
        opened = self._serve(environ, key)
        if opened is None:
            raise refuse("not_found", f"No artifact is stored under {key}.")
        info, fh = opened
        return Response(200, self._artifact_headers(info), file_body(environ, fh, info.size), info.size)

    def _serve(self, environ: dict, key: str, room: int | None = None) -> tuple[Stat, BinaryIO] | None | bool:
        """Open a stored artifact to send it, counted as a hit (a use, the build time it saves) or
        a miss; None when it is not stored. ``GET`` and each entry of a bundle come through here.
        With ``room``, an artifact larger than ``room`` bytes is not sent and not counted as a hit or
        a miss (its open is still a use for eviction): False.

        The file opened is the entry's bytes for good: a later eviction or replacement removes or
        renames the name, never the bytes of a file already open, so what is sent is never torn.
        """
        name = self._name(environ, key)
        opened = self.storage.open("polykit", name)
        if opened is not None and opened[0].sha256 is None:
            opened[1].close()
            opened = None
        if opened is None:
            self.metrics.lookup(False, namespace=environ.get("polykit.namespace", ""))
            return None
        info = opened[0]
        if room is not None and info.size > room:
            opened[1].close()
            return False
        self._lookup_hit(environ, info.size)
        namespace = environ.get("polykit.namespace", "")
        self.metrics.saved(self.metrics.history.served(key, lambda: self._manifest(name), namespace, info.created))
        return opened

    def put_artifact(self, environ: dict, params: dict) -> Response:
        key = self._key(params)
        length = self.content_length(environ)
        namespace = params["namespace"]
        name = entry_name(namespace, key)
        exists = f"An artifact is already stored under {key}; artifacts are immutable."
        if self.storage.stat("polykit", name) is not None:
            raise refuse("exists", exists)
        full = "The cache's storage is full; the artifact was not stored."
        try:
            staged, manifest = receive(self.storage, environ["wsgi.input"], length, key, self.limits, environ.get(SPOOLED))
        except ArtifactError as exc:
            raise refuse("verification_failed", f"The artifact was refused: {exc}", reason=exc.reason, received=length) from None
        except IncompleteBody as exc:
            raise refuse("incomplete_body", f"The request body is incomplete: {exc}.") from None
        except StorageFull:
            raise refuse("storage_full", full, received=length) from None
        claimed = environ.get("HTTP_X_ARTIFACT_HASH")
        size, sha256 = staged.size, staged.sha256
        if claimed is not None and claimed.strip().lower() != sha256:
            staged.discard()
            raise refuse("verification_failed", "The body does not match its X-Artifact-Hash header.",
                         reason="body_hash_mismatch", received=size)
        try:
            stored = self.storage.commit("polykit", name, staged)
        except StorageFull:
            raise refuse("storage_full", full, received=size) from None
        if not stored:  # another upload of the key was committed first (first write wins)
            raise refuse("exists", exists, received=size)
        self.metrics.upload(size)
        self.metrics.history.stored(key, manifest, namespace)
        location = (f"/{namespace}" if namespace else "") + f"/v1/artifacts/{key}"
        return json_response(
            201,
            {"key": key, "size": size, "sha256": sha256},
            [("Location", location), ("ETag", f'"{sha256}"')],
        )

    def query_artifacts(self, environ: dict, params: dict) -> Response:
        """Which of a list of keys are stored: one request for a whole task graph's keys.

        A client knows every key of a build before anything runs (a key depends on its
        dependencies' keys, not on their outputs), so it asks once instead of one ``HEAD`` per
        task. Answered from the storage's metadata; no artifact is opened, and it is not a use
        for eviction (the ``GET`` that follows a hit is).
        """
        found: dict[str, dict | None] = {}
        for key in self._keys(environ):
            info = self.storage.stat("polykit", self._name(environ, key))  # not a use: the GET that follows is
            found[key] = {"size": info.size, "sha256": info.sha256} if info is not None and info.sha256 else None
        return json_response(200, {"artifacts": found})

    def _keys(self, environ: dict) -> list[str]:
        """The keys of a batch query or a bundle: ``{"keys": [...]}``, at most MAX_QUERY_KEYS of them."""
        shape = f'The body must be {{"keys": ["<64 hex>", ...]}} with at most {MAX_QUERY_KEYS} keys.'
        try:
            # RecursionError: deeply nested arrays make the json module recurse once per level.
            keys = json.loads(read_body(environ))["keys"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise refuse("bad_request", shape) from None
        if not isinstance(keys, list) or len(keys) > MAX_QUERY_KEYS or not all(isinstance(k, str) for k in keys):
            raise refuse("bad_request", shape)
        bad = next((k for k in keys if not is_cache_key(k)), None)
        if bad is not None:
            shown = bad if len(bad) <= 70 else bad[:70] + "..."
            raise refuse("bad_key", f"{shown!r} is not a cache key (64 lowercase hexadecimal characters).")
        return keys

    def download_artifacts(self, environ: dict, params: dict) -> Response:
        """``POST /v1/bundles``: the artifacts stored under a list of keys, in one streamed answer.

        A fresh checkout's hundreds of hits then cost a few requests instead of a ``GET`` each.
        The keys are checked as the batch query's are, before the answer starts; the body is then
        framed as :mod:`polykit_client.bundle` says, in the order asked. Each entry is opened only
        when the stream reaches it and counted as its ``GET`` would be (a hit, a use, or a miss),
        so the server holds one open entry and one chunk at a time, whatever the list.

        Unlike a ``GET``'s file, which waitress's I/O thread sends, a bundle is written by the worker
        thread that answers it, into waitress's output buffer (on disk past 1 MiB). Past waitress's
        16 MiB high-water mark a worker would wait for the client to read, so a slow reader asking
        for big artifacts could hold every worker. So a bundle carries at most BUNDLE_BYTES of
        artifacts: it ends, with a trailer counting the frames sent, before the first artifact
        that would take it over (even the first one), and the client fetches the rest by ``GET``.
        A worker is then held about as long as its disk reads take, whatever a client asks.
        """
        keys = self._keys(environ)
        headers = [("Content-Type", bundle.CONTENT_TYPE), ("Cache-Control", "no-store")]
        # No Content-Length: an entry may go before its turn; HTTP/1.1 sends the body chunked,
        # and the bundle's trailer is what tells a whole one (bundle.py).
        return Response(200, headers, self._bundle_body(environ, keys), 0)

    def _bundle_body(self, environ: dict, keys: list[str]) -> Iterator[bytes]:
        room = BUNDLE_BYTES
        frames = 0
        for key in keys:
            try:
                opened = self._serve(environ, key, room)
                if opened is False:
                    break  # over the bundle's bytes: the trailer says how many frames came
                frames += 1
                if opened is None:
                    yield bundle.missing_head(key)
                    continue
                info, fh = opened
                room -= info.size
                yield bundle.artifact_head(key, info.size, info.sha256)
                yield from file_chunks(fh, info.size)
            except (OSError, StorageUnavailable) as exc:
                # The answer has begun (its 200 is sent): it cannot become an error now. It ends
                # without its trailer, which the client takes as a bundle cut short (the rest by GET).
                log.warning("bundle cut short at %s: %s", key[:12], exc)
                return
        yield bundle.trailer(frames)

    def _manifest(self, name: str) -> dict | None:
        """The manifest of a stored artifact (verified before it was stored), or None if it cannot be read."""
        try:
            opened = self.storage.open("polykit", name, use=False)
            if opened is None:
                return None
            with opened[1] as fh:
                return read_metadata(fh, self.limits)
        except (OSError, ArtifactError, StorageUnavailable):
            return None

    # --- service endpoints (HEAD is answered as GET without the body) ------------------------

    def status_page(self, environ: dict, params: dict) -> Response:
        """The status page for people: the figures of /v1/stats as self-contained HTML (see statuspage)."""
        if params["namespace"]:  # one page for the whole server
            raise refuse("not_found", "The status page is at / only.")
        refresh = statuspage.parse_refresh(environ.get("QUERY_STRING", ""))
        data = statuspage.render(self.metrics.stats(), refresh).encode()
        return Response(200, [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(data))),
                              *statuspage.HEADERS], [data], len(data))

    def newest_task(self, environ: dict, params: dict) -> Response:
        """``GET /v1/tasks?package=P&task=T``: the newest artifact stored for a task, with its key components."""
        try:
            query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True, max_num_fields=4))
        except ValueError:
            raise refuse("bad_request", "The query takes package and task.") from None
        package, task = query.get("package", ""), query.get("task", "")
        if not package or not task:
            raise refuse("bad_request", "The query needs package=NAME and task=NAME.")
        found = self.metrics.history.newest(package, task, params["namespace"])
        if found is None:
            raise refuse("not_found", f"No artifact of {package}:{task} is indexed here.")
        return json_response(200, found)

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


def make_app(config: Config, storage: Store, metrics: Metrics | None = None, access: Access | None = None) -> CacheApp:
    """Build the WSGI application over an opened store (see :mod:`store`); without ``access`` the server is open."""
    access = access or Access(None, {}, config.allow_anonymous_read)
    if metrics is None:
        # The history sits in the local storage folder, whatever store holds the artifacts.
        metrics = Metrics(storage.usage, History.open(config.storage_dir), config.max_storage)
    app = CacheApp(config, storage, metrics, access)
    routes = app.polykit_routes()
    for module in (turbo, nx, kv, bazel):
        routes += module.routes(app)
    app.router = Router(routes)
    return app
