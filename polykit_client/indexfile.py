"""git's index file read directly: the blob id and the size git recorded for each entry.

The format is gitformat-index(5): a 12-byte header (``DIRC``, the version, the number of
entries), the entries sorted by path, extensions, then a checksum of everything before it
(the repository's hash; SHA-1 here). Each entry holds the file's stat data as git saw it when
it last wrote the entry (ctime, mtime, dev, ino, mode, uid, gid, then the size, each 32 bits),
its object id, 16 bits of flags (assume-valid, extended, the stage, the name's length up to
0xFFF) and, in version 3 and up when the extended flag is set, 16 more; then the path. Versions
2 and 3 end the path with 1 to 8 NULs so the entry's length is a multiple of eight; version 4
has no padding and compresses each path against the previous one's (a varint: the bytes to drop
from the end of the previous path, then the rest, NUL-terminated).

Only what can be read without doubt is answered: a split index (the ``link`` extension: most
entries live in another file) or anything that does not parse gives None, and the caller then
looks at the files instead.
"""

from __future__ import annotations

import os
import struct

SIGNATURE = b"DIRC"
HASH_SIZE = 20  # SHA-1; a SHA-256 repository's ids are not the blob ids blobid.py computes
_ENTRY = struct.Struct(">10I20sH")  # stat data, object id, flags: 62 bytes
_SIZE_AT = 9  # the tenth 32-bit field
_MODE_AT = 6
_EXTENDED = 0x4000
_STAGE = 0x3000
_NAME_MASK = 0xFFF
_REGULAR = (0o100644, 0o100755)


def trailer(path: str) -> tuple[tuple[int, int, int], bytes] | None:
    """The index file's identity (inode, size, mtime) and its closing checksum, read without the rest.

    git replaces the index by renaming a new file over it (index.lock), so the identity changes
    with every write; the checksum covers the whole content. None when it cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size < 12 + HASH_SIZE:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns), os.pread(fd, HASH_SIZE, st.st_size - HASH_SIZE)
    except OSError:
        return None
    finally:
        os.close(fd)


def identity(path: str) -> tuple[int, int, int] | None:
    """The index file's (inode, size, mtime) now, to tell whether it was replaced since it was read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read(path: str) -> tuple[tuple[int, int, int], bytes, dict[str, tuple[str, int]]] | None:
    """The file's identity, its checksum and ``path -> (blob id, recorded size)`` for every
    stage-0 regular file entry; None for a file this does not read (see the module)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except OSError:
        return None
    entries = parse(data)
    if entries is None:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns), data[-HASH_SIZE:], entries


def parse(data: bytes) -> dict[str, tuple[str, int]] | None:
    """``path -> (blob id, size)`` of the stage-0 regular files in an index file's content."""
    if len(data) < 12 + HASH_SIZE or data[:4] != SIGNATURE:
        return None
    version, count = struct.unpack_from(">II", data, 4)
    if version not in (2, 3, 4):
        return None
    end_of_entries = len(data) - HASH_SIZE
    unpack = _ENTRY.unpack_from
    found: dict[str, tuple[str, int]] = {}
    offset = 12
    previous = b""
    try:
        for _ in range(count):
            fields = unpack(data, offset)
            flags = fields[11]
            start = offset + 62 + (2 if flags & _EXTENDED and version >= 3 else 0)
            if version == 4:
                drop, start = _varint(data, start)
                stop = data.index(b"\0", start)
                if drop > len(previous):
                    return None
                name = previous[:len(previous) - drop] + data[start:stop]
                previous = name
                offset = stop + 1
            else:
                length = flags & _NAME_MASK
                stop = data.index(b"\0", start) if length == _NAME_MASK else start + length
                name = data[start:stop]
                offset += (stop - offset + 8) & ~7  # the NUL padding: 1 to 8 bytes
            if offset > end_of_entries:
                return None
            if not flags & _STAGE and fields[_MODE_AT] in _REGULAR:
                found[name.decode("utf-8", "surrogateescape")] = (fields[10].hex(), fields[_SIZE_AT])
        while offset + 8 <= end_of_entries:  # extensions: a 4-byte signature, a 32-bit length
            signature, size = struct.unpack_from(">4sI", data, offset)
            if signature == b"link":
                return None  # a split index: the entries here are only the changes to a shared one
            offset += 8 + size
    except (struct.error, ValueError):
        return None
    return found if offset == end_of_entries else None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """git's offset encoding (varint.c): 7 bits a byte, each continuation adding one."""
    byte = data[at]
    value = byte & 0x7F
    at += 1
    while byte & 0x80:
        byte = data[at]
        value = ((value + 1) << 7) | (byte & 0x7F)
        at += 1
    return value, at
