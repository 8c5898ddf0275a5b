"""The framing of a bundle: several stored artifacts in one streamed answer (``POST /v1/bundles``).

The server writes, and the client reads, in the order the keys were asked:

- per key, one head line, then its body: ``<key> <size> <sha256>\\n`` followed by exactly
  ``size`` bytes (the artifact, SHA-256 ``sha256``), or ``<key> -\\n`` for a key not stored
  (never stored, or evicted or replaced before the stream reached it: an entry is opened only
  in its turn, and an open entry's bytes are fixed, so a body is never torn);
- last, the trailer line ``end <count>\\n``, ``count`` being the number of key frames. The
  server may end a bundle early, in place of a frame, with the trailer counting the frames sent
  (a bundle carries a bounded number of bytes, see the server's ``BUNDLE_BYTES``): the keys not
  reached were not sent, which says nothing of whether they are stored.

Every head names its key and its length, so a reader checks each frame against the key it
expects next and reads exactly the bytes announced; a stream cut short anywhere (in a head, in
a body, before the trailer) lacks the trailer, so it is always told from a whole one, whatever
HTTP framing carried it. Head lines are ASCII and bounded (:data:`MAX_HEAD`).

Both sides import this module (the client never imports the server).
"""

from __future__ import annotations

import re

# The longest head line: a key, a size of at most 19 digits, a digest, two spaces, a newline.
MAX_HEAD = 64 + 1 + 19 + 1 + 64 + 1
CONTENT_TYPE = "application/vnd.polykit.bundle"

_HEAD = re.compile(rb"([0-9a-f]{64}) (?:([0-9]{1,19}) ([0-9a-f]{64})|-)\n")
_TRAILER = re.compile(rb"end ([0-9]{1,9})\n")


class BadFrame(ValueError):
    """A head line that is neither a frame of the expected key nor the trailer."""


def artifact_head(key: str, size: int, sha256: str) -> bytes:
    """The head of a frame carrying ``size`` bytes of the artifact stored under ``key``."""
    return f"{key} {size} {sha256}\n".encode()


def missing_head(key: str) -> bytes:
    """The head of a frame saying ``key`` is not stored."""
    return f"{key} -\n".encode()


def trailer(count: int) -> bytes:
    """The last line of a whole bundle of ``count`` frames."""
    return f"end {count}\n".encode()


def parse_head(line: bytes, expected: str) -> tuple[int, str] | None:
    """``(size, sha256)`` of the frame of ``expected`` that ``line`` opens, or None for "not stored".

    Raises :class:`BadFrame` for anything else: another key (out of order), a malformed line,
    or a line cut short.
    """
    m = _HEAD.fullmatch(line)
    if m is None or m.group(1).decode() != expected:
        raise BadFrame(f"expected the frame of {expected[:12]}, got {line[:80]!r}")
    if m.group(2) is None:
        return None
    return int(m.group(2)), m.group(3).decode()


def is_trailer(line: bytes) -> bool:
    """Whether ``line`` is a trailer (well-formed or not) rather than a frame's head."""
    return line.startswith(b"end ")


def parse_trailer(line: bytes, count: int) -> None:
    """Check the trailer of a bundle of ``count`` frames; :class:`BadFrame` otherwise."""
    m = _TRAILER.fullmatch(line)
    if m is None or int(m.group(1)) != count:
        raise BadFrame(f"expected the trailer of {count} frames, got {line[:80]!r}")
