"""One table from domain outcomes to HTTP answers: status, error word and metric label.

Every protocol refuses through :func:`refuse`, so a full disk, an existing entry, an incomplete
body, a failed verification or a denied request mean the same status, the same ``error`` word and
the same ``polykit_cache_uploads_rejected_total{reason}`` label everywhere. Labels come from this
table and the fixed verification reasons only, so no request can add a metric series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .http import HTTPError


@dataclass(frozen=True)
class Outcome:
    status: int
    error: str
    # The reason label counted in polykit_cache_uploads_rejected_total, or None (not an upload refusal).
    reject: str | None


OUTCOMES: dict[str, Outcome] = {
    "exists": Outcome(409, "exists", "exists"),
    "storage_full": Outcome(507, "storage_full", "storage_full"),
    "incomplete_body": Outcome(400, "incomplete_body", "incomplete_body"),
    "no_length": Outcome(411, "length_required", "no_length"),
    "bad_length": Outcome(400, "bad_length", "bad_length"),
    "too_large": Outcome(413, "too_large", "too_large"),
    "verification_failed": Outcome(422, "verification_failed", None),  # labelled by its reason
    "hash_mismatch": Outcome(400, "hash_mismatch", "hash_mismatch"),  # a content-addressed blob
    "unauthorized": Outcome(401, "unauthorized", "unauthorized"),
    "forbidden": Outcome(403, "forbidden", "forbidden"),
    "bad_request": Outcome(400, "bad_request", None),
    "bad_key": Outcome(400, "bad_key", None),
    "not_found": Outcome(404, "not_found", None),
    "method_not_allowed": Outcome(405, "method_not_allowed", None),
    "uri_too_long": Outcome(414, "uri_too_long", None),
    "unavailable": Outcome(503, "unavailable", None),  # the store cannot be reached
}

# Why an artifact was refused (the ``reason`` of a 422); anything else is labelled "other".
VERIFICATION_REASONS = frozenset({
    "bad_zstd", "bad_tar", "bad_metadata", "key_mismatch", "unlisted_member", "missing_member",
    "hash_mismatch", "size_mismatch", "mode_mismatch", "type_mismatch", "bad_member_type",
    "unsafe_path", "unsafe_link", "path_conflict", "unpacked_too_large", "too_many_members",
    "trailing_data", "body_hash_mismatch", "undeclared_output", "changed_while_packing",
})


def refuse(outcome: str, message: str, headers: Iterable[tuple[str, str]] = (), *, received: int = 0,
           reason: str | None = None, count: bool = True, **extra: object) -> HTTPError:
    """The error for a domain outcome; ``count=False`` keeps it out of the upload refusals."""
    entry = OUTCOMES[outcome]
    label = entry.reject
    if outcome == "verification_failed":
        label = reason if reason in VERIFICATION_REASONS else "other"
        extra["reason"] = label
    return HTTPError(entry.status, entry.error, message, headers, reject=label if count else None,
                     received=received, **extra)


# A Content-Length is 1*DIGIT (RFC 9110 8.6); 19 digits hold any size a disk can. Python's int()
# would also take signs, spaces, underscores and other scripts' digits, none of which HTTP allows.
_LENGTH = re.compile(r"[0-9]{1,19}")


def parse_length(raw: str | None) -> int | None:
    """A request's Content-Length as a byte count, None when absent; anything else is a 400."""
    if raw is None or raw == "":
        return None
    if not _LENGTH.fullmatch(raw):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise refuse("bad_length", f"Content-Length {shown!r} is not a byte count.")
    return int(raw)


def read_body(environ: dict) -> bytes:
    """The whole request body of a read whose length admission already bounded (a batch query)."""
    length = parse_length(environ.get("CONTENT_LENGTH")) or 0
    data = environ["wsgi.input"].read(length) if length else b""
    if len(data) != length:
        raise refuse("incomplete_body", f"The request body ended after {len(data)} of {length} bytes.", count=False)
    return data
