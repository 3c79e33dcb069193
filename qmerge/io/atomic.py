"""Atomic publishing: build in a temp dir on the same filesystem, fsync, rename. Nothing is ever written in
place, so a crash leaves either the old state or the new one, never half of either. rename(2) is atomic only
within one filesystem, hence temp names are siblings of their target: `.<name>.tmp-h<host>-<pid>-<random>`."""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qmerge.errors import BadInputError, QmergeError

TEMP_MARK = ".tmp-"
# .<name>.tmp-h<host>-<pid>-<hex>; names without h<host> come from before hosts were named (taken as this host's)
_TEMP_RE = re.compile(r"^\..+\.tmp-(?:h([0-9a-f]{8})-)?(\d+)-[0-9a-f]+$")


@functools.cache
def host_id() -> str:
    """8 hex naming this host and pid namespace (a container, a pod): where a temp name's pid means something."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


class LockTimeout(QmergeError):
    """Another process held the lock longer than the caller was willing to wait."""


class TargetExistsError(BadInputError, FileExistsError):
    """`atomic_dir` refused to overwrite an existing target (exit 2; still a FileExistsError)."""


def temp_sibling(path: Path, tag: str = "") -> Path:
    """A fresh hidden name next to `path`, recognisable (and reclaimable) by `clean_stale_temps`."""
    return path.parent / f".{path.name}{tag}{TEMP_MARK}h{host_id()}-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_file(path: Path | str) -> None:
    """Makes a file's contents durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode `open()` would give a new file. Read from /proc where
    possible, since os.umask(0) to query it briefly changes it for every thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path | str) -> None:
    """Makes a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every regular file and directory under `root` (symlinks are entries, synced with their dir)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            fsync_file(p)
        fsync_dir(dirpath)


@contextmanager
def atomic_dir(target: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yields a temp dir next to `target`; on normal exit it is fsynced and renamed to `target`, on an
    exception it is removed and `target` is left untouched. An existing `target` raises TargetExistsError
    unless `replace`, which moves the old one aside, renames the new one in, then deletes the old one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise TargetExistsError("already exists and is never overwritten", path=target,
                                fix="choose a new name, or remove it first")
    tmp = temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        _publish(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    old = None
    if target.exists() or target.is_symlink():
        if not replace:  # appeared while we were building
            raise TargetExistsError("appeared while this one was being built", path=target,
                                    fix="another process published it; rerun to pick it up")
        old = temp_sibling(target, ".old")
        os.rename(target, old)
    try:
        os.rename(tmp, target)  # onto a missing name: never clobbers a dir that appeared meanwhile
    except OSError as e:
        if old is not None:
            os.rename(old, target)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise TargetExistsError("appeared while this one was being built", path=target) from None
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def write_json(path: Path | str, obj: object) -> None:
    """`obj` as indented, key-sorted JSON (the one format of every JSON file qmerge writes). For files inside a
    stage's or a release's temp dir, which is published atomically as a whole; `write_json_atomic` otherwise."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_json_atomic(path: Path | str, obj: object) -> None:
    """Writes `obj` as indented, key-sorted JSON via temp file + fsync + os.replace: readers never see half."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: Path | str, text: str) -> None:
    """Writes `text` via temp file + fsync + os.replace: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def swap_symlink(link: Path | str, target_name: str) -> None:
    """Points `link` at `target_name` (relative to the link's folder) by renaming a fresh symlink over it:
    readers see the old target or the new one, never a missing link."""
    link = Path(link)
    if os.path.isabs(target_name):
        raise ValueError(f"symlink target must be relative so the tree can move, got {target_name!r}")
    if link.exists() and not link.is_symlink():
        raise BadInputError("is a real file or folder, not a symlink; refusing to replace it", path=link,
                            fix="move it away; qmerge manages this name as a symlink")
    tmp = temp_sibling(link)
    os.symlink(target_name, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


@contextmanager
def file_lock(path: Path | str, timeout: float | None = 600.0, on_wait=None) -> Iterator[None]:
    """Exclusive advisory lock (fcntl.flock) on `path`, waiting up to `timeout` seconds (None: forever).
    flock belongs to the open file, so it is released if the holder dies; it is not re-entrant.
    `on_wait(holder_pid)` is called once if the lock is held by another process when we arrive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(path.read_text().strip() or "?")
            if timeout is None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            else:
                _flock_with_deadline(f, path, timeout)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")  # who holds it, for the timeout message of the next waiter
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _flock_with_deadline(f, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = path.read_text().strip() or "?"
                raise LockTimeout(f"{path}: process {holder} held the lock for more than {timeout:g} s; "
                                  "fix: wait for it to finish, or raise the timeout") from None
            time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a live process (EPERM means alive but someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path | str) -> list[Path]:
    """Removes this host's temp entries in `parent` (`temp_sibling` names) whose process is dead (a crash left
    them). Another host's or container's are left alone: their pids mean nothing here, and a work dir shared by
    several machines (a Ray cluster) must not lose a build in progress elsewhere."""
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TEMP_RE.match(p.name)
        if m is None or m.group(1) not in (None, host_id()) or pid_alive(int(m.group(2))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
