"""The storage interface: every route, the upload pipeline and maintenance reach stored bytes
through it, and nothing else.

A store holds named objects in *spaces*, one per protocol: ``polykit`` (artifacts, named by
their cache key), ``turbo`` (``team/hash``), ``nx`` (``hash``), ``kv`` (``name/path``),
``bazel-ac`` and ``bazel-cas`` (``hash``); an entry in a URL namespace has ``@<namespace>/``
before that (:func:`entry_name`). Every space is first-write-wins: a commit of a
name that exists keeps the stored object and says so, without raising, so a lost race is an
ordinary answer. Only Bazel's action cache may be replaced (a rerun action records its new
result). An object is visible whole or not at all.

An upload is *staged* first: a writable temporary that hashes what it is given, so the
protocol can check the bytes before they are committed. ``open`` hands back a real file where
the store has one, so waitress's I/O thread can send it without a worker.

Stores: :class:`polykit_cache.storage.Storage` (the disk folder), :class:`polykit_cache.memstore.MemoryStore`
(tests) and :class:`polykit_cache.s3store.S3Store` (an S3-compatible bucket behind a local tier).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, NamedTuple

SPACES = ("polykit", "turbo", "nx", "kv", "bazel-ac", "bazel-cas")
# Spaces whose objects a commit replaces; every other space keeps its first write.
REPLACEABLE = frozenset({"bazel-ac"})
# Metadata keys a store keeps itself; a protocol's own fields (turbo's duration, tag) never use them.
RESERVED_META = frozenset({"name", "space", "size", "sha256", "created", "inode"})


class StorageFull(Exception):
    """The store refused a write for lack of room (ENOSPC or EDQUOT on disk)."""


class StorageUnavailable(Exception):
    """The store cannot be reached now (a bucket down or refusing); the request may be retried later."""


def is_disk_full(exc: OSError) -> bool:
    """Whether an OSError means no space or no quota left."""
    import errno

    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def entry_name(namespace: str, rest: str) -> str:
    """The name in a space of a protocol's entry ``rest`` in a URL namespace (``""`` for none).

    A namespace is one ``@``-prefixed part (its own parts joined by ``:``): validated parts never
    begin with ``@`` nor hold ``:``, so no namespace's entry can take another's name, and entries
    without a namespace keep the names they always had.
    """
    return f"@{namespace.replace('/', ':')}/{rest}" if namespace else rest


def namespace_of(name: str) -> str:
    """The URL namespace of a name made by :func:`entry_name` (``""`` for none)."""
    return name[1:].partition("/")[0].replace(":", "/") if name.startswith("@") else ""


def check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"unknown storage space {space!r}")


@dataclass(frozen=True)
class Stat:
    """What is known of a stored object without reading it."""

    space: str
    name: str
    size: int
    sha256: str | None  # None only for blobs stored before the store recorded it
    created: float
    meta: Mapping[str, object] = field(default_factory=dict)  # the protocol's own fields
    path: str | None = None  # a real file holding the bytes, where the store has one


class Usage(NamedTuple):
    """What a store holds, kept current without a scan."""

    count: int
    bytes: int
    evictions: int


# A staged upload starts writeback every this many bytes (see Staged.write).
WRITEBACK_STEP = 8 << 20
_FADVISE = getattr(os, "posix_fadvise", None)


class Staged:
    """A writable temporary for one upload that knows its size and SHA-256.

    ``path`` is its file, where it has a name; ``on_disk`` says it is a file (named or not);
    ``finish()`` makes the bytes durable before a commit (a store that syncs in its commit
    overrides it); ``discard()`` removes it (a commit consumes it). Disk full becomes StorageFull.
    """

    def __init__(self, fh: BinaryIO, path: Path | None = None, on_disk: bool | None = None) -> None:
        self.fh = fh
        self.path = path
        self.on_disk = path is not None if on_disk is None else on_disk
        self.size = 0
        self._digest = hashlib.sha256()
        self._flushed = 0

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def write(self, data: bytes) -> None:
        try:
            self.fh.write(data)
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(str(exc)) from None
            raise
        self._digest.update(data)
        self.size += len(data)
        if self.on_disk and self.size - self._flushed >= WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self) -> None:
        # Start the disk write of what we have so far without waiting for it (on Linux,
        # FADV_DONTNEED begins writeback of dirty pages), so the final fsync only waits for
        # the tail instead of the whole upload, and big uploads do not flood the page cache.
        # It also runs in waitress's I/O thread, for a body written as it arrives (see
        # channel.StagedBuffer): measured on ext4, a start took 0.3 ms (at most 0.9 ms) per 8 MiB,
        # and the sync of a 512 MiB body before its answer went from 0.26 s to 0.005 s.
        self.fh.flush()
        if _FADVISE is not None:
            _FADVISE(self.fh.fileno(), self._flushed, self.size - self._flushed, os.POSIX_FADV_DONTNEED)
        self._flushed = self.size

    def finish(self) -> None:
        """Flush and, for a file, sync: a committed object must survive a power loss."""
        try:
            self.fh.flush()
            if self.on_disk:
                os.fdatasync(self.fh.fileno())
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(str(exc)) from None
            raise

    def reader(self) -> BinaryIO:
        """The staged bytes from the start (for stores that copy them elsewhere)."""
        self.fh.seek(0)
        return self.fh

    def discard(self) -> None:
        """Remove the temporary; never raises for its bytes, which nobody wants any more.

        Closing a buffered file flushes what it still holds, and on a full disk that flush fails
        again (after a StorageFull the caller is answering): the file is closed all the same
        (io's close closes the descriptor whatever its flush raised), so the error is dropped
        rather than turning a 507 into a 500.
        """
        try:
            self.fh.close()
        except OSError:
            pass
        finally:
            if self.path is not None:
                self.path.unlink(missing_ok=True)


class Store:
    """The interface; each method's docstring is its contract (``tests/test_store_contract.py``)."""

    # The bound on what the store holds, or None; a single upload larger than it is refused early.
    max_storage: int | None = None

    def stat(self, space: str, name: str, use: bool = False) -> Stat | None:
        """The object's metadata, or None; ``use`` records a read for least-recently-used order."""
        raise NotImplementedError

    def open(self, space: str, name: str, use: bool = True) -> tuple[Stat, BinaryIO] | None:
        """The object's metadata and an open file of exactly its bytes, or None; a use unless ``use`` is off."""
        raise NotImplementedError

    def stage(self) -> Staged:
        """A new temporary for an upload; StorageFull when there is no room for one."""
        raise NotImplementedError

    def spool(self) -> Staged | None:
        """A staged upload the server writes an admitted upload's body into as it arrives, or None.

        The body is then written once, into the store's own file, and hashed on the way; the
        handler verifies it in place and commits it (see :func:`verification.receive`). None (the
        default, as for a store without local files) leaves the body to the server's own spool,
        from which the handler stages a copy. StorageFull when there is no room for one.
        """
        return None

    def commit(self, space: str, name: str, staged: Staged, meta: Mapping[str, object] | None = None) -> bool:
        """Publish a finished staged upload: True when stored, False when the name existed already
        (first write wins; never raised). Replaces only in :data:`REPLACEABLE` spaces. The staged
        temporary is consumed either way. StorageFull or StorageUnavailable leave nothing visible."""
        raise NotImplementedError

    def delete(self, space: str, name: str) -> bool:
        """Remove an object; False when it was not there."""
        raise NotImplementedError

    def scan(self, space: str, prefix: str = "") -> Iterator[Stat]:
        """Every object of a space whose name starts with ``prefix``, in no particular order."""
        raise NotImplementedError

    def usage(self) -> Usage:
        """Objects and bytes held, and evictions so far."""
        raise NotImplementedError

    def use_range(self) -> tuple[float, float] | None:
        """Last use of the least and of the most recently used object (seconds since the epoch)."""
        return None

    def fits(self, size: int) -> bool:
        """Whether one object of ``size`` bytes can be held at all (checked before a body is read)."""
        return True

    def recover(self) -> None:
        """At start-up, with no upload running: remove what interrupted uploads left."""

    def refresh(self) -> None:
        """Recount what the store holds (maintenance, possibly beside a live server)."""

    def quarantined(self) -> int:
        """How many objects verification took away and the store keeps aside."""
        return 0

    def quarantine(self, space: str, name: str) -> None:
        """Take away an object that failed verification (kept aside where the store can)."""
        self.delete(space, name)

    def describe(self) -> str:
        """Where the objects are, for logs and ``stats``."""
        return type(self).__name__

    def close(self) -> None:
        """Release connections and files."""
