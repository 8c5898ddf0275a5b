"""Receiving an upload: copy the body to a temporary file while hashing and verifying it, in one pass.

The body is read in bounded chunks; the same bytes feed the SHA-256 of the body, the temporary
file and the artifact verifier (zstd -> tar -> manifest), so memory does not grow with the
artifact and nothing is read twice. Only a body that verified completely is fsynced and
handed back for publication; on any failure the temporary file is removed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from polykit_client.artifact import ArtifactError, Limits, verify_stream

from .storage import Storage, StorageFull, is_disk_full


WRITEBACK_STEP = 8 << 20
_FADVISE = getattr(os, "posix_fadvise", None)


class IncompleteBody(Exception):
    """The request body ended before its Content-Length."""


@dataclass(frozen=True)
class Received:
    temp: Path
    size: int
    sha256: str
    meta: dict | None = None  # an artifact's manifest (None for a blob)


class _Tee:
    """Reads at most ``length`` bytes of the body, hashing them and copying them to ``out``."""

    def __init__(self, body: BinaryIO, length: int, out: BinaryIO) -> None:
        self._body = body
        self._left = length
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0
        self._flushed = 0

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._body.read(want)
        if not data:
            raise IncompleteBody(f"body ended after {self.size} of {self.size + self._left} bytes")
        self._left -= len(data)
        self.size += len(data)
        self.digest.update(data)
        self._out.write(data)
        if self.size - self._flushed >= WRITEBACK_STEP:
            self._start_writeback()
        return data

    def _start_writeback(self) -> None:
        # Start the disk write of what we have so far without waiting for it (on Linux,
        # FADV_DONTNEED begins writeback of dirty pages), so the final fsync only waits for
        # the tail instead of the whole artifact, and big uploads do not flood the page cache.
        self._out.flush()
        if _FADVISE is not None:
            _FADVISE(self._out.fileno(), self._flushed, self.size - self._flushed, os.POSIX_FADV_DONTNEED)
        self._flushed = self.size

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def receive(storage: Storage, body: BinaryIO, length: int, key: str, limits: Limits) -> Received:
    """Store an artifact body in a verified, synced temporary file, or raise and leave nothing behind.

    Raises ArtifactError (422), IncompleteBody (400) or StorageFull (507).
    """
    return _spool(storage, body, length, lambda tee: verify_stream(tee, expected_key=key, limits=limits))


def receive_blob(storage: Storage, body: BinaryIO, length: int) -> Received:
    """Store an opaque blob of another protocol the same way, hashed but not otherwise checked."""
    return _spool(storage, body, length, None)


def _spool(storage: Storage, body: BinaryIO, length: int, check: Callable[[_Tee], dict] | None) -> Received:
    out, temp = storage.new_temp()
    try:
        with out:
            tee = _Tee(body, length, out)
            meta = check(tee) if check is not None else None
            tee.drain()  # a checked artifact was read to its end already; this guards the byte count
            out.flush()
            os.fdatasync(out.fileno())
        return Received(temp, tee.size, tee.digest.hexdigest(), meta if isinstance(meta, dict) else None)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise StorageFull(str(exc)) from None
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


__all__ = ["ArtifactError", "IncompleteBody", "Received", "receive", "receive_blob"]
