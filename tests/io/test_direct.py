"""`DirectFile`: the bytes written are the file's, in order, whatever the write sizes and the chunk boundaries;
where the filesystem refuses O_DIRECT the same bytes are written the ordinary way; and a tensor's bytes from the
GGUF writer go through it unchanged (tests/io/test_gguf_writer.py compares whole files with gguf's own writer)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from qmerge.io import direct
from qmerge.io.direct import ALIGN, DirectFile


def pieces(seed: int) -> list[bytes]:
    """Writes of every awkward size: empty, 1 byte, around the alignment and the chunk, several chunks at once."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 2 * ALIGN, 3 * ALIGN - 7, 5 * 2 * ALIGN + 3, 17, 0, 4 * ALIGN]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_bytes_in_order_across_chunks_with_tell(tmp_path, seed, background):
    path = tmp_path / "out.bin"
    expected = b""
    with DirectFile(path, chunk=2 * ALIGN, background=background) as f:
        for piece in pieces(seed):
            assert f.write(piece) == len(piece)
            expected += piece
            assert f.tell() == len(expected)
        f.write(np.arange(1000, dtype=np.float32))  # any buffer, as the GGUF writer passes arrays
        expected += np.arange(1000, dtype=np.float32).tobytes()
        f.finish()
        assert f.tell() == len(expected)
    assert path.read_bytes() == expected
    assert len(expected) % ALIGN  # the tail was padded for the disk and cut back


def test_an_exact_multiple_of_the_chunk_and_an_empty_file(tmp_path):
    data = bytes(range(256)) * (4 * ALIGN // 256)
    with DirectFile(tmp_path / "a", chunk=2 * ALIGN) as f:
        f.write(data)
        f.finish()
    assert (tmp_path / "a").read_bytes() == data
    with DirectFile(tmp_path / "b") as f:
        f.finish()
    assert (tmp_path / "b").read_bytes() == b""


@pytest.mark.parametrize("background", [False, True])
def test_a_filesystem_refusing_o_direct_gets_the_same_bytes_the_ordinary_way(tmp_path, monkeypatch, background):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_write, refused = os.write, []

    def write(fd, data):
        if not refused:  # the first write, as tmpfs or a network filesystem answers O_DIRECT
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct.os, "write", write)
    expected = b"".join(pieces(2))
    with DirectFile(tmp_path / "out.bin", chunk=2 * ALIGN, background=background) as f:
        f.write(expected)
        f.finish()
        assert refused and not f.direct
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_an_open_refusing_o_direct_falls_back_and_other_errors_raise(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open

    def open_(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(direct.os, "open", open_)
    with DirectFile(tmp_path / "out.bin") as f:
        assert not f.direct
        f.write(b"abc")
        f.finish()
    assert (tmp_path / "out.bin").read_bytes() == b"abc"
    with pytest.raises(FileNotFoundError):
        DirectFile(tmp_path / "missing" / "out.bin")


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("tail", [0, 5, ALIGN + 3])
def test_finish_writes_a_header_over_the_room_reserved_for_it(tmp_path, tail, background):
    """The safetensors shard writer reserves room for its header, writes the data, and writes the header into that
    room when the shard closes; the file is the header and the data, nothing else, whatever the tail's length."""
    room = 2 * ALIGN
    head = (b"HEADER" + bytes(range(250)) * 40)[:room]
    data = b"".join(pieces(3)) + bytes(tail)
    with DirectFile(tmp_path / "shard", chunk=4 * ALIGN, background=background) as f:
        f.write(bytes(room))
        f.write(data)
        f.finish(head=head)
    assert (tmp_path / "shard").read_bytes() == head + data
    with DirectFile(tmp_path / "bad", chunk=4 * ALIGN) as f, pytest.raises(ValueError, match="multiple"):
        f.write(bytes(room))
        f.finish(head=b"short")


def test_a_background_write_error_is_raised_in_the_caller(tmp_path, monkeypatch):
    """A disk error on the writing thread (here ENOSPC) reaches the caller at its next write or at finish, not lost."""
    def write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct.os, "write", write)
    with DirectFile(tmp_path / "out.bin", chunk=2 * ALIGN, background=True) as f:
        f.write(bytes(2 * ALIGN))  # a full chunk: handed to the thread
        with pytest.raises(OSError, match="No space"):
            f.write(bytes(2 * ALIGN))
            f.finish()
