"""AWS Signature Version 4, header-based, as S3 and S3-compatible stores check it.

The steps are AWS's "Create a signed AWS API request" (canonical request, string to sign,
derived key, signature); S3's flavour differs from other services in two ways, both followed
here: the URI path is encoded once (not twice), and the payload's SHA-256 is sent as
``x-amz-content-sha256`` and signed. ``tests/test_sigv4.py`` checks this module against the
signatures AWS publishes for its examples.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Credentials:
    """An access key; the secret and session token never appear in a repr or a log."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def uri_encode(text: str, slash: bool = False) -> str:
    """Percent-encode every byte but ``A-Z a-z 0-9 - . _ ~`` (and ``/`` in a path), as SigV4 requires."""
    return quote(text, safe="-._~" + ("/" if slash else ""))


def canonical_query(params: list[tuple[str, str]]) -> str:
    """Parameters encoded, then sorted by name and value, joined by ``&``."""
    return "&".join(f"{k}={v}" for k, v in sorted((uri_encode(k), uri_encode(v)) for k, v in params))


def _signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signature(method: str, path: str, params: list[tuple[str, str]], headers: dict[str, str], payload_hash: str,
              credentials: Credentials, region: str, service: str, amz_date: str) -> tuple[str, str]:
    """(signed header names, signature) of a request.

    ``path`` is already URI-encoded; ``headers`` (names in lower case) must hold ``host`` and
    ``x-amz-date`` and are all signed; ``amz_date`` is ``YYYYMMDDTHHMMSSZ``.
    """
    names = sorted(headers)
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in names)
    signed = ";".join(names)
    request = "\n".join([method, path, canonical_query(params), canonical_headers, signed, payload_hash])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    key = _signing_key(credentials.secret_key, amz_date[:8], region, service)
    return signed, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def authorization(method: str, path: str, params: list[tuple[str, str]], headers: dict[str, str], payload_hash: str,
                  credentials: Credentials, region: str, service: str, amz_date: str) -> str:
    """The ``Authorization`` header of a request (see :func:`signature`)."""
    signed, sig = signature(method, path, params, headers, payload_hash, credentials, region, service, amz_date)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    return f"{ALGORITHM} Credential={credentials.access_key}/{scope}, SignedHeaders={signed}, Signature={sig}"
