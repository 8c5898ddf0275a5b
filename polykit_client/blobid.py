"""An input file's digest: its git blob id, SHA-1 of ``blob <size>\\0`` followed by the content.

The same digest git keeps in its index for every tracked file (git-hash-object(1)), so a file git
vouches for (:mod:`gitindex`) is not read, and a file that is read gets the digest git would
give it: a key is the same whether its digests came from git or from the files, with git or
without it, in a clone or in a copy of the tree. SHA-1 is git's own content address; a colliding
pair of inputs gains nothing a cache writer does not already have: anyone who can make a build
store an artifact can store any artifact under any key.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20
# A file whose size changes while it is read (being written) is read again, this many times.
ATTEMPTS = 3


def blob_id_of(data: bytes) -> str:
    digest = hashlib.sha1(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def blob_id_small(path: str) -> str | None:
    """Read whole: os.open and os.read, as the io module's buffered file costs more than hashing 1 KiB."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, CHUNK):
            chunks.append(chunk)
        return blob_id_of(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except OSError:
        return None
    finally:
        os.close(fd)


def blob_id_large(path: str) -> str | None:
    """Streamed in chunks (hashlib releases the GIL for them, so several files hash at once).

    The header needs the size before the content: it is the size ``fstat`` gives, and the read
    must end there; a file that grows or shrinks meanwhile is read again (and, when it never
    holds still, is unreadable: None, as for a file that vanished).
    """
    for _ in range(ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            digest = hashlib.sha1(b"blob %d\0" % size)
            read = 0
            while chunk := os.read(fd, CHUNK):
                read += len(chunk)
                if read > size:
                    break
                digest.update(chunk)
            if read == size:
                return digest.hexdigest()
        except OSError:
            return None
        finally:
            os.close(fd)
    return None
