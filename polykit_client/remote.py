"""The remote cache backend: ``HEAD``/``GET``/``PUT`` of artifacts, the batch query and bundles of
downloads, over plain ``urllib.request``.

A remote cache only ever saves time, so nothing here may fail a build: every problem becomes a
``False`` answer and at most one warning line, and the caller builds the task locally. After
``max_failures`` consecutive network failures the backend switches itself off for the rest of the
run, so an unreachable server costs a few short timeouts rather than one per task.

Downloads are streamed to the caller's file and trusted only when their length and SHA-256 match
what the server announced; uploads are streamed from disk. Only the standard library is used, so
the client runs from a zipapp on a bare build agent.

Whatever a server (or something posing as one) answers is bounded: http.client refuses a status
or header line over 64 KiB and more than 100 header fields, error bodies are read up to 64 KiB,
and every transfer has an overall deadline (``deadline.py``) besides the per-read timeout.
Proxies come from the environment as curl reads it (``proxy.py``); connections are kept alive
and reused between requests (``connections.py``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, TypeVar

from . import __version__, bundle
from .artifact import MAX_COMPONENTS
from .connections import KeepAliveMixin, Pool, StaleConnection, release
from .deadline import Deadline, Watchdog
from .proxy import Proxy, proxy_for

Progress = Callable[[int, int | None], None]
T = TypeVar("T")

# Send and receive in 256 KiB blocks: http.client's default of 8 KiB caps uploads at a fraction
# of what the server can take.
CHUNK = 256 * 1024
BACKOFF_START = 0.05
BACKOFF_BUDGET = 0.5
MAX_ERROR_BODY = 64 * 1024
# The batch query (POST /v1/artifacts) takes at most QUERY_BATCH keys a request; its answer is
# read up to MAX_QUERY_ANSWER bytes (a thousand keys with their size and digest take ~130 KB).
QUERY_BATCH = 1000
MAX_QUERY_ANSWER = 1024 * 1024
MAX_MESSAGE = 300
# The default deadline of one transfer: DEADLINE_TIMEOUTS per-read timeouts (connecting, sending
# the request and receiving the answer's head may each take one) plus one second per
# DEADLINE_RATE bytes of body. 1 MiB/s (8 Mbit/s) is slower than any link a shared build cache
# pays off over, yet it gives the largest default artifact (1 GiB) 17 minutes.
DEADLINE_TIMEOUTS = 3
DEADLINE_RATE = 1024 * 1024
# The digits of a Content-Length (RFC 9110 section 8.6: 1*DIGIT, ASCII only; str.isdigit and int
# would also take "²", "١٠" or "1_0"), at most 19 of them, so the number fits in 64 bits.
_LENGTH = re.compile(r"[0-9]{1,19}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # any control character but HTAB
_KEY = re.compile(r"[0-9a-f]{64}")
_HASH = re.compile(r"[0-9a-fA-F]{64}")
# Visible ASCII only: anything else cannot travel in a header field (RFC 9110 section 5.5).
_TOKEN = re.compile(r"[\x21-\x7e]+")


class BadRemoteURL(ValueError):
    """The configured remote cache URL cannot be used; the message names it for the user."""


def default_warn(message: str) -> None:
    """Warnings share stderr with task logs, so each is one line that says what it is."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- transport --------------------------------------------------------------------------------


class _EarlyAnswerMixin:
    """Keeps a refused upload readable.

    A server may answer before it has read the whole body (RFC 9110 section 15.5.14: a 413 can
    be sent as soon as the headers show the length) and then close the connection, so the
    client's next send fails with a reset or a broken pipe while the answer already waits in
    the socket. The send error is held back, the rest of the body is skipped, and the answer is
    read; only when no answer can be read does the send error surface.
    """

    _body: object = None
    _send_error: OSError | None = None

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("blocksize", CHUNK)  # large sends: 8 KiB blocks cap an upload's speed
        super().__init__(*args, **kwargs)
        # The deadline of the request in flight, set per request: a kept-alive connection
        # serves many transfers, and may reconnect (http.client's auto_open) for any of them.
        self.deadline: Deadline | None = None
        create = self._create_connection

        def created(*args, **kwargs):
            sock = create(*args, **kwargs)
            if self.deadline is not None:
                self.deadline.watch(sock)  # the plain socket: a proxy's CONNECT answer is read on it
            return sock

        self._create_connection = created

    def connect(self):
        super().connect()
        if self.deadline is not None:
            self.deadline.watch(self.sock)  # the TLS socket, when there is one

    def request(self, method, url, body=None, headers=None, **kwargs):
        self._body, self._send_error = body, None
        return super().request(method, url, body, {} if headers is None else headers, **kwargs)

    def send(self, data):
        if self._send_error is not None:
            return
        try:
            super().send(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._send_error = exc
            stop = getattr(self._body, "stop", None)
            if stop is not None:
                stop()

    def getresponse(self):
        try:
            return super().getresponse()
        except (OSError, http.client.HTTPException) as exc:
            if self._send_error is not None:
                raise self._send_error from exc
            raise


class _HTTPConnection(_EarlyAnswerMixin, http.client.HTTPConnection):
    pass


class _HTTPHandler(KeepAliveMixin, urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req)


def _build_opener(pool: Pool) -> urllib.request.OpenerDirector:
    """An opener whose connections are kept alive in ``pool`` (``connections.py``).

    Every answer comes back as it is, errors included: no redirects, since a cache that
    redirects is misconfigured and a PUT body cannot be replayed to another address anyway (the
    warning shows the Location instead). Nor with urllib's ProxyHandler: the proxy is chosen per
    request, as curl chooses it."""
    handlers: list[urllib.request.BaseHandler] = [_HTTPHandler(pool)]
    if hasattr(http.client, "HTTPSConnection"):  # a Python built without ssl has no https
        handlers.append(_https_handler(pool))
    opener = urllib.request.OpenerDirector()
    for handler in handlers:
        opener.add_handler(handler)
    opener.addheaders = [("User-Agent", f"polykit/{__version__}")]
    return opener


def _https_handler(pool: Pool) -> urllib.request.BaseHandler:
    class _HTTPSConnection(_EarlyAnswerMixin, http.client.HTTPSConnection):
        pass

    class _HTTPSHandler(KeepAliveMixin, urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(_HTTPSConnection, req, context=self._context)

    return _HTTPSHandler(pool)


class _UploadBody:
    """The file as a request body: exactly the announced number of bytes, read block by block.

    A body that ends before its Content-Length would leave the server waiting for the rest
    (RFC 9112 section 6.3), so a file that shrank while being sent is an error at once.
    """

    def __init__(self, fh: BinaryIO, size: int, progress: Progress | None) -> None:
        self._fh, self._size, self._progress = fh, size, progress
        self.sent = 0
        self._stopped = False

    def read(self, amount: int = -1) -> bytes:
        left = self._size - self.sent
        if self._stopped or left <= 0:
            return b""
        data = self._fh.read(left if amount is None or amount < 0 else min(amount, left))
        if not data:
            raise _FileChanged(f"the file shrank while it was being sent ({self.sent} of {self._size} bytes)")
        self.sent += len(data)
        if self._progress is not None:
            self._progress(self.sent, self._size)
        return data

    def stop(self) -> None:
        self._stopped = True


class _FileChanged(Exception):
    """Raised from inside http.client's send loop; deliberately not an OSError so that
    urllib does not dress it up as a network error."""


# --- outcomes ---------------------------------------------------------------------------------


class _Failure(Exception):
    """One failed attempt.

    ``transient`` failures (network errors, timeouts, 5xx, a body cut short) count towards
    switching the remote off and are worth a retry, unless ``retry`` is False (a transfer that
    ran out of time would only be as slow again); the others (a refusal, a corrupt body) would
    only repeat themselves.
    """

    def __init__(self, reason: str, *, transient: bool, retry: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.retry = retry


class _Stale(_Failure):
    """A reused connection turned out closed by the server before any answer (``connections.py``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=True)


def _one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """Server text goes into a warning line: no control characters, bounded length."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _describe(exc: BaseException, timeout: float) -> str:
    """A short human reason for a transport failure (never the request's headers)."""
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return _one_line(str(exc.reason))
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "the connection was reset"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({_one_line(str(exc.strerror))})"
    if isinstance(exc, http.client.HTTPException):
        return f"malformed answer ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return _one_line(exc.strerror)
    return _one_line(str(exc)) or type(exc).__name__


def _status_reason(status: int, answer: _Answer | None) -> str:
    """``HTTP 413 too_large: <the server's message>``; the JSON body is what our server sends
    with every error, anything else falls back to the reason phrase."""
    word, message = "", ""
    try:
        raw = answer.read(MAX_ERROR_BODY) if answer is not None else b""
        payload = json.loads(raw) if raw else None
    except (OSError, http.client.HTTPException, ValueError, RecursionError):  # deep nesting: RecursionError
        payload = None
    if isinstance(payload, dict):
        word = payload.get("error") if isinstance(payload.get("error"), str) else ""
        message = payload.get("message") if isinstance(payload.get("message"), str) else ""
    if not word and answer is not None:
        word = answer.reason
    text = f"HTTP {status}" + (f" {word}" if word else "") + (f": {message}" if message else "")
    location = answer.headers.get("Location") if answer is not None and answer.headers is not None else None
    if location and 300 <= status < 400:
        text += f" (redirected to {location}; point the remote cache URL there)"
    return _one_line(text)


def _is_transient(status: int) -> bool:
    # RFC 9110 section 15.6: 5xx means the server failed and a repeat may succeed; 507
    # (RFC 4918 section 11.5, storage full) will not clear up within a retry.
    return status >= 500 and status != 507


def _as_failure(exc: Exception) -> _Failure:
    """Anything unforeseen (a bug, or an answer no check above anticipated) still ends as one
    failure: counted like a network failure, so a server that keeps provoking it is switched off."""
    if isinstance(exc, _Failure):
        return exc
    return _Failure(f"unexpected {type(exc).__name__}: {_one_line(str(exc), 200)}", transient=True)


def _backoff(retries: int) -> list[float]:
    """Delays before each retry: 50 ms doubling, all of them together within half a second,
    because a task waiting on a dead cache should fall back to building quickly."""
    delays: list[float] = []
    spent = 0.0
    for attempt in range(retries):
        delay = max(0.0, min(BACKOFF_START * 2**attempt, BACKOFF_BUDGET - spent))
        delays.append(delay)
        spent += delay
    return delays


def _validate_url(url: str) -> str:
    """Refuse early, naming the URL, rather than fail later on every task."""
    if not isinstance(url, str):
        raise BadRemoteURL(f"remote cache URL {url!r} is not http(s)://host[:port][/prefix]: not a string")
    shown = url
    try:
        parts = urllib.parse.urlsplit(url.strip())
        if "@" in parts.netloc:  # whatever precedes the @ may be a secret: never repeat it
            shown = url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
        problem = _url_problem(parts)
    except ValueError as exc:  # e.g. a port that is not a number (RFC 3986 section 3.2.3)
        problem = str(exc)
    if problem:
        raise BadRemoteURL(f"remote cache URL {shown!r} is not http(s)://host[:port][/prefix]: {problem}")
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


def _url_problem(parts: urllib.parse.SplitResult) -> str:
    if parts.scheme.lower() not in ("http", "https"):
        return f"the scheme must be http or https, not {parts.scheme!r}" if parts.scheme else "no http:// or https://"
    if not parts.hostname:
        return "no host name"
    if parts.username is not None or parts.password is not None:
        return "credentials do not belong in the URL; use the token setting"
    _ = parts.port  # raises ValueError when out of range
    if parts.query or parts.fragment or "?" in parts.geturl() or "#" in parts.geturl():
        return "no query or fragment is allowed"
    if any(c.isspace() or not c.isprintable() for c in parts.geturl()):
        return "it contains spaces or control characters"
    return ""


def _check_key(key: str) -> None:
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise ValueError(f"a cache key is 64 lowercase hex characters, not {key!r}")


# --- the backend ------------------------------------------------------------------------------


class RemoteCache:
    """One remote cache server for one run; safe to share between threads.

    ``bytes_down`` and ``bytes_up`` count completed transfers only (verified downloads, stored
    uploads): they feed the run summary, where bytes of failed attempts would mislead.
    """

    def __init__(self, url: str, *, token: str | None = None, read_only: bool = False,
                 timeout: float = 10.0, deadline: float | None = None, retries: int = 2, max_failures: int = 3,
                 max_artifact_size: int | None = None, environ: Mapping[str, str] | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        """``deadline``: seconds one transfer (request, answer and body) may take in all; None for
        DEADLINE_TIMEOUTS × ``timeout`` plus a second per DEADLINE_RATE bytes of its body.
        ``environ`` (default ``os.environ``) holds the proxy variables; a proxy that cannot be
        used raises ``proxy.ProxyError``, a ValueError, like a bad URL."""
        self.url = _validate_url(url)
        if timeout <= 0 or retries < 0 or max_failures < 1 or (deadline is not None and deadline <= 0):
            raise ValueError("timeout and deadline must be positive, retries at least 0 and max_failures at least 1")
        if max_artifact_size is not None and max_artifact_size < 0:
            raise ValueError("max_artifact_size must not be negative")
        self._token = self._checked_token(token)
        self.read_only = read_only
        self.timeout = timeout
        self.deadline = deadline
        self.proxy: Proxy | None = proxy_for(self.url, os.environ if environ is None else environ)
        self.retries = retries
        self.max_failures = max_failures
        self.max_artifact_size = max_artifact_size
        self._warn = warn or default_warn
        self.enabled = True
        self.bytes_down = 0
        self.bytes_up = 0
        self._failures = 0
        self._bundle_warned = False  # a broken bundle is said once a run (the rest are fetched one by one)
        self._lock = threading.Lock()
        self._pool = Pool()
        self._opener = _build_opener(self._pool)
        self._watchdog = Watchdog()

    @staticmethod
    def _checked_token(token: str | None) -> str | None:
        """Tokens often come from files with a trailing newline; anything else odd would make an
        invalid header, and the error must not echo the secret."""
        if token is None or not token.strip():
            return None
        token = token.strip()
        if _TOKEN.fullmatch(token) is None:
            raise ValueError("the remote cache token contains spaces, control or non-ASCII characters")
        return token

    def close(self) -> None:
        """Close the idle kept-alive connections (the object stays usable: it opens new ones)."""
        self._pool.close()

    def __repr__(self) -> str:
        auth = ", token=<set>" if self._token else ""
        via = f", proxy={str(self.proxy)!r}" if self.proxy else ""
        return f"RemoteCache(url={self.url!r}{auth}{via}, read_only={self.read_only}, enabled={self.enabled})"

    # --- public operations ---------------------------------------------------------------------
    # Each catches every exception, not only the failures foreseen: whatever a server answers,
    # the caller gets False and at most one warning, never a traceback.

    def exists(self, key: str) -> bool:
        """Whether the server holds ``key``; any doubt is a no, so the caller builds."""
        _check_key(key)
        if not self.enabled:
            return False
        try:
            found = self._with_retries(lambda: self._attempt(0, lambda deadline: self._head(key, deadline)))
        except Exception as exc:
            self._failed(_as_failure(exc), f"cannot check for artifact {key[:12]}")
            return False
        self._succeeded()
        return found

    def which(self, keys: list[str]) -> dict[str, int | None] | None:
        """Which of ``keys`` the server holds, asked in one request per QUERY_BATCH keys: the size
        the server gives for each one it holds (0 when it gives none), None for each it lacks.

        A key the answer leaves out is not in the result. None when the server cannot say: one
        that predates the batch query (404 or 405), or any failure. That is quiet and tried once:
        the batch query only saves round trips, and the caller then asks task by task, where each
        failure is retried, warned about and counted towards switching the remote off as ever.
        """
        keys = list(dict.fromkeys(keys))
        for key in keys:
            _check_key(key)
        if not self.enabled:
            return None
        found: dict[str, int | None] = {}
        try:
            for start in range(0, len(keys), QUERY_BATCH):
                answer = self._attempt(0, lambda deadline: self._query(keys[start:start + QUERY_BATCH], deadline))
                if answer is None:
                    return None
                found.update(answer)
        except Exception:
            return None
        return found

    def fetch(self, key: str, dest: BinaryIO, progress: Progress | None = None) -> bool:
        """Download ``key`` into ``dest``; True only for a whole body whose SHA-256 matches.

        On False, ``dest`` may hold a partial or corrupt body: the caller must truncate or
        discard it. When ``dest`` is seekable a retry rewinds it to where it started.
        """
        _check_key(key)
        if not self.enabled:
            return False
        try:
            download = _Download(dest, progress)
            size = self._with_retries(lambda: self._attempt(0, lambda deadline: self._get(key, download, deadline)),
                                      download.rewind)
        except Exception as exc:
            self._failed(_as_failure(exc), f"download of {key[:12]} failed", "; the task will be built locally")
            return False
        self._succeeded()
        if size is None:
            return False
        with self._lock:
            self.bytes_down += size
        return True

    def fetch_bundle(self, keys: list[str], size: int, open_dest: Callable[[str], tuple[BinaryIO, Progress | None]],
                     done: Callable[[str, bool], None]) -> list[str] | None:
        """Download the artifacts of ``keys`` in one request (``POST /v1/bundles``, see ``bundle.py``).

        ``size`` is what the batch query said they weigh together (for the deadline). For each key
        the stream reaches, in order, ``open_dest(key)`` gives the file its body is written to and
        a progress display or None (not called for a key the server no longer holds), then ``done(key, ok)`` is called: ok
        only for a whole body matching its SHA-256. A body that fails its digest is warned about
        as a GET's would be, and the stream goes on (each frame has its own length).

        Returns the keys to fetch one by one: none when the bundle came whole, the ones it did
        not reach when the server ended it early (its bytes per bundle: quiet) or when it broke off (one warning in a run, however many break), or None when the
        server has no such route (an older server: quiet). A bundle that ran out of its deadline
        ends the rest with ``done(key, False)`` instead: a server that slow would only be as slow
        again per key, so those tasks are built.
        """
        for key in keys:
            _check_key(key)
        if not self.enabled:
            return list(keys)
        reached = [0]
        try:
            whole = self._attempt(size, lambda deadline: self._bundle(keys, reached, open_dest, done, deadline))
        except Exception as exc:
            failure = _as_failure(exc)
            with self._lock:
                first, self._bundle_warned = not self._bundle_warned, True
            rest = keys[reached[0]:]
            if not failure.retry:
                if first:
                    self._say(f"remote cache {self.url}: a bundle of downloads broke off ({failure.reason}); "
                              f"{len(rest)} tasks will be built locally")
                for key in rest:
                    done(key, False)
                return []
            if first:
                self._say(f"remote cache {self.url}: a bundle of downloads broke off ({failure.reason}); "
                          "the rest are downloaded one by one")
            return rest
        if not whole:
            return None
        self._succeeded()
        return keys[reached[0]:]  # none, unless the server ended the bundle early (quietly)

    def store(self, key: str, path: Path, progress: Progress | None = None, ask_first: bool = True) -> bool:
        """Upload the artifact file at ``path``; True only when the server stored it now.

        False without a word when the server already has it (another machine was first) or in
        read-only mode; False with one warning when the upload failed. Never raises for a
        network or server problem: an upload must not fail a build. ``ask_first=False`` skips
        the ``HEAD`` when a batch query of this run already said the server lacks the key.
        """
        _check_key(key)
        if self.read_only or not self.enabled:
            return False
        path = Path(path)
        what = f"upload of {key[:12]} failed"
        try:
            size = path.stat().st_size
        except OSError as exc:
            self._say(f"remote cache {self.url}: cannot upload {key[:12]}: cannot read {path}: {exc.strerror}")
            return False
        if self.max_artifact_size is not None and size > self.max_artifact_size:
            self._say(f"remote cache {self.url}: not uploading {key[:12]}: it is {size} bytes, "
                       f"over the max_artifact_size of {self.max_artifact_size} bytes")
            return False
        try:
            # HEAD first: the server spools a whole body before it can answer 409, so asking
            # is far cheaper than sending an artifact it already has.
            if ask_first and self._with_retries(lambda: self._attempt(0, lambda deadline: self._head(key, deadline))):
                self._succeeded()
                return False
            stored = self._upload(key, path, size, progress)
        except Exception as exc:
            self._failed(_as_failure(exc), what)
            return False
        self._succeeded()
        if stored:
            with self._lock:
                self.bytes_up += size
        return stored

    def task_record(self, package: str, task: str) -> dict | None:
        """The newest artifact the server indexes for a package's task, with its key components, or None.

        ``GET /v1/tasks?package=P&task=T``, for ``polykit why --remote``. Unlike the cache
        operations this raises: a ``ValueError`` of one line when the server cannot answer. The
        answer is read up to a bound (the components are bounded by the manifest check).
        """
        path = "/v1/tasks?" + urllib.parse.urlencode({"package": package, "task": task})
        limit = MAX_COMPONENTS + 64 * 1024

        def get(deadline: Deadline) -> dict | None:
            with self._open(self._request("GET", path, deadline)) as answer:
                if answer.status == 404:
                    return None
                if answer.status != 200:
                    raise _Failure(_status_reason(answer.status, answer), transient=_is_transient(answer.status))
                data = answer.read(limit + 1)
            if len(data) > limit:
                raise _Failure(f"the answer is over {limit} bytes", transient=False)
            try:
                found = json.loads(data)
            except (ValueError, RecursionError):
                raise _Failure("the answer is not JSON", transient=False) from None
            if not isinstance(found, dict) or not isinstance(found.get("key"), str):
                raise _Failure("the answer is not a task record", transient=False)
            return found

        try:
            return self._with_retries(lambda: self._attempt(0, get))
        except Exception as exc:
            raise ValueError(f"remote cache {self.url}: cannot read the record of {package}:{task} "
                             f"({_as_failure(exc).reason})") from None

    # --- single attempts ----------------------------------------------------------------------

    def deadline_for(self, size: int) -> float:
        """Seconds a transfer with a body of ``size`` bytes may take in all."""
        if self.deadline is not None:
            return self.deadline
        return DEADLINE_TIMEOUTS * self.timeout + size / DEADLINE_RATE

    def _attempt(self, size: int, attempt: Callable[[Deadline], T]) -> T:
        """One request under its deadline; a failure after the deadline passed is reported as
        such (the watchdog's shutdown shows up as a dropped connection), and is not retried."""
        deadline = self._watchdog.start(self.deadline_for(size))
        try:
            try:
                return attempt(deadline)
            except _Stale:
                # RFC 9112 section 9.3.1: the server closed the kept-alive connection while it
                # was idle, so the request never reached it. Sent once more, on a new connection;
                # the attempt builds its request afresh (an upload rewinds its file), and the
                # other idle connections, likely closed too, are dropped.
                self._pool.close()
                self._pool.fresh_next()
                return attempt(deadline)
        except Exception:
            if deadline.expired:
                raise _Failure(f"the transfer took longer than its deadline of {deadline.seconds:g} s",
                               transient=True, retry=False) from None
            raise
        finally:
            deadline.close()

    def _head(self, key: str, deadline: Deadline) -> bool:
        """Whether the server holds ``key``. A ``200`` carries the same Content-Length and
        X-Artifact-Hash as a GET would; when they are missing or malformed the answer is not
        believed, since a yes makes the caller skip its upload."""
        with self._open(self._request("HEAD", f"/v1/artifacts/{key}", deadline)) as answer:
            status = answer.status
            if status == 200:
                self._announced(answer)
                return True
            if status == 404:
                return False
            raise _Failure(_status_reason(status, answer), transient=_is_transient(status))

    def _query(self, keys: list[str], deadline: Deadline) -> dict[str, int | None] | None:
        """One batch query; None when the server has no such endpoint (an older server)."""
        with self._post_keys("/v1/artifacts", keys, deadline) as answer:
            if answer is None:
                return None
            try:
                raw = answer.read(MAX_QUERY_ANSWER + 1)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise _Failure(_describe(exc, self.timeout), transient=True) from None
            if len(raw) > MAX_QUERY_ANSWER:
                raise _Failure(f"the answer to the batch query is over {MAX_QUERY_ANSWER} bytes", transient=False)
            return _query_answer(raw, keys)

    @contextmanager
    def _post_keys(self, path: str, keys: list[str], deadline: Deadline) -> Iterator[_Answer | None]:
        """``POST {"keys": [...]}`` to ``path`` (the batch query, a bundle): its ``200`` answer, or
        None when the server has no such route (an older server: 404 or 405); other statuses fail."""
        body = json.dumps({"keys": keys}, separators=(",", ":")).encode()
        request = self._request("POST", path, deadline, body)
        request.add_header("Content-Type", "application/json")
        with self._open(request) as answer:
            status = answer.status
            if status in (404, 405):
                yield None
                return
            if status != 200:
                raise _Failure(_status_reason(status, answer), transient=_is_transient(status))
            yield answer

    def _get(self, key: str, download: _Download, deadline: Deadline) -> int | None:
        """One GET; the size of a verified body, or None for a plain miss."""
        with self._open(self._request("GET", f"/v1/artifacts/{key}", deadline)) as answer:
            status = answer.status
            if status == 404:
                return None
            if status != 200:
                raise _Failure(_status_reason(status, answer), transient=_is_transient(status))
            length, expected = self._announced(answer)
            deadline.extend(self.deadline_for(length))
            return self._receive(answer, download, length, expected)

    def _bundle(self, keys: list[str], reached: list[int], open_dest: Callable[[str], tuple[BinaryIO, Progress | None]],
                done: Callable[[str, bool], None], deadline: Deadline) -> bool:
        """One bundle request; False when the server has no such route. ``reached[0]`` counts
        the keys whose frames were read (and ``done`` called), for the caller to go on from."""
        with self._post_keys("/v1/bundles", keys, deadline) as answer:
            if answer is None:
                return False
            received = frames = 0
            for key in keys:
                line = self._line(answer)
                if bundle.is_trailer(line):
                    break  # ended early by the server (its bytes per bundle): the rest one by one
                frames += 1
                frame = self._frame_head(line, key)
                if frame is None:
                    reached[0] += 1
                    done(key, False)
                    continue
                length, expected = frame
                if self.max_artifact_size is not None and length > self.max_artifact_size:
                    raise _Failure(f"{key[:12]} is {length} bytes, over the max_artifact_size of "
                                   f"{self.max_artifact_size} bytes", transient=False)
                received += length
                deadline.extend(self.deadline_for(received))
                ok = False
                dest, progress = open_dest(key)
                with dest:
                    download = _Download(dest, progress)
                    try:
                        self._receive(answer, download, length, expected, "the SHA-256 of its bundle frame")
                        ok = True
                    except _Failure as failure:
                        if download.written != length:
                            raise  # cut short: the frames that follow cannot be found
                        self._failed(failure, f"download of {key[:12]} failed", "; the task will be built locally")
                reached[0] += 1
                if ok:
                    with self._lock:
                        self.bytes_down += length
                done(key, ok)
            else:
                line = self._line(answer)
            try:
                bundle.parse_trailer(line, frames)
            except bundle.BadFrame as exc:
                raise _Failure(_describe(exc, self.timeout), transient=True) from None
        return True

    def _line(self, answer: _Answer) -> bytes:
        """The next head or trailer line of a bundle (bounded)."""
        try:
            return answer.readline(bundle.MAX_HEAD + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _Failure(_describe(exc, self.timeout), transient=True) from None

    def _frame_head(self, line: bytes, key: str) -> tuple[int, str] | None:
        """The ``(size, sha256)`` of the frame ``line`` opens, which must be ``key``'s; None for "not stored"."""
        try:
            return bundle.parse_head(line, key)
        except bundle.BadFrame as exc:
            raise _Failure(_describe(exc, self.timeout), transient=True) from None

    def _receive(self, answer: _Answer, download: _Download, length: int, expected: str,
                 claim: str = "its X-Artifact-Hash") -> int:
        """Stream the body chunk by chunk: an artifact may be far larger than memory allows.
        ``claim`` names where ``expected`` came from, for the warning."""
        digest = hashlib.sha256()
        buf = memoryview(bytearray(CHUNK))
        while download.written < length:
            try:
                n = answer.readinto(buf[: min(CHUNK, length - download.written)])
            except (OSError, http.client.HTTPException, ValueError) as exc:
                reason = f"{_describe(exc, self.timeout)} after {download.written} of {length} bytes"
                raise _Failure(reason, transient=True) from None
            if not n:
                break
            digest.update(buf[:n])
            download.write(buf[:n], length)
        if download.written != length:
            # RFC 9112 section 6.3: a body shorter than its Content-Length is incomplete.
            raise _Failure(f"the body ended after {download.written} of {length} bytes", transient=True)
        if digest.hexdigest() != expected:
            raise _Failure(f"the body does not match {claim} (corrupt artifact)", transient=False)
        return length

    def _announced(self, answer: _Answer) -> tuple[int, str]:
        """Length and digest are both required: without them a truncated or corrupted body
        could not be told from a good one.

        Each must be given once, or repeated with the same value (RFC 9110 section 8.6: differing
        lengths make the framing unknowable), and the length must be plain ASCII digits. A
        Transfer-Encoding beside a Content-Length is refused too (RFC 9112 section 6.3: it may
        be an attempt at response splitting and ought to be handled as an error).
        """
        if answer.headers.defects or any(_CONTROL.search(value) for _, value in answer.headers.raw_items()):
            # RFC 9110 section 5.5: no control characters in a field; RFC 9112 section 5.2:
            # no line folding; every line of the block a field (http.client records the rest).
            raise _Failure("the answer's header block is malformed", transient=False)
        lengths = {v.strip() for v in answer.headers.get_all("Content-Length") or ()}
        hashes = {v.strip().lower() for v in answer.headers.get_all("X-Artifact-Hash") or ()}
        if len(lengths) != 1 or len(hashes) != 1:
            raise _Failure("the answer lacks a single Content-Length or X-Artifact-Hash", transient=False)
        (raw_length,), (raw_hash,) = lengths, hashes
        if _LENGTH.fullmatch(raw_length) is None or _HASH.fullmatch(raw_hash) is None:
            raise _Failure("the answer lacks a valid Content-Length or X-Artifact-Hash", transient=False)
        if answer.headers.get("Transfer-Encoding") is not None:
            raise _Failure("the answer has both a Content-Length and a Transfer-Encoding", transient=False)
        length = int(raw_length)
        if self.max_artifact_size is not None and length > self.max_artifact_size:
            raise _Failure(f"it is {length} bytes, over the max_artifact_size of {self.max_artifact_size} bytes",
                           transient=False)
        return length, raw_hash

    def _upload(self, key: str, path: Path, size: int, progress: Progress | None) -> bool:
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise _Failure(f"cannot read {path}: {exc.strerror}", transient=False) from None
        with fh:
            try:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            except OSError as exc:
                raise _Failure(f"cannot read {path}: {exc.strerror}", transient=False) from None

            def rewind() -> bool:
                fh.seek(0)
                return True

            # PUT is idempotent (RFC 9110 section 9.2.2), so sending it again is safe: a repeat
            # of an upload that did land gets 409, which is the same outcome.
            return self._with_retries(
                lambda: self._attempt(size, lambda deadline: self._put(key, fh, size, digest, progress, deadline)), rewind)

    def _put(self, key: str, fh: BinaryIO, size: int, digest: str, progress: Progress | None,
             deadline: Deadline) -> bool:
        fh.seek(0)
        body = _UploadBody(fh, size, progress)
        request = self._request("PUT", f"/v1/artifacts/{key}", deadline, body)
        request.add_header("Content-Type", "application/zstd")
        request.add_header("Content-Length", str(size))
        request.add_header("X-Artifact-Hash", digest)
        with self._open(request) as answer:
            status = answer.status
            if status == 201:
                return True
            if status == 409:  # RFC 9110 section 15.5.10: first write wins; another machine was first
                return False
            raise _Failure(_status_reason(status, answer), transient=_is_transient(status))

    # --- plumbing -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, deadline: Deadline, body: object = None) -> urllib.request.Request:
        """A request for ``path`` of the server (``/v1/artifacts/<key>``, the batch query, ...)."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.deadline = deadline  # read by the connection classes above
        if self._token:
            # RFC 6750 section 2.1; "unredirected" keeps it from following a redirect elsewhere.
            request.add_unredirected_header("Authorization", f"Bearer {self._token}")
        if self.proxy is not None:
            # An http:// URL is sent to the proxy in absolute form (RFC 9112 section 3.2.2); an
            # https:// one goes through a CONNECT tunnel, and only the tunnel request carries
            # Proxy-Authorization (urllib moves it there).
            request.set_proxy(self.proxy.host, "http")
            if self.proxy.authorization:
                request.add_unredirected_header("Proxy-Authorization", self.proxy.authorization)
        return request

    def _open(self, request: urllib.request.Request) -> _Answer:
        """Send one request: every HTTP answer comes back (errors included), transport failures
        become a transient ``_Failure``."""
        try:
            return _Answer(self._opener.open(request, timeout=self.timeout))
        except StaleConnection as exc:
            raise _Stale(_describe(exc.error, self.timeout)) from None
        except _FileChanged as exc:
            raise _Failure(str(exc), transient=False) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Failure(_describe(exc, self.timeout), transient=True) from None
        except ValueError as exc:  # http.client refusing the request itself: a repeat would not help
            raise _Failure(f"cannot send the request: {_one_line(str(exc))}", transient=False) from None

    def _with_retries(self, attempt: Callable[[], T], rewind: Callable[[], bool] | None = None) -> T:
        """Transient failures get another try, unless the remote was switched off meanwhile or
        what was already written cannot be taken back."""
        delays = _backoff(self.retries)
        while True:
            try:
                return attempt()
            except _Failure as failure:
                if not (failure.transient and failure.retry and delays and self.enabled) or (
                        rewind is not None and not rewind()):
                    raise
                time.sleep(delays.pop(0))

    def _succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def _failed(self, failure: _Failure, what: str, consequence: str = "") -> None:
        """One warning per failed operation, and the switch-off when failures pile up."""
        messages: list[str] = []
        with self._lock:
            if not self.enabled:
                return  # switched off while this one was in flight: that was said already
            messages.append(f"remote cache {self.url}: {what} ({failure.reason}){consequence}")
            if failure.transient:
                self._failures += 1
                if self._failures >= self.max_failures:
                    self.enabled = False
                    messages.append(f"remote cache {self.url} switched off for the rest of this run "
                                    f"after {self._failures} failures")
        for message in messages:
            self._say(message)

    def _say(self, message: str) -> None:
        """The caller prints each warning as one line; a path or a server's text must not break it."""
        self._warn(_one_line(message, limit=4000))


class _Answer:
    """An HTTP answer, success or error alike, released after use: its connection is reused or
    closed, so no socket is left half-read."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.status: int = response.status
        self.headers = response.headers

    def read(self, amount: int) -> bytes:
        return self.response.read(amount)

    def readinto(self, buf: memoryview) -> int:
        return self.response.readinto(buf)

    def readline(self, limit: int) -> bytes:
        return self.response.readline(limit)

    @property
    def reason(self) -> str:
        return str(getattr(self.response, "reason", "") or "")

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        # The connection is kept for the next request only when this exchange went cleanly.
        release(self.response, clean=exc_type is None)


class _Download:
    """The caller's file, plus what a retry needs: how much was written and where it began."""

    def __init__(self, dest: BinaryIO, progress: Progress | None) -> None:
        self.dest, self.progress = dest, progress
        self.start = dest.tell() if _seekable(dest) else None
        self.written = 0

    def write(self, data: memoryview, total: int) -> None:
        try:
            self.dest.write(data)
        except OSError as exc:  # a local disk problem, not the server's
            raise _Failure(f"cannot write the download: {exc.strerror or exc}", transient=False) from None
        self.written += len(data)
        if self.progress is not None:
            self.progress(self.written, total)

    def rewind(self) -> bool:
        """A retry must start from an empty file; a pipe cannot be taken back, so no retry."""
        if self.written == 0:
            return True
        if self.start is None:
            return False
        self.dest.seek(self.start)
        self.dest.truncate()
        self.written = 0
        return True


def _query_answer(raw: bytes, keys: list[str]) -> dict[str, int | None]:
    """``{"artifacts": {key: {"size", ...} or null}}`` read for the keys asked; anything else is refused.

    Only the keys asked count; a yes is only a reason to download (the download is verified as
    ever), a no only a reason to build and upload without asking again (a 409 is harmless). The
    size only groups downloads into bundles: a size that is not a byte count counts as 0.
    """
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):  # deep nesting: RecursionError
        payload = None
    listing = payload.get("artifacts") if isinstance(payload, dict) else None
    if not isinstance(listing, dict):
        raise _Failure("the answer to the batch query is not {\"artifacts\": {...}}", transient=False)
    found: dict[str, int | None] = {}
    for key in keys:
        if key in listing:
            entry = listing[key]
            if entry is not None and not isinstance(entry, dict):
                raise _Failure("the answer to the batch query is malformed", transient=False)
            size = entry.get("size") if entry is not None else None
            found[key] = None if entry is None else size if type(size) is int and 0 <= size < 1 << 63 else 0
    return found


def _seekable(stream: BinaryIO) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError, ValueError):
        return False
