"""Turborepo's remote cache API (v8), as the ``turbo`` client speaks it.

``turbo run build --api=http://host:8080 --token=T --team=my-team`` (or ``TURBO_API``,
``TURBO_TOKEN``, ``TURBO_TEAM``) uploads and downloads artifacts under ``/v8/artifacts/{hash}``,
namespaced by the team it passes as ``slug``, ``teamId`` or ``team``. turbo treats any answer
but 2xx as a failure, so a repeated upload answers 202 and keeps the first blob; it reads
``x-artifact-duration`` as an integer and checks ``x-artifact-tag`` itself when signing is on;
and it expects errors as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs

from .app import HTTPError, Response, json_response
from .blobs import check_segments, get_blob, put_blob

HASH = r"(?P<hash>[A-Za-z0-9_-]{1,128})"
_DURATION = re.compile(r"\d{1,15}")
_TAG = re.compile(r"[A-Za-z0-9+/=_.-]{1,1024}")
MAX_QUERY = 1 << 20


def _team(environ: dict) -> str:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    team = (query.get("slug") or query.get("teamId") or query.get("team") or ["_"])[0]
    check_segments([team], "A team name")
    return team


def _name(environ: dict, digest: str) -> str:
    return f"turbo/{_team(environ)}/{digest[:2]}/{digest}"


def _headers(meta: dict) -> list[tuple[str, str]]:
    headers = [("x-artifact-duration", str(meta.get("duration", 0)))]
    if meta.get("tag"):
        headers.append(("x-artifact-tag", meta["tag"]))
    return headers


def render_error(exc: HTTPError) -> Response:
    """turbo's error shape."""
    return json_response(exc.status, {"error": {"code": exc.error, "message": exc.message}}, exc.headers)


def routes(app) -> list:
    """(pattern, handlers by method, public, error renderer) entries for the app's route table."""

    def status(environ: dict, params: dict) -> Response:
        return json_response(200, {"status": "enabled"})

    def events(environ: dict, params: dict) -> Response:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if 0 < length <= MAX_QUERY:
            environ["wsgi.input"].read(length)  # usage events: accepted and not kept
        return json_response(200, {})

    def query(environ: dict, params: dict) -> Response:
        """Which of these hashes are stored (Vercel's "query information about an array of artifacts")."""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if not 0 < length <= MAX_QUERY:
            raise HTTPError(400, "bad_request", "Send a JSON body {\"hashes\": [...]} of at most 1 MiB.")
        try:
            hashes = json.loads(environ["wsgi.input"].read(length))["hashes"]
            if not isinstance(hashes, list) or not all(isinstance(h, str) and re.fullmatch(HASH, h) for h in hashes):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise HTTPError(400, "bad_request", "The body must be {\"hashes\": [\"<hash>\", ...]}.") from None
        found: dict = {}
        for digest in hashes[:1000]:
            name = _name(environ, digest)
            size = app.storage.blob_stat(name)
            if size is None:
                found[digest] = None
                continue
            meta = app.storage.blob_meta(name)
            found[digest] = {"size": size, "taskDurationMs": int(meta.get("duration", 0)), "tag": meta.get("tag")}
        return json_response(200, found)

    def get(environ: dict, params: dict) -> Response:
        name = _name(environ, params["hash"])
        return get_blob(app, environ, name, head=False, extra_headers=_headers(app.storage.blob_meta(name)))

    def head(environ: dict, params: dict) -> Response:
        name = _name(environ, params["hash"])
        return get_blob(app, environ, name, head=True, extra_headers=_headers(app.storage.blob_meta(name)))

    def put(environ: dict, params: dict) -> Response:
        meta = {}
        duration = environ.get("HTTP_X_ARTIFACT_DURATION", "0").strip() or "0"
        if not _DURATION.fullmatch(duration):
            raise HTTPError(400, "bad_request", "x-artifact-duration must be a whole number of milliseconds.")
        meta["duration"] = int(duration)
        tag = environ.get("HTTP_X_ARTIFACT_TAG", "").strip()
        if tag:
            if not _TAG.fullmatch(tag):
                raise HTTPError(400, "bad_request", "x-artifact-tag is not a valid tag.")
            meta["tag"] = tag
        answer = put_blob(app, environ, _name(environ, params["hash"]), created=202, existing=202, meta=meta)
        return json_response(answer.status, {"urls": []})

    return [
        (re.compile(r"/v8/artifacts/status"), {"GET": status}, False, render_error),
        (re.compile(r"/v8/artifacts/events"), {"POST": events}, False, render_error),
        (re.compile(r"/v8/artifacts"), {"POST": query}, False, render_error),
        (re.compile(rf"/v8/artifacts/{HASH}"), {"GET": get, "HEAD": head, "PUT": put}, False, render_error),
    ]
