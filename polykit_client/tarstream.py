"""A strict, streaming reader for the one tar layout artifacts use; and the header the packer writes.

``tarfile`` reads a whole PAX or GNU extended header (types ``x``, ``g``, ``L``, ``K``) into one
bytes object before anything can look at its size, takes sparse members whose expanded size
hides the bytes after them, and never looks at padding or at header fields it does not use.
An artifact is only ever written by :func:`polykit_client.artifact.pack`, so this reader accepts
exactly what that writes and checks every byte of it:

- each header, with its PAX extended header if it has one, must be byte for byte the header
  :func:`header` builds for the same name, type, mode, size and link target (POSIX ustar,
  POSIX.1-2001 pax for long or non-ASCII names, mtime 0, owner 0 with empty names);
- a PAX header is at most :data:`MAX_PAX_HEADER` bytes, checked before it is read, and may only
  hold the records in :data:`PAX_KEYS` (no ``comment``, no ``GNU.sparse.*``, no global header);
- only regular files, folders and symlinks: no sparse, GNU long-name, device, fifo or hard link;
- the padding after a member's data, the end-of-archive blocks and everything after them are
  zero bytes.

So every byte of an accepted archive is either compared here or hashed against the manifest.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = tarfile.BLOCKSIZE
CHUNK = 1024 * 1024
# A PAX header holds at most a path and a link target (4096 bytes each, see artifact.check_relpath)
# and a size: 16 KiB is ample, and it is all this reader ever holds of one header.
MAX_PAX_HEADER = 16 * 1024
# The records tarfile's PAX writer emits for our members: a long or non-ASCII path or link
# target, and the size of a file over 8 GiB (POSIX.1-2001, "pax Extended Header Keywords").
PAX_KEYS = frozenset({"path", "linkpath", "size"})
MEMBER_TYPES = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}
_ZERO_BLOCK = bytes(BLOCK)
MAX_SIZE_DIGITS = 20  # a 64-bit size; more is no artifact this reader could accept anyway
ENCODING = "utf-8"  # of names in PAX records, whatever the locale


class TarFormatError(ValueError):
    """The stream is not an archive of the form we write; ``reason`` is a machine word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # "file", "dir" or "symlink"
    mode: int
    size: int
    linkname: str


def member_info(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    """The header the packer writes for a member: no times, owners or names beyond the manifest's."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = target
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def header(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> bytes:
    """The exact bytes of that header (PAX header included when needed), as a ``w|`` PAX tarfile writes it.

    Nearly every member has a short ASCII name, a short ASCII link target and a size under
    8 GiB: ``tarfile`` then writes one plain ustar block, which is built here directly (about
    a tenth of the cost of a ``TarInfo``, which counts with thousands of members on both the
    packing and the verifying side). Anything else goes through ``tarfile`` itself. The test
    suite checks the two agree byte for byte.
    """
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if (len(name) <= _NAME_FIELD and len(target) <= _NAME_FIELD and 0 <= size < _MAX_USTAR_SIZE
            and 0 <= mode and name.isascii() and target.isascii()):
        return _ustar_block(name.encode("ascii"), kind, mode & 0o7777, size, target.encode("ascii"))
    return member_info(name, kind, mode, size, target).tobuf(tarfile.PAX_FORMAT, ENCODING, "strict")


_NAME_FIELD = 100  # bytes of the ustar name and linkname fields (POSIX.1-1988 ustar)
_MAX_USTAR_SIZE = 8 ** 11  # the largest size 11 octal digits hold; larger sizes take a PAX record
# uid, gid ("0000000\0" each) and mtime ("00000000000\0"): always zero in an artifact.
_OWNER_AND_TIME = b"0000000\x00" * 2
_MTIME = b"00000000000\x00"
# After the link name: magic and version, empty uname and gname (32 bytes each), empty device
# fields (8 each, as tarfile writes them for members that are not devices) and prefix (155),
# then the block's last 12 bytes.
_TAIL = tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)


def _ustar_block(name: bytes, kind: bytes, mode: int, size: int, target: bytes) -> bytes:
    """One ustar header block, field by field as ``tarfile.TarInfo._create_header`` lays it out."""
    head = b"".join((name, bytes(_NAME_FIELD - len(name)), b"%07o\x00" % mode, _OWNER_AND_TIME,
                     b"%011o\x00" % size, _MTIME))
    rest = b"".join((kind, target, bytes(_NAME_FIELD - len(target)), _TAIL))
    checksum = sum(head) + 8 * 0x20 + sum(rest)  # the checksum field counts as eight spaces
    return b"".join((head, b"%06o\x00 " % checksum, rest))


def _octal(field: bytes, what: str) -> int:
    digits = field.rstrip(b"\0 ")
    if not digits or not digits.isdigit() or b"8" in digits or b"9" in digits:
        raise TarFormatError("bad_tar", f"tar header field {what} is not an octal number")
    return int(digits, 8)


def _text(field: bytes) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise TarFormatError("bad_tar", "a tar header name is not UTF-8") from None


def _check_block(block: bytes) -> None:
    if block[257:265] != b"ustar\x0000":
        raise TarFormatError("bad_tar", "not a POSIX ustar header")
    stored = _octal(block[148:156], "chksum")
    if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise TarFormatError("bad_tar", "a tar header checksum does not match")


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse ``"%d %s=%s\\n"`` records; any key outside :data:`PAX_KEYS` is refused."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space <= pos or not data[pos:space].isdigit():
            raise TarFormatError("bad_tar", "a PAX record has no valid length")
        length = int(data[pos:space])
        record = data[space + 1:pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError("bad_tar", "a PAX record is malformed")
        key, _, value = record[:-1].partition(b"=")
        name = key.decode("ascii", "replace")
        if name not in PAX_KEYS:
            raise TarFormatError("bad_header", f"PAX record {name!r} is not one the packer writes")
        if name in records:
            raise TarFormatError("bad_header", f"PAX record {name!r} is repeated")
        try:
            records[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise TarFormatError("bad_tar", f"PAX record {name!r} is not UTF-8") from None
        pos += length
    return records


class TarReader:
    """Reads members one by one from a stream of tar bytes; nothing is held beyond one header
    and one block of :data:`CHUNK` bytes read ahead.

    The read-ahead serves the many small reads of an archive of small files (a header, a
    kilobyte of data, its padding) from one buffer, instead of one trip each through the
    decompressor's layers.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self._left = 0  # data bytes of the current member not read yet
        self._padding = 0

    def _take(self, size: int) -> bytes:
        """At most ``size`` bytes (and at least one, unless the stream is at its end)."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._buf = self._stream.read(CHUNK)
            pos = self._pos = 0
            if not buf:
                return b""
        if pos == 0 and size >= len(buf):
            self._pos = len(buf)
            return buf
        self._pos = pos + size
        return buf[pos:pos + size]

    def _read_exact(self, size: int) -> bytes:
        data = self._take(size)
        if len(data) == size:
            return data
        parts = [data]
        size -= len(data)
        while size > 0:
            data = self._take(size)
            if not data:
                raise TarFormatError("bad_tar", "the tar archive ends inside a member")
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def next(self) -> Member | None:
        """The next member's header, or None at the end-of-archive block."""
        if self._left or self._padding:
            raise RuntimeError("read the data of the previous member first")
        block = self._read_exact(BLOCK)
        if block == _ZERO_BLOCK:
            return None
        _check_block(block)
        raw = block
        records: dict[str, str] = {}
        if block[156:157] == tarfile.XHDTYPE:
            size = _octal(block[124:136], "size")
            if size > MAX_PAX_HEADER:
                raise TarFormatError("header_too_large", f"a PAX header of {size} bytes is over {MAX_PAX_HEADER}")
            data = self._read_exact(size + (-size % BLOCK))
            if data[size:].strip(b"\0"):
                raise TarFormatError("bad_padding", "the padding of a PAX header is not zero")
            records = _pax_records(data[:size])
            block = self._read_exact(BLOCK)
            _check_block(block)
            raw += data + block
        kind_byte = block[156:157]
        kind = MEMBER_TYPES.get(kind_byte)
        name = records.get("path") or _member_name(block)
        if kind is None:
            raise TarFormatError("bad_member_type", f"member {name!r} is not a file, folder or symlink (type {kind_byte!r})")
        if kind == "dir":
            name = name.rstrip("/")
        mode = _octal(block[100:108], "mode")
        size = _pax_size(records["size"]) if "size" in records else _octal(block[124:136], "size")
        linkname = records.get("linkpath") or _text(block[157:257])
        member = Member(name, kind, mode, size if kind == "file" else 0, linkname if kind == "symlink" else "")
        try:
            expected = header(member.name, kind_byte, mode & 0o7777, member.size, member.linkname)
        except (ValueError, UnicodeEncodeError):
            expected = b""
        if raw != expected:
            raise TarFormatError("bad_header", f"the header of member {name!r} carries fields the packer does not write")
        self._left = member.size
        self._padding = -member.size % BLOCK
        return member

    def data(self) -> Iterator[bytes]:
        """The current member's data in chunks; its padding is checked to be zero."""
        while self._left:
            chunk = self._take(min(self._left, CHUNK))
            if not chunk:
                raise TarFormatError("bad_tar", "the tar archive ends inside a member")
            self._left -= len(chunk)
            yield chunk
        if self._padding:
            pad = self._read_exact(self._padding)
            self._padding = 0
            if pad.strip(b"\0"):
                raise TarFormatError("bad_padding", "the padding after a member's data is not zero")

    def finish(self) -> None:
        """After the end-of-archive block: the rest of the stream must be zero bytes."""
        while data := self._take(CHUNK):
            if data.strip(b"\0"):
                raise TarFormatError("trailing_data", "artifact has data after the end of its tar archive")


class TarWriter:
    """Writes the archive :class:`TarReader` accepts: each member's :func:`header`, its data
    and zero padding to a block, then two zero blocks and zeros to a whole record, exactly as
    ``tarfile.open(mode="w|", format=PAX_FORMAT)`` does.

    Writes are gathered into blocks of :data:`CHUNK` bytes before they reach ``out`` (the
    compressor). ``tarfile``'s stream mode, with a large buffer, copies its whole buffer on
    every small write; with thousands of small members that was most of the time of a pack.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._buf = bytearray()
        self._offset = 0

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        self._offset += len(data)
        if len(self._buf) >= CHUNK:
            self._out.write(self._buf)
            self._buf.clear()

    def add(self, name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> None:
        """The header of a member; a file's ``size`` bytes follow with :meth:`data` and :meth:`end_data`."""
        self._write(header(name, kind, mode, size, target))

    def data(self, chunk: bytes | bytearray | memoryview) -> None:
        if len(chunk) >= CHUNK:  # a large chunk goes straight through, not copied into the buffer
            self.flush()
            self._out.write(chunk)
            self._offset += len(chunk)
        else:
            self._write(chunk)

    def end_data(self, size: int) -> None:
        """The zero padding after ``size`` bytes of data."""
        if size % BLOCK:
            self._write(bytes(BLOCK - size % BLOCK))

    def flush(self) -> None:
        if self._buf:
            self._out.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        """The end-of-archive blocks, then zeros to a multiple of the record size (``tarfile.RECORDSIZE``)."""
        self._write(bytes(2 * BLOCK))
        if self._offset % tarfile.RECORDSIZE:
            self._write(bytes(tarfile.RECORDSIZE - self._offset % tarfile.RECORDSIZE))
        self.flush()


def _pax_size(value: str) -> int:
    """A PAX ``size`` record: ASCII decimal digits only (POSIX.1-2001 pax, "size").

    ``str.isdigit`` and ``int`` also take other scripts' digits (``"²"``, ``"١٢"``), and ``int``
    refuses long strings with a plain ``ValueError``: neither may decide what a record means.
    """
    if not value or len(value) > MAX_SIZE_DIGITS or not value.isascii() or not value.isdigit():
        raise TarFormatError("bad_header", f"PAX record 'size' is not a decimal number: {value[:40]!r}")
    return int(value)


def _member_name(block: bytes) -> str:
    prefix, name = _text(block[345:500]), _text(block[0:100])
    return f"{prefix}/{name}" if prefix else name
