"""A plain key-value cache under ``/kv/{namespace}/{key path}``, for ccache and Gradle.

ccache's ``remote_storage = http://host:8080/kv/ccache`` (``layout=subdirs`` or ``flat``) and
Gradle's HTTP build cache (``url = "http://host:8080/kv/gradle/"``) GET, HEAD and PUT opaque
entries; a repeated PUT answers 2xx and keeps the first entry (Gradle and ccache treat anything
else as an error), and an entry over the size limit is 413, which Gradle understands.
"""

from __future__ import annotations

from .blobs import check_segments, get_blob, put_blob
from .routes import Route


def _name(params: dict) -> str:
    parts = [params["namespace"], *params["path"].split("/")]
    check_segments(parts, "A key-value path")
    return "/".join(parts)


def routes(app) -> list[Route]:
    """The key-value routes of the app's route table."""

    def get(environ: dict, params: dict):
        return get_blob(app, environ, "kv", _name(params), head=False)

    def head(environ: dict, params: dict):
        return get_blob(app, environ, "kv", _name(params), head=True)

    def put(environ: dict, params: dict):
        return put_blob(app, environ, "kv", _name(params))

    return [Route("kv", "kv", r"/kv/(?P<namespace>[^/]+)/(?P<path>.+)", {"GET": get, "HEAD": head, "PUT": put},
                  writes=frozenset({"PUT"}), samples=("/kv/ccache/ab/cdef", "/kv/gradle/0123abcd", "/kv/ns/ac/" + "0" * 64))]
