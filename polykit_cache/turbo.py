"""Turborepo's remote cache API (v8), as the ``turbo`` client speaks it.

``turbo run build --api=http://host:8080 --token=T --team=my-team`` (or ``TURBO_API``,
``TURBO_TOKEN``, ``TURBO_TEAM``) uploads and downloads artifacts under ``/v8/artifacts/{hash}``,
namespaced by the team it passes as ``slug``, ``teamId`` or ``team``. turbo treats any answer
but 2xx as a failure, so a repeated upload answers 202 and keeps the first blob; it reads
``x-artifact-duration`` as an integer and checks ``x-artifact-tag`` itself when signing is on;
and it expects errors as ``{"error": {"code", "message"}}``.

``turbo run --preflight`` first sends ``OPTIONS`` to the artifact's URL, as a browser's CORS
preflight (Fetch standard): it sends the real request to the answer's ``Location`` (or the same
URL without one), and includes its ``Authorization`` header only when the answer's
``Access-Control-Allow-Headers`` names it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Mapping
from urllib.parse import parse_qsl

from .blobs import check_segments, get_blob, put_blob
from .http import HTTPError, Response, json_response
from .outcomes import read_body, refuse
from .routes import Route
from .store import entry_name

HASH = r"(?P<hash>(?!(?:status|events)$)[A-Za-z0-9_-]{1,128})"
_HASH = re.compile(r"[A-Za-z0-9_-]{1,128}")
# ASCII digits only: a regular expression's \d also takes other scripts' digits, which int() reads.
_DURATION = re.compile(r"[0-9]{1,15}")
_TAG = re.compile(r"[A-Za-z0-9+/=_.-]{1,1024}")
# A batch query names at most this many hashes (turbo asks for one task graph at a time), in a
# JSON body of at most BODY_LIMIT bytes; usage events are bounded the same way.
MAX_HASHES = 1000
BODY_LIMIT = 1 << 20
MAX_QUERY_FIELDS = 16
# Query strings whose team is kept parsed (see _team_of).
TEAM_CACHE = 256
# The request headers turbo sends with an artifact (its preflight asks about them).
PREFLIGHT_HEADERS = "Authorization, Content-Type, Content-Length, User-Agent, x-artifact-duration, x-artifact-tag, x-artifact-client-ci, x-artifact-client-interactive"


def _team(environ: dict) -> str:
    """The team of a request (the query string's length is bounded by admission)."""
    return _team_of(environ.get("QUERY_STRING", ""))


@lru_cache(maxsize=TEAM_CACHE)
def _team_of(query: str) -> str:
    """The team a query string names, or the refusal (raised, so never kept in the cache).

    A client sends the same query with every request, so the team is parsed once per query
    string and kept (at most TEAM_CACHE of them, each under the query string's bound).
    """
    try:
        fields = dict(parse_qsl(query, max_num_fields=MAX_QUERY_FIELDS))
    except ValueError:
        raise refuse("bad_request", f"The query string may hold at most {MAX_QUERY_FIELDS} parameters.") from None
    team = fields.get("slug") or fields.get("teamId") or fields.get("team") or "_"
    check_segments([team], "A team name")
    return team


def _name(params: dict, team: str, digest: str) -> str:
    """The name in the store's ``turbo`` space."""
    return entry_name(params["namespace"], f"{team}/{digest}")


def _headers(meta: Mapping[str, object]) -> list[tuple[str, str]]:
    headers = [("x-artifact-duration", str(meta.get("duration", 0)))]
    if meta.get("tag"):
        headers.append(("x-artifact-tag", meta["tag"]))
    return headers


def render_error(exc: HTTPError) -> Response:
    """turbo's error shape."""
    return json_response(exc.status, {"error": {"code": exc.error, "message": exc.message}}, exc.headers)


def routes(app) -> list[Route]:
    """The turbo routes of the app's route table."""

    def status(environ: dict, params: dict) -> Response:
        return json_response(200, {"status": "enabled"})

    def events(environ: dict, params: dict) -> Response:
        read_body(environ)  # usage events: accepted and not kept
        return json_response(200, {})

    def query(environ: dict, params: dict) -> Response:
        """Which of these hashes are stored (Vercel's "query information about an array of artifacts")."""
        team = _team(environ)
        shape = f'The body must be {{"hashes": ["<hash>", ...]}} with at most {MAX_HASHES} hashes.'
        body = read_body(environ)
        try:
            # RecursionError: deeply nested arrays make the json module recurse once per level.
            hashes = json.loads(body)["hashes"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise refuse("bad_request", shape) from None
        if not isinstance(hashes, list) or len(hashes) > MAX_HASHES:
            raise refuse("bad_request", shape)
        if not all(isinstance(h, str) and _HASH.fullmatch(h) for h in hashes):
            raise refuse("bad_request", shape)
        found: dict = {}
        for digest in hashes:
            stat = app.storage.stat("turbo", _name(params, team, digest))
            if stat is None:
                found[digest] = None
                continue
            found[digest] = {"size": stat.size, "taskDurationMs": int(stat.meta.get("duration", 0)),
                             "tag": stat.meta.get("tag")}
        return json_response(200, found)

    def get(environ: dict, params: dict) -> Response:
        return get_blob(app, environ, "turbo", _name(params, _team(environ), params["hash"]), head=False,
                        headers_for=_headers)

    def head(environ: dict, params: dict) -> Response:
        return get_blob(app, environ, "turbo", _name(params, _team(environ), params["hash"]), head=True,
                        headers_for=_headers)

    def put(environ: dict, params: dict) -> Response:
        name = _name(params, _team(environ), params["hash"])
        meta = {}
        duration = environ.get("HTTP_X_ARTIFACT_DURATION", "0").strip() or "0"
        if not _DURATION.fullmatch(duration):
            raise refuse("bad_request", "x-artifact-duration must be a whole number of milliseconds.")
        meta["duration"] = int(duration)
        tag = environ.get("HTTP_X_ARTIFACT_TAG", "").strip()
        if tag:
            if not _TAG.fullmatch(tag):
                raise refuse("bad_request", "x-artifact-tag is not a valid tag.")
            meta["tag"] = tag
        answer = put_blob(app, environ, "turbo", name, created=202, existing=202, meta=meta)
        return json_response(answer.status, {"urls": []})

    def preflight(environ: dict, params: dict) -> Response:
        """What a CORS preflight answers: the methods and the headers turbo may send here."""
        headers = [
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "GET, HEAD, PUT, OPTIONS"),
            ("Access-Control-Allow-Headers", PREFLIGHT_HEADERS),
            ("Access-Control-Max-Age", "600"),
        ]
        return Response(204, headers, [], 0)

    common = {"root": "v8", "render": render_error}
    return [
        Route("turbo", pattern=r"/v8/artifacts/status", handlers={"GET": status}, samples=("/v8/artifacts/status",), **common),
        # Usage events are accepted and dropped: nothing is stored, so a read token may send them.
        Route("turbo", pattern=r"/v8/artifacts/events", handlers={"POST": events}, reads=frozenset({"POST"}),
              read_body_limit=BODY_LIMIT, samples=("/v8/artifacts/events",), **common),
        # The batch query only reads, whatever its method.
        Route("turbo", pattern=r"/v8/artifacts", handlers={"POST": query}, reads=frozenset({"POST"}),
              read_body_limit=BODY_LIMIT, samples=("/v8/artifacts",), **common),
        Route("turbo", pattern=rf"/v8/artifacts/{HASH}", handlers={"GET": get, "HEAD": head, "PUT": put, "OPTIONS": preflight},
              writes=frozenset({"PUT"}), reads=frozenset({"GET", "HEAD", "OPTIONS"}), samples=("/v8/artifacts/abc123", "/v8/artifacts/statuses"), **common),
    ]
