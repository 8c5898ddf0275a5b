"""Bazel's HTTP remote cache: ``/ac/{sha256}`` and ``/cas/{sha256}``, with an optional instance prefix.

What bazel's ``--remote_cache=http://...`` and ccache's ``layout=bazel`` send. A CAS entry is
content-addressed: an upload whose SHA-256 differs from its key is refused and not stored. An
action-cache entry may be replaced (a rerun action records its new result). PUT answers 200.

The empty blob (the SHA-256 of nothing) is always present in the CAS: Bazel never uploads empty
outputs (bazelbuild/bazel#11063), the remote APIs ask servers to act as if it were stored
(bazelbuild/remote-apis#131), and bazel-remote answers it on its HTTP routes too.

The instance name is whatever precedes ``/ac/`` or ``/cas/``, so this is the route table's
fallback: it never takes a path whose first segment another protocol owns (``/v8/...``,
``/kv/...``), and such an instance name is not served.
"""

from __future__ import annotations

import hashlib

from .blobs import check_segments, get_blob, put_blob
from .http import Response, json_response
from .routes import Route

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
PATTERN = r"/(?:(?P<instance>[^?#]+?)/)?(?P<kind>ac|cas)/(?P<hash>[0-9a-f]{64})"


def _name(params: dict) -> tuple[str, str, str]:
    """(space, name in it, digest): ``bazel-ac`` or ``bazel-cas``, ``<instance>/<sha256>``."""
    instance = params.get("instance") or "_"
    check_segments(instance.split("/"), "An instance name")
    digest, kind = params["hash"], params["kind"]
    return f"bazel-{kind}", f"{instance}/{digest}", digest


def _empty(app, environ: dict, head: bool) -> Response:
    app.metrics.lookup(True, protocol="bazel")
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", "0")]
    return Response(200, headers, [] if head else [b""], 0)


def routes(app) -> list[Route]:
    """The Bazel routes of the app's route table."""

    def get(environ: dict, params: dict) -> Response:
        space, name, digest = _name(params)
        if space == "bazel-cas" and digest == EMPTY_SHA256:
            return _empty(app, environ, head=False)
        return get_blob(app, environ, space, name, head=False)

    def head(environ: dict, params: dict) -> Response:
        space, name, digest = _name(params)
        if space == "bazel-cas" and digest == EMPTY_SHA256:
            return _empty(app, environ, head=True)
        return get_blob(app, environ, space, name, head=True)

    def put(environ: dict, params: dict) -> Response:
        space, name, digest = _name(params)
        if space == "bazel-cas" and digest == EMPTY_SHA256 and app.content_length(environ) == 0:
            return json_response(200, {"stored": False})  # always present; nothing to keep
        if space == "bazel-cas":
            return put_blob(app, environ, space, name, expected_sha256=digest, created=200, existing=200)
        return put_blob(app, environ, space, name, created=200, existing=200)  # the action cache is replaced

    sha = "0" * 64
    return [Route("bazel", "", PATTERN, {"GET": get, "HEAD": head, "PUT": put}, writes=frozenset({"PUT"}),
                  fallback=True, samples=(f"/ac/{sha}", f"/cas/{sha}", f"/my-instance/cas/{sha}", f"/a/b/ac/{sha}"))]
