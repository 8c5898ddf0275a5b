"""GET, HEAD and PUT of other build tools' opaque blobs, shared by their protocol modules.

A blob is hashed while it is spooled, synced, then published whole (never partially); what we
can check depends on the protocol (a content-addressed key must match the SHA-256). Refusals go
through :func:`outcomes.refuse`, so they mean the same in every protocol.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable
from wsgiref.util import FileWrapper

from .http import SEND_CHUNK, Response, json_response
from .outcomes import refuse
from .storage import StorageFull
from .verification import IncompleteBody, receive_blob

SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# WebDAV clients keep files whose names begin with a dot (sccache probes ".sccache_check"): the
# key-value protocol takes them, but never "." or "..", which would name a folder, not an entry.
DOTTED_SEGMENT = re.compile(r"(?!\.\.?$)\.?[A-Za-z0-9_.-]+")
MAX_SEGMENT = 255  # a file name on every common filesystem
# No tool names its entries more than a few folders deep (ccache: 3, Gradle: 1, a Bazel
# instance: 1-3); names are stored under a hash, so this bounds parsing, not folders on disk.
MAX_SEGMENTS = 32


def check_segments(parts: list[str], what: str, leading_dot: bool = False) -> None:
    """Every path segment of a blob name: safe characters, never empty, '.' or '..'; a bounded count.

    ``leading_dot`` lets a part begin with '.' (``.sccache_check``), as files on WebDAV may.
    """
    if len(parts) > MAX_SEGMENTS:
        raise refuse("bad_key", f"{what} may have at most {MAX_SEGMENTS} parts; this one has {len(parts)}.")
    pattern = DOTTED_SEGMENT if leading_dot else SEGMENT
    for part in parts:
        if len(part) > MAX_SEGMENT or not pattern.fullmatch(part):
            first = "" if leading_dot else ", not beginning with '.'"
            raise refuse("bad_key", f"{what} may only hold letters, digits, '_', '-' and '.' in each part "
                                    f"(at most {MAX_SEGMENT} characters each{first}; never '.' or '..').")


def blob_name(protocol: str, namespace: str, rest: str) -> str:
    """The storage name of a protocol's entry ``rest`` in a URL namespace (``""`` for none).

    A namespace is one ``@``-prefixed part (its own parts joined by ``:``): validated parts never
    begin with ``@`` nor hold ``:``, so no namespace's entry can take another's name, and entries
    without a namespace keep the names they always had.
    """
    if not namespace:
        return f"{protocol}/{rest}"
    return f"{protocol}/@{namespace.replace('/', ':')}/{rest}"


def namespace_of(name: str) -> str:
    """The URL namespace of a storage name made by :func:`blob_name` (``""`` for none)."""
    parts = name.split("/", 2)
    if len(parts) > 2 and parts[1].startswith("@"):
        return parts[1][1:].replace(":", "/")
    return ""


def get_blob(app, environ: dict, name: str, head: bool,
             headers_for: Callable[[dict], Iterable[tuple[str, str]]] | None = None) -> Response:
    """Answer GET or HEAD of a blob from disk (sent by waitress's I/O thread).

    The blob's metadata is read after the blob was found: it is written before the blob is
    published, so a blob that is visible always has its metadata.
    """
    fh = None if head else app.storage.open_blob(name)
    size = app.storage.blob_stat(name) if head else None
    if fh is not None:
        size = app.storage.blob_size_of(fh)
    protocol = environ.get("polykit.protocol", "polykit")
    namespace = environ.get("polykit.namespace", "")
    if size is None:
        app.storage.forget(name)  # in case it was moved away behind the server's back
        app.metrics.lookup(False, protocol=protocol, namespace=namespace)
        raise refuse("not_found", "No such blob is stored.")
    app.storage.touch(name)
    extra = list(headers_for(app.storage.blob_meta(name))) if headers_for else []
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size)), *extra]
    if head:
        app.metrics.lookup(True, protocol=protocol, namespace=namespace)
        return Response(200, headers, [], 0)
    app.metrics.lookup(True, size, protocol=protocol, namespace=namespace)
    wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
    return Response(200, headers, wrapper(fh, SEND_CHUNK), size)


def put_blob(app, environ: dict, name: str, *, replace: bool = False, expected_sha256: str | None = None,
             created: int = 201, existing: int = 200, meta: dict | None = None) -> Response:
    """Store a blob; a repeated PUT of a kept key answers ``existing`` (first write wins unless ``replace``)."""
    length = app.content_length(environ)
    if not replace and app.storage.blob_stat(name) is not None:
        return json_response(existing, {"stored": False})
    full = "The cache's disk is full; the blob was not stored."
    try:
        received = receive_blob(app.storage, environ["wsgi.input"], length)
    except IncompleteBody as exc:
        raise refuse("incomplete_body", f"The request body is incomplete: {exc}.") from None
    except StorageFull:
        raise refuse("storage_full", full, received=length) from None
    if expected_sha256 is not None and received.sha256 != expected_sha256:
        received.temp.unlink(missing_ok=True)
        raise refuse("hash_mismatch", "The body's SHA-256 differs from its content-addressed key; not stored.",
                     received=received.size)
    try:
        stored = app.storage.publish_blob(name, received.temp, received.size, replace=replace, meta=meta)
    except StorageFull:
        raise refuse("storage_full", full, received=received.size) from None
    if stored:
        app.metrics.upload(received.size)
    return json_response(created if stored else existing, {"stored": stored})
