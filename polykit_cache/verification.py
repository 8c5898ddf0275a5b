"""Receiving an upload: stage the body in the store while hashing and verifying it, in one pass.

The body is read in bounded chunks; the same bytes feed the SHA-256 of the body, the
upload staged in the store and the artifact verifier (zstd -> tar -> manifest), so memory does
not grow with the artifact and nothing is read twice. Only a body that verified completely is
handed back for a commit (``finish()`` flushes it; the disk store syncs it in the commit, before
it is visible); on any failure the staged upload is discarded.

Where the store took the body as it arrived (``spooled``, see :meth:`store.Store.spool`), it is
staged and hashed already: it is verified where it lies, and never copied.
"""

from __future__ import annotations

from typing import BinaryIO, Callable

from polykit_client.artifact import ArtifactError, Limits, verify_stream

from .store import Staged, Store, StorageFull, is_disk_full

# The environ key under which the server layer hands a handler the body it wrote into the store as
# it arrived (see CacheApp.body_spool): the store's Staged, whole and hashed (``wsgi.input`` reads it too).
SPOOLED = "polykit.spooled"


class IncompleteBody(Exception):
    """The request body ended before its Content-Length."""


class _Tee:
    """Reads at most ``length`` bytes of the body, copying them to the staged upload (which hashes
    them) unless ``out`` is None (the body is the staged upload itself)."""

    def __init__(self, body: BinaryIO, length: int, out: Staged | None) -> None:
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
        if self._out is not None:
            self._out.write(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def receive(store: Store, body: BinaryIO, length: int, key: str, limits: Limits,
            spooled: Staged | None = None) -> tuple[Staged, dict]:
    """Stage an artifact body, verified and finished, for a commit, with its manifest; or raise and
    leave nothing behind. ``spooled``: the body, staged in the store as it arrived.

    Raises ArtifactError (422), IncompleteBody (400) or StorageFull (507).
    """
    found: dict = {}

    def check(tee: _Tee) -> None:
        found["manifest"] = verify_stream(tee, expected_key=key, limits=limits)

    return _spool(store, body, length, check, spooled), found["manifest"]


def receive_blob(store: Store, body: BinaryIO, length: int, spooled: Staged | None = None) -> Staged:
    """Stage an opaque blob of another protocol the same way, hashed but not otherwise checked."""
    return _spool(store, body, length, None, spooled)


def _spool(store: Store, body: BinaryIO, length: int, check: Callable[[_Tee], object] | None,
           spooled: Staged | None) -> Staged:
    staged = store.stage() if spooled is None else spooled
    try:
        if spooled is None:
            tee = _Tee(body, length, staged)
            if check is not None:
                check(tee)
            tee.drain()  # a checked artifact was read to its end already; this guards the byte count
        else:
            _check_in_place(staged, length, check)
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


def _check_in_place(staged: Staged, length: int, check: Callable[[_Tee], object] | None) -> None:
    """Verify a body the store took as it arrived where it lies (it was hashed on the way in)."""
    if staged.size != length:
        raise IncompleteBody(f"body ended after {staged.size} of {length} bytes")
    if check is not None:
        check(_Tee(staged.reader(), length, None))


__all__ = ["ArtifactError", "IncompleteBody", "SPOOLED", "receive", "receive_blob"]
