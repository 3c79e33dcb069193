"""Hashing inputs. sha256_file inside `memoized_hashes` (qmerge matrix resolving all its builds in one process): a
file is read once while its path, size, mtime and inode stay the same; any change, or leaving the block, reads it
again. resolve's `files_digest`: several files at once, the same digests and pin."""

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


def test_files_digest_hashes_files_at_once_and_keeps_the_pin(tmp_path, monkeypatch):
    """`files_digest` hashes several files on threads at once: each file's digest and the combined pin (digests
    concatenated in file-name order) are those of one file after another, whatever order the threads finish in;
    a file that cannot be read stops the others and its own error is the one raised."""
    import threading
    import time

    import pytest

    from qmerge.io import paths
    from qmerge.stages import resolve

    files = []
    for i, size in enumerate([3 * paths.CHUNK + 5, 17, 2 * paths.CHUNK, 0]):
        f = tmp_path / f"model-{4 - i}.bin"  # names sort opposite to the sizes
        f.write_bytes(os.urandom(size))
        files.append(f)
    ordered = sorted(files, key=lambda f: f.name)
    want = [hashlib.sha256(f.read_bytes()).hexdigest() for f in ordered]
    real, threads = paths.sha256_file, set()

    def slow_small(path, *args, **kwargs):  # the small files finish last
        threads.add(threading.get_ident())
        time.sleep(0.2 if path.stat().st_size < paths.CHUNK else 0)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(resolve, "sha256_file", slow_small)
    monkeypatch.setattr(resolve.os, "cpu_count", lambda: 4)
    entries, combined = resolve.files_digest(files, progress=False)
    assert [e["sha256"] for e in entries] == want and [e["path"] for e in entries] == [str(f) for f in ordered]
    assert [e["bytes"] for e in entries] == [f.stat().st_size for f in ordered]
    assert combined == hashlib.sha256("".join(want).encode()).hexdigest()
    assert len(threads) > 1

    stopped = []

    def failing(path, *args, stop=None, **kwargs):
        if path.name == "model-3.bin":
            raise PermissionError(f"cannot read {path}")
        time.sleep(0.3)
        stopped.append(stop.is_set())
        raise paths.Cancelled(str(path))

    monkeypatch.setattr(resolve, "sha256_file", failing)
    with pytest.raises(PermissionError, match="model-3.bin"):
        resolve.files_digest(files, progress=False)
    assert stopped and all(stopped)  # the others saw the stop


def test_tokenizer_source_is_the_first_adapter_that_ships_one_else_the_base(tmp_path):
    """The merged checkpoint's tokenizer (merge writes it, resolve checks it for GGUF): the first adapter folder with
    a tokenizer_config.json, else the base folder."""
    from qmerge.io.paths import tokenizer_source

    a, b, c, base = (tmp_path / n for n in ("a", "b", "c", "base"))
    for folder in (a, b, c, base):
        folder.mkdir()
    for folder in (b, c):
        (folder / "tokenizer_config.json").write_text("{}")
    assert tokenizer_source([a, b, c], base) == b
    assert tokenizer_source([str(c), str(b)], base) == c
    assert tokenizer_source([a], base) == base and tokenizer_source([], base) == base
