"""GET, HEAD and PUT of other build tools' opaque blobs, shared by their protocol modules.

A blob is hashed while it is spooled, synced, then published whole (never partially); what we
can check depends on the protocol (a content-addressed key must match the SHA-256).
"""

from __future__ import annotations

import re
from typing import Iterable
from wsgiref.util import FileWrapper

from .app import HTTPError, Response, SEND_CHUNK, json_response
from .storage import StorageFull
from .verification import IncompleteBody, receive_blob

SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_segments(parts: Iterable[str], what: str) -> None:
    """Every path segment of a blob name: safe characters, never empty, '.' or '..'."""
    for part in parts:
        if not SEGMENT.fullmatch(part) or len(part) > 255:
            raise HTTPError(400, "bad_key", f"{what} may only hold letters, digits, '_', '-' and '.' in each part.")


def get_blob(app, environ: dict, name: str, head: bool, extra_headers: Iterable[tuple[str, str]] = ()) -> Response:
    """Answer GET or HEAD of a blob from disk (sent by waitress's I/O thread)."""
    fh = None if head else app.storage.open_blob(name)
    size = app.storage.blob_stat(name) if head else None
    if fh is not None:
        size = app.storage.blob_size_of(fh)
    protocol = environ.get("polykit.protocol", "polykit")
    if size is None:
        app.storage.forget(name)  # in case it was moved away behind the server's back
        app.metrics.lookup(False, protocol=protocol)
        raise HTTPError(404, "not_found", "No such blob is stored.")
    app.storage.touch(name)
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size)), *extra_headers]
    if head:
        app.metrics.lookup(True, protocol=protocol)
        return Response(200, headers, [], 0)
    app.metrics.lookup(True, size, protocol=protocol)
    wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
    return Response(200, headers, wrapper(fh, SEND_CHUNK), size)


def put_blob(app, environ: dict, name: str, *, replace: bool = False, expected_sha256: str | None = None,
             created: int = 201, existing: int = 200, meta: dict | None = None) -> Response:
    """Store a blob; a repeated PUT of a kept key answers ``existing`` (first write wins unless ``replace``)."""
    length = app.content_length(environ)
    if not replace and app.storage.blob_stat(name) is not None:
        return json_response(existing, {"stored": False})
    try:
        received = receive_blob(app.storage, environ["wsgi.input"], length)
    except IncompleteBody as exc:
        raise HTTPError(400, "incomplete_body", f"The request body is incomplete: {exc}.") from None
    except StorageFull:
        app.metrics.reject("storage_full", length)
        raise HTTPError(507, "storage_full", "The cache's disk is full; the blob was not stored.") from None
    if expected_sha256 is not None and received.sha256 != expected_sha256:
        received.temp.unlink(missing_ok=True)
        app.metrics.reject("hash_mismatch", received.size)
        raise HTTPError(400, "hash_mismatch", "The body's SHA-256 differs from its content-addressed key; not stored.")
    try:
        stored = app.storage.publish_blob(name, received.temp, received.size, replace=replace, meta=meta)
    except StorageFull:
        app.metrics.reject("storage_full", received.size)
        raise HTTPError(507, "storage_full", "The cache's disk is full; the blob was not stored.") from None
    if stored:
        app.metrics.upload(received.size)
    return json_response(created if stored else existing, {"stored": stored})
