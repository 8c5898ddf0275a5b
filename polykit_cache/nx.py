"""Nx's self-hosted remote cache (``NX_SELF_HOSTED_REMOTE_CACHE_SERVER``), as its OpenAPI spec says.

``PUT /v1/cache/{hash}`` stores (``409`` when the record exists: records are never overridden),
``GET /v1/cache/{hash}`` returns it; ``401``/``403`` come with a plain-text body.

Nx reads an error's body only when its ``Content-Type`` is exactly ``text/plain`` (with a
charset parameter it shows "Misconfigured remote cache endpoint" instead), so no parameter is
sent. Nx takes a ``401`` as fatal and a ``403`` on ``PUT`` as "may not write here", so on a
server with anonymous reads an upload without a token is ``403``: cold tasks still run.
"""

from __future__ import annotations

from .blobs import get_blob, put_blob
from .http import HTTPError, Response
from .outcomes import refuse
from .routes import Route
from .store import entry_name


def render_error(exc: HTTPError) -> Response:
    """Nx's clients read errors as plain text."""
    body = (exc.message + "\n").encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *exc.headers]
    return Response(exc.status, headers, [body], len(body))


def routes(app) -> list[Route]:
    """The Nx routes of the app's route table."""

    def name(params: dict) -> str:
        return entry_name(params["namespace"], params["hash"])

    def get(environ: dict, params: dict) -> Response:
        return get_blob(app, environ, "nx", name(params), head=False)

    def head(environ: dict, params: dict) -> Response:
        return get_blob(app, environ, "nx", name(params), head=True)

    def put(environ: dict, params: dict) -> Response:
        answer = put_blob(app, environ, "nx", name(params), created=200, existing=409)
        if answer.status == 409:
            raise refuse("exists", "Cannot override an existing record.")
        return answer

    return [Route("nx", "v1", r"/v1/cache/(?P<hash>[A-Za-z0-9_-]{1,128})", {"GET": get, "HEAD": head, "PUT": put},
                  writes=frozenset({"PUT"}), render=render_error, anonymous_write_status=403, samples=("/v1/cache/abc123",))]
