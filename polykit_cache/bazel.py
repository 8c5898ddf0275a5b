"""Bazel's HTTP remote cache: ``/ac/{sha256}`` and ``/cas/{sha256}``, with an optional instance prefix.

What bazel's ``--remote_cache=http://...`` and ccache's ``layout=bazel`` send. A CAS entry is
content-addressed: an upload whose SHA-256 differs from its key is refused and not stored. An
action-cache entry may be replaced (a rerun action records its new result). PUT answers 200.

The empty blob (the SHA-256 of nothing) is always present in the CAS: Bazel never uploads empty
outputs (bazelbuild/bazel#11063), the remote APIs ask servers to act as if it were stored
(bazelbuild/remote-apis#131), and bazel-remote answers it on its HTTP routes too.

The instance name is whatever precedes ``/ac/`` or ``/cas/``: the URL namespace every protocol
has (:mod:`routes`), so ``--remote_cache=http://host:8080/my-instance`` is a cache of its own.
"""

from __future__ import annotations

import hashlib

from .blobs import get_blob, put_blob
from .http import Response, json_response
from .routes import Route
from .store import entry_name

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _name(params: dict) -> tuple[str, str, str]:
    """(space, name in it, digest): ``bazel-ac`` or ``bazel-cas``, the SHA-256 in the instance's namespace."""
    digest, kind = params["hash"], params["kind"]
    return f"bazel-{kind}", entry_name(params["namespace"], digest), digest


def _empty(app, environ: dict, head: bool) -> Response:
    app.metrics.lookup(True, protocol="bazel", namespace=environ.get("polykit.namespace", ""))
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
    return [Route("bazel", kind, rf"/(?P<kind>{kind})/(?P<hash>[0-9a-f]{{64}})", {"GET": get, "HEAD": head, "PUT": put},
                  writes=frozenset({"PUT"}), samples=(f"/{kind}/{sha}",))
            for kind in ("ac", "cas")]
