"""A plain key-value cache under ``/kv/{name}/{key path}``, for ccache, Gradle and sccache.

ccache's ``remote_storage = http://host:8080/kv/ccache`` (``layout=subdirs`` or ``flat``) and
Gradle's HTTP build cache (``url = "http://host:8080/kv/gradle/"``) GET, HEAD and PUT opaque
entries; a repeated PUT answers 2xx and keeps the first entry (Gradle and ccache treat anything
else as an error), and an entry over the size limit is 413, which Gradle understands.

sccache's WebDAV backend (OpenDAL's ``webdav`` service) also needs the little of WebDAV
(RFC 4918) that makes a folder exist before it writes into it: it asks ``PROPFIND`` (depth 0)
of each parent folder, from the innermost up, until one exists, then sends ``MKCOL`` for each
missing one (201, or 405 for one that exists, are both success to it). Entries are stored by
name, so folders have no state: every folder under ``/kv/`` exists, ``PROPFIND`` describes it
as an empty collection, and ``MKCOL`` is a write that creates nothing. Entry names may begin
with a dot (sccache checks ``.sccache_check``), never be ``.`` or ``..``.

sccache writes ``.sccache_check`` at start-up and takes a ``403`` as "read only here" but a ``401``
as a broken cache, so on a server with anonymous reads a write without a token is ``403``
(Gradle and ccache treat both alike: the entry is not stored, the build goes on).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from urllib.parse import quote
from xml.sax.saxutils import escape

from .blobs import check_segments, get_blob, put_blob
from .http import Response, json_response
from .routes import Route
from .store import entry_name


def _name(params: dict) -> str:
    """The name in the store's ``kv`` space."""
    parts = [params["name"], *params["path"].split("/")]
    check_segments(parts, "A key-value path", leading_dot=True)
    return entry_name(params["namespace"], "/".join(parts))


def _folder(environ: dict, params: dict) -> str:
    """The folder's path as the client sent it, after its parts were checked."""
    parts = [part for part in params["folder"].split("/") if part]
    if parts:
        check_segments(parts, "A key-value folder", leading_dot=True)
    return quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))


def multistatus(href: str) -> Response:
    """RFC 4918 9.1: a depth-0 PROPFIND answer for a collection (OpenDAL reads its last-modified too)."""
    modified = formatdate(time.time(), usegmt=True)
    body = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<D:multistatus xmlns:D="DAV:"><D:response>'
        f"<D:href>{escape(href)}</D:href>"
        "<D:propstat><D:prop><D:resourcetype><D:collection/></D:resourcetype>"
        f"<D:getlastmodified>{modified}</D:getlastmodified></D:prop>"
        "<D:status>HTTP/1.1 200 OK</D:status></D:propstat>"
        "</D:response></D:multistatus>\n"
    ).encode()
    headers = [("Content-Type", 'application/xml; charset="utf-8"'), ("Content-Length", str(len(body)))]
    return Response(207, headers, [body], len(body))


def routes(app) -> list[Route]:
    """The key-value routes of the app's route table."""

    def get(environ: dict, params: dict):
        return get_blob(app, environ, "kv", _name(params), head=False)

    def head(environ: dict, params: dict):
        return get_blob(app, environ, "kv", _name(params), head=True)

    def put(environ: dict, params: dict):
        return put_blob(app, environ, "kv", _name(params))

    def propfind(environ: dict, params: dict) -> Response:
        return multistatus(_folder(environ, params))

    def mkcol(environ: dict, params: dict) -> Response:
        _folder(environ, params)
        return json_response(201, {"stored": False})  # folders hold no state: nothing to keep

    # An entry's path never ends with "/"; a folder's always does, as WebDAV clients send it.
    entry = r"/kv/(?P<name>[^/]+)/(?P<path>[^/](?:.*[^/])?)"
    folder = r"/kv(?P<folder>(?:/[^/]+)*)/"
    return [
        Route("kv", "kv", entry, {"GET": get, "HEAD": head, "PUT": put}, writes=frozenset({"PUT"}),
              anonymous_write_status=403, samples=("/kv/ccache/ab/cdef", "/kv/gradle/0123abcd", "/kv/ns/ac/" + "0" * 64, "/kv/sccache/.sccache_check")),
        Route("kv", "kv", folder, {"PROPFIND": propfind, "MKCOL": mkcol}, writes=frozenset({"MKCOL"}),
              anonymous_write_status=403, bodiless=frozenset({"MKCOL"}), reads=frozenset({"PROPFIND"}), samples=("/kv/", "/kv/sccache/", "/kv/sccache/a/b/")),
    ]
