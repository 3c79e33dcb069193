"""Atomic publishing: build in a temp dir on the same filesystem, fsync, rename. Nothing is ever
written in place, so a crash leaves either the old state or the new one, never half of either."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qmerge.errors import QmergeError

TEMP_MARK = ".tmp-"


class LockTimeout(QmergeError):
    pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yields a temp dir next to `target`; on success it becomes `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    tmp = target.parent / f".{target.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def swap_symlink(link: Path, target_name: str) -> None:
    """Points `link` at `target_name` (relative) by renaming a fresh symlink over it: readers see the old
    target or the new one, never a missing link."""
    link = Path(link)
    tmp = link.parent / f".{link.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(target_name, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


@contextmanager
def file_lock(path: Path, timeout: float = 600.0) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on `path`, waiting up to `timeout` seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path}: another qmerge process held the lock for {timeout:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Removes temp dirs left by crashed processes (their pid is gone)."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for p in Path(parent).iterdir():
        if not p.name.startswith(".") or TEMP_MARK not in p.name:
            continue
        try:
            pid = int(p.name.rsplit(TEMP_MARK, 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
