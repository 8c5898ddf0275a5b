"""A small S3 client on ``http.client``: signed requests, kept-alive connections, retries, a breaker.

Only what the S3 store needs: object GET/HEAD/PUT/DELETE, ListObjectsV2 and multipart uploads.
Bodies move in 1 MiB blocks in both directions, so memory stays flat whatever an object's size.

- **Retries**: a connection error, a 5xx, or ``SlowDown`` is retried with full-jitter exponential
  backoff (AWS Architecture Blog, "Exponential Backoff And Jitter"), within a deadline per
  request; 4xx answers are final.
- **Circuit breaker**: after ``BREAKER_FAILURES`` requests in a row failed that way, requests
  fail at once for ``BREAKER_COOLDOWN`` seconds (then one is let through to probe), so a dead
  bucket does not tie up every worker for a deadline each.
- **Credentials**: from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``), else the shared credentials file (``AWS_SHARED_CREDENTIALS_FILE`` or
  ``~/.aws/credentials``) and ``AWS_PROFILE``. They are never logged.
"""

from __future__ import annotations

import configparser
import http.client
import logging
import os
import random
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import BinaryIO, Mapping
from urllib.parse import urlsplit

from .sigv4 import EMPTY_SHA256, Credentials, authorization, uri_encode
from .store import StorageUnavailable

log = logging.getLogger("polykit_cache.s3")

BLOCK = 1 << 20  # bytes per socket write and per read of a body
CONNECT_TIMEOUT = 10.0  # seconds a connect or a single socket read may take
REQUEST_DEADLINE = 60.0  # seconds for a request and all its retries (the body's transfer excluded)
MAX_ATTEMPTS = 5
BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0
BREAKER_FAILURES, BREAKER_COOLDOWN = 5, 5.0
MAX_IDLE_CONNECTIONS = 16
MAX_ERROR_BODY = 64 * 1024  # an error's XML is read up to this size
# A successful answer that is not streamed (a listing page of 1,000 keys is about 300 KiB) is
# read whole up to this size; a larger one is a broken store, not something to hold in memory.
MAX_ANSWER_BODY = 8 << 20


class S3Error(Exception):
    """A final (non-retried) answer other than success: its status, S3 error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Unreachable(StorageUnavailable):
    """The bucket did not answer usably within the deadline, or the breaker is open."""


class CredentialsMissing(Exception):
    """No access key was found."""


def load_credentials(environ: Mapping[str, str]) -> Credentials:
    """The access key from the environment, else from the shared credentials file's profile."""
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or None)
    path = environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(os.path.expanduser("~"), ".aws", "credentials")
    profile = environ.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise CredentialsMissing(f"the shared credentials file {path} cannot be read: {exc.__class__.__name__}") from None
    if parser.has_section(profile):
        section = parser[profile]
        key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if key and secret:
            return Credentials(key.strip(), secret.strip(), (section.get("aws_session_token") or "").strip() or None)
    raise CredentialsMissing(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give profile "
        f"{profile!r} aws_access_key_id and aws_secret_access_key in {path}")


@dataclass(frozen=True)
class Endpoint:
    """Where the bucket is and how its URLs are made."""

    url: str  # scheme://host[:port]
    region: str
    bucket: str
    virtual_host: bool  # bucket.host/key rather than host/bucket/key
    ca_file: str | None = None

    @staticmethod
    def make(url: str | None, region: str, bucket: str, style: str = "auto", ca_file: str | None = None) -> "Endpoint":
        """AWS's own endpoint by default; ``auto`` uses virtual hosts on AWS and paths elsewhere
        (MinIO, Ceph and most self-hosted stores answer paths only)."""
        if not url:
            url = f"https://s3.{region}.amazonaws.com"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint URL: {url!r}")
        if style == "auto":
            virtual = parts.hostname.endswith(".amazonaws.com") and "." not in bucket
        else:
            virtual = style == "virtual"
        return Endpoint(f"{parts.scheme}://{parts.netloc}", region, bucket, virtual, ca_file)

    @property
    def host(self) -> str:
        netloc = urlsplit(self.url).netloc
        return f"{self.bucket}.{netloc}" if self.virtual_host else netloc

    def path(self, key: str) -> str:
        """The request path of a key (``""``: the bucket itself)."""
        encoded = uri_encode(key, slash=True)
        return f"/{encoded}" if self.virtual_host else f"/{self.bucket}/{encoded}" if key else f"/{self.bucket}"


class Response:
    """A received answer; ``stream`` is left open for a streamed GET and must be closed."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, stream=None, release=None) -> None:
        self.status, self.headers, self.body, self.stream = status, headers, body, stream
        self._release = release

    def read(self, size: int = BLOCK) -> bytes:
        return self.stream.read(size)

    def close(self, reusable: bool = True) -> None:
        """Done with a streamed body: the connection goes back to the pool only if it was read to its end."""
        if self._release is not None:
            release, self._release = self._release, None
            release(reusable and self.stream.isclosed())


class Breaker:
    """Consecutive failures open it for a cooldown; then one request at a time probes."""

    def __init__(self, failures: int = BREAKER_FAILURES, cooldown: float = BREAKER_COOLDOWN) -> None:
        self.failures, self.cooldown = failures, cooldown
        self._lock = threading.Lock()
        self._count = 0
        self._open_until = 0.0

    def allow(self) -> bool:
        with self._lock:
            if self._count < self.failures:
                return True
            now = time.monotonic()
            if now < self._open_until:
                return False
            self._open_until = now + self.cooldown  # this one probes; others wait for its outcome
            return True

    def success(self) -> None:
        with self._lock:
            self._count = 0

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._count >= self.failures:
                self._open_until = time.monotonic() + self.cooldown

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._count >= self.failures and time.monotonic() < self._open_until


def _error_of(status: int, body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 error body, or generic ones."""
    try:
        root = ET.fromstring(body) if body else None
    except ET.ParseError:
        root = None
    if root is not None:
        return root.findtext("Code") or f"HTTP{status}", root.findtext("Message") or ""
    return f"HTTP{status}", ""


class Body:
    """A bounded slice of an open file, read in blocks by http.client; rewound for a retry."""

    def __init__(self, fh: BinaryIO, offset: int, length: int) -> None:
        self.fh, self.offset, self.length = fh, offset, length
        self._left = length

    def rewind(self) -> None:
        self.fh.seek(self.offset)
        self._left = self.length

    def read(self, size: int = BLOCK) -> bytes:
        if self._left <= 0:
            return b""
        data = self.fh.read(min(size if size and size > 0 else BLOCK, self._left))
        self._left -= len(data)
        return data


class S3Client:
    """Thread-safe; connections are kept alive and reused."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, *, deadline: float = REQUEST_DEADLINE,
                 breaker: Breaker | None = None, clock=time.time) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self.deadline = deadline
        self.breaker = breaker or Breaker()
        self._clock = clock
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        parts = urlsplit(endpoint.url)
        self._https = parts.scheme == "https"
        self._port = parts.port
        self._ssl = ssl.create_default_context(cafile=endpoint.ca_file) if self._https else None

    # --- connections ---------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        host = self.endpoint.host.rsplit(":", 1)[0] if self._port else self.endpoint.host
        if self._https:
            return http.client.HTTPSConnection(host, self._port, timeout=CONNECT_TIMEOUT, context=self._ssl, blocksize=BLOCK)
        return http.client.HTTPConnection(host, self._port, timeout=CONNECT_TIMEOUT, blocksize=BLOCK)

    def _release(self, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if reusable:
            with self._lock:
                if len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # --- requests ------------------------------------------------------------------------------

    def _signed_headers(self, method: str, path: str, params: list[tuple[str, str]], headers: Mapping[str, str],
                        payload_hash: str) -> dict[str, str]:
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        signed = {k.lower(): v for k, v in headers.items()}
        signed.update({"host": self.endpoint.host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash})
        if self.credentials.session_token:
            signed["x-amz-security-token"] = self.credentials.session_token
        signed["authorization"] = authorization(method, path, params, {k: v for k, v in signed.items()}, payload_hash,
                                                self.credentials, self.endpoint.region, "s3", amz_date)
        return signed

    def request(self, method: str, key: str, *, params: list[tuple[str, str]] = (), headers: Mapping[str, str] = {},
                body: bytes | Body | None = None, payload_hash: str | None = None, stream: bool = False,
                ok: tuple[int, ...] = (200, 204, 206)) -> Response:
        """Send one request, retrying what may be retried; answers in ``ok`` are returned, others
        raise S3Error (final) or Unreachable (the deadline or the breaker)."""
        params = list(params)
        path = self.endpoint.path(key)
        if payload_hash is None:
            import hashlib

            payload_hash = EMPTY_SHA256 if body is None else hashlib.sha256(body).hexdigest()
        url = path + ("?" + "&".join(f"{uri_encode(k)}={uri_encode(v)}" if v else uri_encode(k) for k, v in params)
                      if params else "")
        started = time.monotonic()
        problem = "no attempt"
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
                if time.monotonic() - started + delay > self.deadline:
                    break
                time.sleep(delay)
            if not self.breaker.allow():
                raise Unreachable(f"the bucket {self.endpoint.bucket} failed repeatedly; not asking it for "
                                  f"{self.breaker.cooldown:.0f} s")
            if isinstance(body, Body):
                body.rewind()
            send_headers = self._signed_headers(method, path, params, headers, payload_hash)
            length = body.length if isinstance(body, Body) else len(body) if body is not None else 0
            if body is not None or method in ("PUT", "POST"):
                send_headers["content-length"] = str(length)
            conn = self._connection()
            # Every socket operation of this attempt ends by the request's deadline (bounded below
            # so a late attempt still gets a chance); CONNECT_TIMEOUT bounds each one anyway.
            timeout = min(CONNECT_TIMEOUT, max(self.deadline - (time.monotonic() - started), 1.0))
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, url, body=body, headers=send_headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                problem = f"{exc.__class__.__name__}: {exc}"
                self.breaker.failure()
                continue
            answer = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status in ok:
                self.breaker.success()
                if stream and method == "GET":
                    return Response(resp.status, answer, b"", resp, lambda reusable, c=conn: self._release(c, reusable))
                try:
                    data = resp.read(MAX_ANSWER_BODY + 1)
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    problem = f"{exc.__class__.__name__}: {exc}"
                    self.breaker.failure()
                    continue
                if len(data) > MAX_ANSWER_BODY:
                    conn.close()
                    self.breaker.failure()
                    raise Unreachable(f"the store answered {method} with more than {MAX_ANSWER_BODY} bytes")
                self._release(conn, resp.isclosed() and not resp.will_close)
                return Response(resp.status, answer, data)
            try:
                data = resp.read(MAX_ERROR_BODY)
                reusable = resp.isclosed() and not resp.will_close
            except (OSError, http.client.HTTPException):
                data, reusable = b"", False
            self._release(conn, reusable)
            code, message = _error_of(resp.status, data)
            if resp.status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
                problem = f"{resp.status} {code}"
                self.breaker.failure()
                continue
            self.breaker.success()  # the bucket answered: it is there, only the request was refused
            raise S3Error(resp.status, code, message)
        raise Unreachable(f"the bucket {self.endpoint.bucket} at {self.endpoint.url} did not answer usably: {problem}")
