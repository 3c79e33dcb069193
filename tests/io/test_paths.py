"""sha256_file inside `memoized_hashes` (qmerge matrix resolving all its builds in one process): a file is read once
while its path, size, mtime and inode stay the same; any change, or leaving the block, reads it again."""

from __future__ import annotations

import hashlib
import os

from qmerge.io.paths import memoized_hashes, sha256_file


def test_memoized_hashes_read_a_file_once_until_it_changes(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 100)
    first = hashlib.sha256(b"a" * 100).hexdigest()
    with memoized_hashes():
        assert sha256_file(f) == first
        stat = f.stat()
        f.write_bytes(b"b" * 100)  # same size; the mtime put back: only a memo still says "a"
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert sha256_file(f) == first
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        assert sha256_file(f) == hashlib.sha256(b"b" * 100).hexdigest()
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(f) == hashlib.sha256(b"b" * 100).hexdigest()  # outside the block every call reads
