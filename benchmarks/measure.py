"""Runs one command as a child process and measures it: wall time, peak RSS from os.wait4 (ru_maxrss, which
counts file pages mapped by mmap'd reads too), peak anonymous RSS (RssAnon sampled from /proc/<pid>/status),
and its I/O counters from /proc/<pid>/io, read after exit but before the child is reaped."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass

SAMPLE_S = 0.02


@dataclass
class Measurement:
    cmd: list[str]
    rc: int
    wall_s: float
    maxrss_mb: float  # ru_maxrss: anonymous + file-backed (mmap) pages, the high-water mark
    anon_peak_mb: float  # highest sampled RssAnon (every 20 ms): heap and tensors, no page cache
    read_mb: float  # /proc io rchar: bytes through read()/pread() (mmap'd reads are not counted)
    write_mb: float  # wchar: bytes through write()
    disk_read_mb: float  # read_bytes: fetched from storage (0 when everything sat in the page cache)
    disk_write_mb: float  # write_bytes: sent to storage
    steal_share: float  # the host's share of this VM's CPU time while the child ran (/proc/stat steal): a busy
    # host that the load average cannot see; timings taken with a large share are slowed by someone else
    cpu_s: float = 0.0  # user + system CPU seconds of the child (all its threads, from os.wait4): the work done,
    # which time stolen by the host does not inflate as it inflates the wall

    def to_dict(self) -> dict:
        return asdict(self)


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


def _io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return {}


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return fields[7] if len(fields) > 7 else 0, total


def steal_since(start: tuple[int, int]) -> float:
    """The host's steal share of all CPU time since `start` (a `_cpu_ticks()` reading)."""
    steal, total = _cpu_ticks()
    return (steal - start[0]) / max(total - start[1], 1)


def run_measured(cmd: list[str], env: dict | None = None, log=None) -> Measurement:
    ticks = _cpu_ticks()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log or subprocess.DEVNULL, stderr=log or subprocess.STDOUT)
    pid, peak, done = proc.pid, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_kb(pid, "RssAnon:"))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: /proc/<pid>/io still readable
    wall = time.perf_counter() - t0
    io = _io(pid)
    done.set()
    sampler.join()
    _, status, usage = os.wait4(pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    steal = steal_since(ticks)
    mb = 1 / 2**20
    return Measurement(cmd, proc.returncode, wall, usage.ru_maxrss / 1024, peak[0] / 1024,
                       io.get("rchar", 0) * mb, io.get("wchar", 0) * mb, io.get("read_bytes", 0) * mb,
                       io.get("write_bytes", 0) * mb, steal, usage.ru_utime + usage.ru_stime)


def _torch_processes() -> list[str]:
    """Other processes that have libtorch mapped (a torch job competing for the cores), as 'pid command'."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                if "libtorch_cpu" not in f.read():
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")[:100]
            found.append(f"{entry} {command}")
        except OSError:
            continue
    return found


def idle_check(max_load: float = 0.5) -> str | None:
    """None when the machine is idle enough to time on: the 1-minute load average at most `max_load` and no
    other torch process; else what is busy."""
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    others = _torch_processes()
    if load <= max_load and not others:
        return None
    return f"load average {load:.2f} (max {max_load})" + (f"; other torch processes: {others}" if others else "")


def wait_for_idle(allow_busy: bool, max_load: float = 0.5, patience_s: float = 120) -> str | None:
    """Waits up to `patience_s` for an idle machine. Still busy: raises SystemExit, or with `allow_busy` returns
    the reason (the caller marks the figures as taken on a busy machine)."""
    deadline = time.monotonic() + patience_s
    while (busy := idle_check(max_load)) is not None and time.monotonic() < deadline:
        time.sleep(5)
    if busy is None:
        return None
    if not allow_busy:
        raise SystemExit(f"machine is not idle: {busy}. Timings taken now would mislead; stop the other jobs, "
                         "or pass --allow-busy to measure anyway (the table will say so)")
    print(f"WARNING: timing on a busy machine: {busy}", flush=True)
    return busy
