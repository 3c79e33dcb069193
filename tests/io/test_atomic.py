"""atomic: a published dir is all there or absent, never half; symlink swaps and locks behave across processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmerge.errors import BadInputError
from qmerge.io.atomic import (LockTimeout, TargetExistsError, atomic_dir, clean_stale_temps, file_lock,
                              swap_symlink, write_json_atomic)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_atomic_dir_publishes(tmp_path):
    target = tmp_path / "release"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".release.tmp-") and not target.exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.bin").write_bytes(b"\x00\x01")
    assert (target / "sub" / "a.txt").read_text() == "a" and (target / "b.bin").read_bytes() == b"\x00\x01"
    assert leftovers(tmp_path) == []


def test_atomic_dir_leaves_nothing_on_exception(tmp_path):
    target = tmp_path / "release"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not target.exists()
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == []


def test_atomic_dir_refuses_to_overwrite(tmp_path):
    target = tmp_path / "release"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(TargetExistsError) as err:
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert isinstance(err.value, FileExistsError) and isinstance(err.value, BadInputError)
    assert os.listdir(target) == ["old.txt"] and leftovers(tmp_path) == []


def test_atomic_dir_refuses_target_that_appears_meanwhile(tmp_path):
    target = tmp_path / "release"
    with pytest.raises(TargetExistsError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")  # another process won the race
    assert os.listdir(target) == ["theirs.txt"] and leftovers(tmp_path) == []


def test_atomic_dir_replace(tmp_path):
    target = tmp_path / "stage"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError
    assert os.listdir(target) == ["old.txt"]  # a failed replacement keeps the old one
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(target) == ["new.txt"] and leftovers(tmp_path) == []


def test_write_json_atomic(tmp_path):
    path = tmp_path / "done.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}  # the failed write left the old file whole
    assert leftovers(tmp_path) == []
    write_json_atomic(path, [3])
    assert json.loads(path.read_text()) == [3]


def test_swap_symlink(tmp_path):
    for v in ("v1", "v2"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "id").write_text(v)
    latest = tmp_path / "latest"
    swap_symlink(latest, "v1")
    assert os.readlink(latest) == "v1" and (latest / "id").read_text() == "v1"
    swap_symlink(latest, "v2")
    assert os.readlink(latest) == "v2" and (latest / "id").read_text() == "v2"
    assert leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["latest", "v1", "v2"]
    with pytest.raises(ValueError):
        swap_symlink(latest, str(tmp_path / "v1"))
    with pytest.raises(BadInputError):
        swap_symlink(tmp_path / "v1", "v2")  # a real folder is never replaced by a link
    assert (tmp_path / "v1").is_dir() and not (tmp_path / "v1").is_symlink()


def _try_lock(path: str, timeout: float, hold: float, q) -> None:
    try:
        with file_lock(Path(path), timeout=timeout):
            q.put(("acquired", time.monotonic()))
            time.sleep(hold)
    except LockTimeout as e:
        q.put(("timeout", str(e)))


def _die_holding(path: str) -> None:
    f = open(path, "a+")
    import fcntl

    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    os._exit(0)  # no unlock, no close: the kernel releases the lock with the process


def test_file_lock_excludes_another_process(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    lock = str(tmp_path / ".lock")
    with file_lock(lock):
        p = ctx.Process(target=_try_lock, args=(lock, 0.3, 0.0, q))
        p.start()
        p.join(10)
        status, msg = q.get(timeout=5)
        assert status == "timeout" and str(os.getpid()) in msg  # names the holder
        p = ctx.Process(target=_try_lock, args=(lock, 10.0, 0.0, q))
        p.start()
        time.sleep(0.3)
        assert q.empty()  # still waiting while we hold it
        released = time.monotonic()
    status, when = q.get(timeout=10)
    p.join(10)
    assert status == "acquired" and when >= released


def test_file_lock_released_when_holder_dies(tmp_path):
    lock = tmp_path / ".lock"
    p = mp.get_context("fork").Process(target=_die_holding, args=(str(lock),))
    p.start()
    p.join(10)
    with file_lock(lock, timeout=2.0):
        pass


def test_clean_stale_temps(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".release.tmp-{dead.pid}-abcd1234"
    mine = tmp_path / f".release.tmp-{os.getpid()}-abcd1234"
    stale_file = tmp_path / f".done.json.tmp-{dead.pid}-00ff"
    for d in (stale, mine, tmp_path / ".hidden", tmp_path / f"release.tmp-{dead.pid}-ab"):
        d.mkdir()
        (d / "x").write_text("x")
    stale_file.write_text("{")
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale, stale_file])
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, ".hidden", f"release.tmp-{dead.pid}-ab"])
    assert clean_stale_temps(tmp_path / "absent") == []


def test_stale_temps_of_another_host_are_left_alone(tmp_path):
    """A work dir shared by several machines (or pid namespaces): a pid dead here may be a live build there."""
    from qmerge.io.atomic import host_id, temp_sibling

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fresh = temp_sibling(tmp_path / "merge")
    assert fresh.name.startswith(f".merge.tmp-h{host_id()}-{os.getpid()}-")
    here = tmp_path / f".merge.tmp-h{host_id()}-{dead.pid}-abcd1234"
    other = "0" * 8 if host_id() != "0" * 8 else "1" * 8
    elsewhere = tmp_path / f".merge.tmp-h{other}-{dead.pid}-abcd1234"
    here.mkdir(), elsewhere.mkdir()
    assert clean_stale_temps(tmp_path) == [here]
    assert elsewhere.is_dir()
