"""Bazel's HTTP remote cache: ``/ac/{sha256}`` and ``/cas/{sha256}``, with an optional instance prefix.

What bazel's ``--remote_cache=http://...`` and ccache's ``layout=bazel`` send. A CAS entry is
content-addressed: an upload whose SHA-256 differs from its key is refused and not stored. An
action-cache entry may be replaced (a rerun action records its new result). PUT answers 200.
"""

from __future__ import annotations

import re

from .blobs import check_segments, get_blob, put_blob

PATTERN = re.compile(r"/(?:(?P<instance>[^?#]+?)/)?(?P<kind>ac|cas)/(?P<hash>[0-9a-f]{64})")


def _name(params: dict) -> tuple[str, str, str]:
    instance = params.get("instance") or "_"
    parts = instance.split("/")
    check_segments(parts, "An instance name")
    digest, kind = params["hash"], params["kind"]
    return f"bazel/{instance}/{kind}/{digest[:2]}/{digest}", kind, digest


def routes(app) -> list:
    """(pattern, handlers by method, public) entries for the app's route table."""

    def get(environ: dict, params: dict):
        return get_blob(app, environ, _name(params)[0], head=False)

    def head(environ: dict, params: dict):
        return get_blob(app, environ, _name(params)[0], head=True)

    def put(environ: dict, params: dict):
        name, kind, digest = _name(params)
        if kind == "cas":
            return put_blob(app, environ, name, expected_sha256=digest, created=200, existing=200)
        return put_blob(app, environ, name, replace=True, created=200, existing=200)

    return [(PATTERN, {"GET": get, "HEAD": head, "PUT": put}, False)]
