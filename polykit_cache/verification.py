"""Receiving an upload: stage the body in the store while hashing and verifying it, in one pass.

The body is read in bounded chunks; the same bytes feed the SHA-256 of the body, the
upload staged in the store and the artifact verifier (zstd -> tar -> manifest), so memory does
not grow with the artifact and nothing is read twice. Only a body that verified completely is
handed back for a commit (``finish()`` flushes it; the disk store syncs it in the commit, before
it is visible); on any failure the staged upload is discarded.
"""

from __future__ import annotations

from typing import BinaryIO, Callable

from polykit_client.artifact import ArtifactError, Limits, verify_stream

from .store import Staged, Store, StorageFull, is_disk_full


class IncompleteBody(Exception):
    """The request body ended before its Content-Length."""


class _Tee:
    """Reads at most ``length`` bytes of the body, copying them to the staged upload (which hashes them)."""

    def __init__(self, body: BinaryIO, length: int, out: Staged) -> None:
        self._body = body
        self._left = length
        self._out = out
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._body.read(want)
        if not data:
            raise IncompleteBody(f"body ended after {self.size} of {self.size + self._left} bytes")
        self._left -= len(data)
        self.size += len(data)
        self._out.write(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def receive(store: Store, body: BinaryIO, length: int, key: str, limits: Limits) -> tuple[Staged, dict]:
    """Stage an artifact body, verified and finished, for a commit, with its manifest; or raise and
    leave nothing behind.

    Raises ArtifactError (422), IncompleteBody (400) or StorageFull (507).
    """
    found: dict = {}

    def check(tee: _Tee) -> None:
        found["manifest"] = verify_stream(tee, expected_key=key, limits=limits)

    return _spool(store, body, length, check), found["manifest"]


def receive_blob(store: Store, body: BinaryIO, length: int) -> Staged:
    """Stage an opaque blob of another protocol the same way, hashed but not otherwise checked."""
    return _spool(store, body, length, None)


def _spool(store: Store, body: BinaryIO, length: int, check: Callable[[_Tee], object] | None) -> Staged:
    staged = store.stage()
    try:
        tee = _Tee(body, length, staged)
        if check is not None:
            check(tee)
        tee.drain()  # a checked artifact was read to its end already; this guards the byte count
        staged.finish()
        return staged
    except OSError as exc:
        staged.discard()
        if is_disk_full(exc):
            raise StorageFull(str(exc)) from None
        raise
    except BaseException:
        staged.discard()
        raise


__all__ = ["ArtifactError", "IncompleteBody", "receive", "receive_blob"]
