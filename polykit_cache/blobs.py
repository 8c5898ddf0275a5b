"""GET, HEAD and PUT of other build tools' opaque blobs, shared by their protocol modules.

A blob is staged in the store while it is hashed, then committed whole (never partially); what
we can check depends on the protocol (a content-addressed key must match the SHA-256). Refusals go
through :func:`outcomes.refuse`, so they mean the same in every protocol.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping
from wsgiref.util import FileWrapper

from .http import SEND_CHUNK, Response, json_response
from .outcomes import refuse
from .store import REPLACEABLE, StorageFull
from .verification import SPOOLED, IncompleteBody, receive_blob

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


def get_blob(app, environ: dict, space: str, name: str, head: bool,
             headers_for: Callable[[Mapping[str, object]], Iterable[tuple[str, str]]] | None = None) -> Response:
    """Answer GET or HEAD of a blob from the store (a file is sent by waitress's I/O thread)."""
    protocol = environ.get("polykit.protocol", "polykit")
    namespace = environ.get("polykit.namespace", "")
    fh = None
    if head:
        found = app.storage.stat(space, name, use=True)
    else:
        opened = app.storage.open(space, name)
        found, fh = opened if opened is not None else (None, None)
    if found is None:
        app.metrics.lookup(False, protocol=protocol, namespace=namespace)
        raise refuse("not_found", "No such blob is stored.")
    extra = list(headers_for(found.meta)) if headers_for else []
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(found.size)), *extra]
    if head:
        app.metrics.lookup(True, protocol=protocol, namespace=namespace)
        return Response(200, headers, [], 0)
    app.metrics.lookup(True, found.size, protocol=protocol, namespace=namespace)
    wrapper = environ.get("wsgi.file_wrapper", FileWrapper)
    return Response(200, headers, wrapper(fh, SEND_CHUNK), found.size)


def put_blob(app, environ: dict, space: str, name: str, *, expected_sha256: str | None = None,
             created: int = 201, existing: int = 200, meta: Mapping[str, object] | None = None) -> Response:
    """Store a blob; a repeated PUT of a kept name answers ``existing`` (first write wins, except
    in the spaces whose entries are replaced, see :data:`store.REPLACEABLE`)."""
    length = app.content_length(environ)
    if space not in REPLACEABLE and app.storage.stat(space, name) is not None:
        return json_response(existing, {"stored": False})
    full = "The cache's storage is full; the blob was not stored."
    try:
        staged = receive_blob(app.storage, environ["wsgi.input"], length, environ.get(SPOOLED))
    except IncompleteBody as exc:
        raise refuse("incomplete_body", f"The request body is incomplete: {exc}.") from None
    except StorageFull:
        raise refuse("storage_full", full, received=length) from None
    if expected_sha256 is not None and staged.sha256 != expected_sha256:
        staged.discard()
        raise refuse("hash_mismatch", "The body's SHA-256 differs from its content-addressed key; not stored.",
                     received=staged.size)
    size = staged.size
    try:
        stored = app.storage.commit(space, name, staged, meta)
    except StorageFull:
        raise refuse("storage_full", full, received=size) from None
    if stored:
        app.metrics.upload(size, environ.get("polykit.protocol", "polykit"))
    return json_response(created if stored else existing, {"stored": stored})
