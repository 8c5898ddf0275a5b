"""One small door to zstd, so the rest of the code never cares which library is underneath.

Python 3.14 ships ``compression.zstd``; older versions use the ``zstandard`` package. Neither
library reports a stream that is cut short in the middle of a frame (both simply stop), so the
reader returned here follows the frame boundaries of the compressed bytes itself (RFC 8878,
section 3.1) and raises :class:`ZstdError` when the input ends anywhere but between frames.
"""

from __future__ import annotations

import threading
from typing import BinaryIO

try:  # pragma: no cover - depends on the interpreter
    from compression import zstd as _std  # type: ignore[import-not-found]

    _zstandard = None
    _LIB_ERRORS: tuple[type[BaseException], ...] = (_std.ZstdError, EOFError)
except ImportError:  # pragma: no cover - depends on the interpreter
    _std = None
    import zstandard as _zstandard

    _LIB_ERRORS = (_zstandard.ZstdError,)

# A window of 8 MiB covers every compression level up to 19 for ordinary inputs and bounds the
# memory one decompression can claim (zstd's own default limit is 128 MiB).
MAX_WINDOW_LOG = 23
READ_SIZE = 256 * 1024
DEFAULT_LEVEL = 3

_FRAME_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50


class ZstdError(ValueError):
    """The bytes are not a whole, valid zstd stream."""


class FrameTracker:
    """Follows zstd frame and block headers without decoding, to tell a whole stream from a cut one."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._want = 4
        self._skip = 0
        self._state = "magic"
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                if not self._skip and self._state == "frame-end":
                    self._end_frame()
                continue
            take = min(self._want - len(self._head), end - pos)
            self._head += view[pos : pos + take]
            pos += take
            if len(self._head) == self._want:
                head = bytes(self._head)
                self._head.clear()
                self._on_header(head)

    def complete(self) -> bool:
        """True when at least one frame was seen and the input stopped between frames."""
        return self.frames > 0 and self._state == "magic" and not self._head and not self._skip

    def _end_frame(self) -> None:
        self.frames += 1
        self._state, self._want = "magic", 4

    def _on_header(self, head: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == _FRAME_MAGIC:
                self._state, self._want = "descriptor", 1
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                # Our packer never writes them, and their bytes would be stored and served
                # without any check: refuse them.
                raise ZstdError("skippable zstd frames are not allowed in an artifact")
            else:
                raise ZstdError("not a zstd stream (bad frame magic number)")
        elif state == "skippable-size":
            self._skip = int.from_bytes(head, "little")
            self._state = "frame-end"
            if not self._skip:
                self._end_frame()
        elif state == "descriptor":
            d = head[0]
            fcs_flag, single_segment = d >> 6, (d >> 5) & 1
            if (d >> 3) & 1:
                raise ZstdError("invalid zstd frame header (reserved bit set)")
            self._checksum = bool((d >> 2) & 1)
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[d & 3]
            rest += ((1 if single_segment else 0), 2, 4, 8)[fcs_flag]
            self._state, self._want, self._skip = "block", 3, rest
        elif state == "block":
            h = int.from_bytes(head, "little")
            last, block_type, size = h & 1, (h >> 1) & 3, h >> 3
            if block_type == 3:
                raise ZstdError("invalid zstd block (reserved block type)")
            self._skip = 1 if block_type == 1 else size
            if last:
                self._state = "frame-end"
                self._skip += 4 if self._checksum else 0
                if not self._skip:
                    self._end_frame()


class _Tap:
    """Passes raw reads through while the frame tracker watches them."""

    def __init__(self, raw: BinaryIO, tracker: FrameTracker) -> None:
        self._raw = raw
        self._tracker = tracker

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._tracker.feed(data)
        return data

    def readinto(self, buf) -> int:  # used by the stdlib ZstdFile
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


# Decompression contexts kept for reuse, one per thread and window: making one costs more than
# decompressing a small artifact. A context serves one reader at a time (a reader resets it),
# so a reader takes it and gives it back when done; a second reader meanwhile makes its own.
_idle = threading.local()


def _take_dctx(window_log: int):
    dctx = getattr(_idle, "dctx", None)
    if dctx is not None and dctx[0] == window_log:
        _idle.dctx = None
        return dctx[1]
    return _zstandard.ZstdDecompressor(max_window_size=1 << window_log)


class DecompressingReader:
    """A read-only file of the decompressed bytes; raises ZstdError on a corrupt or cut stream."""

    def __init__(self, raw: BinaryIO, max_window_log: int = MAX_WINDOW_LOG) -> None:
        self._tracker = FrameTracker()
        tap = _Tap(raw, self._tracker)
        self._dctx = None
        if _std is not None:  # pragma: no cover - Python 3.14+
            options = {_std.DecompressionParameter.window_log_max: max_window_log}
            self._reader = _std.ZstdFile(tap, "rb", options=options)
        else:
            self._window_log, self._dctx = max_window_log, _take_dctx(max_window_log)
            self._reader = self._dctx.stream_reader(
                tap, read_size=READ_SIZE, read_across_frames=True, closefd=False
            )
        self._eof = False

    def _release(self) -> None:
        """Give the context back for the thread's next reader (only once this one needs it no more)."""
        if self._dctx is not None:
            _idle.dctx, self._dctx = (self._window_log, self._dctx), None

    def read(self, size: int = -1) -> bytes:
        if self._eof:
            return b""
        try:
            data = self._reader.read(size)
        except _LIB_ERRORS as exc:
            raise ZstdError(f"corrupt zstd stream: {exc}") from None
        except ZstdError:
            raise
        if not data and size != 0:
            self._eof = True
            self._reader.close()
            self._release()
            if not self._tracker.complete():
                raise ZstdError("zstd stream is truncated (it ends inside a frame)")
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._reader.close()
        self._release()


class CompressingWriter:
    """A write-only file that compresses into ``raw`` and leaves it open on close."""

    def __init__(self, raw: BinaryIO, level: int = DEFAULT_LEVEL) -> None:
        if _std is not None:  # pragma: no cover - Python 3.14+
            options = {
                _std.CompressionParameter.compression_level: level,
                _std.CompressionParameter.checksum_flag: 1,
            }
            self._writer = _std.ZstdFile(raw, "wb", options=options)
        else:
            cctx = _zstandard.ZstdCompressor(level=level, write_checksum=True)
            self._writer = cctx.stream_writer(raw, closefd=False)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._writer.write(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "CompressingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_name() -> str:
    """Which zstd library is in use, for ``--version`` and start-up logs."""
    return "compression.zstd" if _std is not None else f"zstandard {_zstandard.__version__}"
