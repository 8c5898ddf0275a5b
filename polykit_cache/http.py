"""HTTP pieces shared by the application and every protocol module: the error type, the response,
JSON bodies and reason phrases.

This module imports nothing of the application, so protocol modules and the app both import it
without a cycle.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import BinaryIO, Iterable, Iterator
from wsgiref.util import FileWrapper

# Bodies are sent in chunks of this size (from disk by waitress's I/O thread).
SEND_CHUNK = 256 * 1024
# A stored entry up to this size is read whole by the worker and answered as bytes: one read
# costs less than the file wrapper's bookkeeping (seek, tell, a read per turn of the I/O loop),
# and holding it in memory is bounded by this times the worker threads.
READ_AT_ONCE = 64 * 1024


_REASONS = {status.value: status.phrase for status in HTTPStatus}
_STATUS_LINES = {status: f"{status} {phrase}" for status, phrase in _REASONS.items()}


def reason(status: int) -> str:
    """The reason phrase of a status code (RFC 9110 15), from the standard library's table."""
    return _REASONS.get(status, "Unknown")


def status_line(status: int) -> str:
    """WSGI's status string (PEP 3333): the code and its reason phrase, made once per code."""
    return _STATUS_LINES.get(status) or f"{status} {reason(status)}"


def file_body(environ: dict, fh: BinaryIO, size: int) -> Iterable[bytes]:
    """The body of an answer from an open file of ``size`` bytes, which it takes over (and closes).

    A small file is read at once (see READ_AT_ONCE); a larger one goes to the server's
    ``wsgi.file_wrapper`` (PEP 3333), so waitress's I/O thread sends it and the worker is free.
    """
    if size <= READ_AT_ONCE:
        return list(file_chunks(fh, size))
    return environ.get("wsgi.file_wrapper", FileWrapper)(fh, SEND_CHUNK)


def file_chunks(fh: BinaryIO, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of an open file, in pieces of at most SEND_CHUNK; it takes the file
    over (and closes it). A file that ends early raises OSError: an answer whose length was
    announced must then be cut off, never padded or ended short as if whole."""
    with fh:
        left = size
        while left:
            data = fh.read(min(SEND_CHUNK, left))
            if not data:
                raise OSError(f"the stored file ended {left} bytes short of its {size} bytes")
            left -= len(data)
            yield data


class HTTPError(Exception):
    """An answer other than success; the application renders it in the route's error shape.

    ``reject`` names the refusal in ``polykit_cache_uploads_rejected_total`` (None: not counted)
    and ``received`` the body bytes read before it; :mod:`outcomes` sets both.
    """

    def __init__(self, status: int, error: str, message: str, headers: Iterable[tuple[str, str]] = (),
                 *, reject: str | None = None, received: int = 0, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = list(headers)
        self.reject = reject
        self.received = received
        self.extra = extra


class Response:
    """Status, headers and a body iterable; ``length`` is what the access log records."""

    __slots__ = ("status", "headers", "body", "length")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: Iterable[bytes], length: int) -> None:
        self.status, self.headers, self.body, self.length = status, headers, body, length


def json_response(status: int, payload: dict, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """A JSON answer with its length."""
    data = json.dumps(payload).encode() + b"\n"
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    return Response(status, head + list(headers), [data], len(data))


def error_body(error: str, message: str, **extra: object) -> dict:
    """The JSON object of every error answer of the polykit protocol."""
    return {"error": error, "message": message, **extra}


def render_json_error(exc: HTTPError) -> Response:
    """The spec's error shape: ``{"error": word, "message": sentence}``."""
    return json_response(exc.status, error_body(exc.error, exc.message, **exc.extra), exc.headers)

