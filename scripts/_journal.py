"""A small-entry log for the server benchmark's journal floor (``bench_server.py --bare-journal``).

It stores small uploads the way a database makes commits durable, to measure what that would
cost on a disk, not to serve anyone: each entry (header: magic, body length, key, CRC-32 of the
three; then the body) is written with one ``pwritev`` into one log file that was preallocated
and written in full (zeros, synced) before the first entry, so that syncing an entry changes no
metadata: no block is allocated, no extent converted, the size never changes; ``fdatasync``
(POSIX: "synchronized I/O data integrity completion") then has only the data blocks and the
disk's write cache to flush. An entry is durable, and its upload may be answered, only after a
sync that *started* after its write completed. How that sync is made is the ``mode``:

- ``group``: group commit (leader/follower). The first waiting writer syncs for every write
  completed so far; the writers that complete meanwhile wait for the next sync, made by the
  first of them. With N concurrent uploads one ``fdatasync`` serves up to N.
- ``each``: every writer calls ``fdatasync`` itself (the kernel may merge concurrent flushes).
- ``dsync``: the log is opened with ``O_DSYNC``, so each write returns once durable.
- ``range``: each writer starts and waits for the write-out of its own bytes
  (``sync_file_range``, on its own thread), then a group commit as ``group`` flushes the disk.

First write wins: a key already in the log is not written again, and its second upload is
answered once the first one's entry is durable. Entries are read back by :func:`entries`, which
stops at the first header that is not whole and valid (a torn last write after a crash), as the
replay of a log at start-up would. Nothing here evicts, compacts or serves reads.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

MODES = ("group", "each", "dsync", "range")
MAGIC = b"PKJ1"
HEADER = struct.Struct("<4sI32sI")  # magic, body length, key (SHA-256, raw), CRC-32 of header fields and body
MAX_ENTRY = 64 * 1024  # larger uploads are not entries of the log
_ZEROS = bytes(1024 * 1024)
# sync_file_range(2) flags: wait for write-out already under way, start it, wait for it.
_SYNC_FILE_RANGE_ALL = 1 | 2 | 4


class LogFull(Exception):
    """The preallocated log has no room for an entry: the upload is refused, nothing is lost."""


def entry_size(body_length: int) -> int:
    return HEADER.size + body_length


class Journal:
    """One preallocated log file, appended to by many threads, each append durable on return."""

    def __init__(self, path: Path, size: int, mode: str = "group") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown journal mode {mode!r}: one of {', '.join(MODES)}")
        self.path = path
        self.size = size
        self.mode = mode
        _preallocate(path, size)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DSYNC if mode == "dsync" else 0)
        self.fd = os.open(path, flags)
        self._sync_file_range = None
        if mode == "range":
            self._sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
            self._sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        self._cond = threading.Condition()
        self._tail = 0
        self._index: dict[bytes, threading.Event] = {}  # key -> set once its entry is durable
        self._completed = 0  # writes completed, numbered in the order they completed
        self._synced = 0  # every write numbered up to this is durable
        self._syncing = False
        self._failed: OSError | None = None

    def close(self) -> None:
        os.close(self.fd)

    def append(self, key: bytes, body: bytes) -> None:
        """Write one entry and return once it is durable (or the key's first entry is)."""
        while True:
            with self._cond:
                durable = self._index.get(key)
                if durable is None:
                    offset = self._tail
                    if offset + entry_size(len(body)) > self.size:
                        raise LogFull(f"the log's {self.size} bytes are used up")
                    self._tail += entry_size(len(body))
                    durable = self._index[key] = threading.Event()
                    break
            durable.wait()  # first write wins: answered once the first entry is durable
            with self._cond:
                if self._index.get(key) is durable:
                    return
            # the first write failed and was forgotten: write this one
        try:
            self._write(offset, key, body)
        except BaseException:
            with self._cond:
                del self._index[key]
            durable.set()
            raise
        durable.set()

    def _write(self, offset: int, key: bytes, body: bytes) -> None:
        crc = zlib.crc32(body, zlib.crc32(struct.pack("<I32s", len(body), key)))
        os.pwritev(self.fd, [HEADER.pack(MAGIC, len(body), key, crc), body], offset)
        if self.mode == "dsync":
            return
        if self.mode == "each":
            os.fdatasync(self.fd)
            return
        if self.mode == "range":
            length = entry_size(len(body))
            if self._sync_file_range(self.fd, offset, length, _SYNC_FILE_RANGE_ALL) != 0:
                raise OSError(ctypes.get_errno(), "sync_file_range failed")
        with self._cond:
            self._completed += 1
            number = self._completed
        self._commit(number)

    def _commit(self, number: int) -> None:
        """Group commit: return once a sync that started after write ``number`` completed has ended."""
        with self._cond:
            while self._synced < number:
                if self._failed is not None:
                    # After a failed fdatasync the kernel may have dropped the dirty pages: no later
                    # sync can vouch for them, so every waiting and later entry fails.
                    raise OSError(self._failed.errno, f"an earlier sync of the log failed: {self._failed}")
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                upto = self._completed
                self._cond.release()
                try:
                    os.fdatasync(self.fd)
                except OSError as exc:
                    self._failed = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                if self._failed is None:
                    self._synced = upto


def _preallocate(path: Path, size: int) -> None:
    """Write the whole log once (zeros) and sync it and its folder: later syncs change no metadata."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, _ZEROS[: min(left, len(_ZEROS))])
        os.fsync(fd)
    finally:
        os.close(fd)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def entries(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(key, body) of every entry, in log order, up to the first header that is not a whole, valid entry."""
    with open(path, "rb") as fh:
        while True:
            header = fh.read(HEADER.size)
            if len(header) < HEADER.size:
                return
            magic, length, key, crc = HEADER.unpack(header)
            if magic != MAGIC or length > MAX_ENTRY:
                return
            body = fh.read(length)
            if len(body) < length or zlib.crc32(body, zlib.crc32(header[4:40])) != crc:
                return
            yield key, body
