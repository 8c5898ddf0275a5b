"""The zstd door: frame tracking tells a whole stream from a cut one."""

import io
import os

import pytest
import zstandard

from polykit_client.zstd import CompressingWriter, DecompressingReader, FrameTracker, ZstdError


def frames(*parts: bytes) -> bytes:
    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(p) for p in parts)


def read_all(data: bytes, step: int = 7) -> bytes:
    reader = DecompressingReader(io.BytesIO(data))
    out = b""
    while chunk := reader.read(step):
        out += chunk
    return out


def test_whole_streams_of_one_or_more_frames_read_back():
    a, b = os.urandom(1000), b"z" * 100_000
    assert read_all(frames(a)) == a
    assert read_all(frames(a, b), step=4096) == a + b


def test_skippable_frames_are_refused():
    # They could carry any bytes past verification into storage.
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    with pytest.raises(ZstdError, match="skippable"):
        read_all(skippable + frames(b"data"))
    with pytest.raises(ZstdError, match="skippable"):
        read_all(frames(b"data") + skippable)


@pytest.mark.parametrize("cut", [1, 4, 5, 9, 50, -4, -1])
def test_every_cut_is_detected(cut):
    data = frames(os.urandom(500), os.urandom(500))
    with pytest.raises(ZstdError):
        read_all(data[:cut] if cut > 0 else data[:cut])


def test_empty_input_is_not_a_stream():
    with pytest.raises(ZstdError):
        read_all(b"")


def test_tracker_fed_byte_by_byte():
    data = frames(os.urandom(3000), b"")
    tracker = FrameTracker()
    for i in range(len(data)):
        tracker.feed(data[i : i + 1])
        assert tracker.complete() == (i == len(data) - 1) or tracker.frames == 1
    assert tracker.complete() and tracker.frames == 2


def test_writer_output_is_a_checked_stream():
    buf = io.BytesIO()
    with CompressingWriter(buf) as writer:
        writer.write(b"hello " * 1000)
    assert not buf.closed
    assert read_all(buf.getvalue(), step=100) == b"hello " * 1000
