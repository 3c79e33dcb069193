"""`python -m qmerge pipeline CONFIG --quiet`, with wall-clock timers wrapped around qmerge's functions from the
outside (qmerge's own code carries no timers): writes the split to $QMERGE_BENCH_TIMES as JSON.

    python benchmarks/qmerge_timed.py CONFIG

Categories (seconds, wall clock, the merge stage's own total split into parts that do not overlap):
  resolve  the resolve stage (headers, sha256 hashing)        read   safetensors tensor loads (base, adapter)
  fused    `nf4_merge`: NF4 round trip + ΔW add + storage cast + retention sums, one kernel per weight
  nf4      NF4 round trip of weights outside the fused path    write  ShardWriter.add/finalize (waits, fsync)
  merge    the rest of the merge stage (B@A, unfused adds and casts, metrics)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from functools import wraps

TIMES: dict[str, float] = defaultdict(float)
_active: list[str] = []  # innermost category wins; nested calls are not counted twice


def _timed(owner, attr: str, category: str) -> None:
    fn = getattr(owner, attr)

    @wraps(fn)
    def wrapper(*args, **kwargs):
        if _active:  # already inside a timed call: its category owns this time
            return fn(*args, **kwargs)
        _active.append(category)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[category] += time.perf_counter() - t0
            _active.pop()

    setattr(owner, attr, wrapper)


def install() -> None:
    import qmerge.io.adapter as adapter
    import qmerge.ops.nf4 as nf4
    import qmerge.merging as merge
    import qmerge.stages.resolve as resolve
    from qmerge.io.safetensors_io import CheckpointReader, ShardWriter

    _timed(CheckpointReader, "get", "read")
    _timed(adapter.Adapter, "load", "read")
    _timed(nf4, "nf4_weight", "nf4")
    _timed(merge, "nf4_merge", "fused")
    _timed(ShardWriter, "add", "write")
    _timed(ShardWriter, "finalize", "write")
    _timed(resolve, "resolve", "resolve")
    run_merge = merge.run_merge

    @wraps(run_merge)
    def total(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return run_merge(*args, **kwargs)
        finally:
            TIMES["merge_stage"] += time.perf_counter() - t0

    merge.run_merge = total


def main() -> int:
    from qmerge.runtime import set_process_defaults

    set_process_defaults()  # before torch is imported, as `python -m qmerge` does
    from qmerge.cli import main as cli_main

    install()
    t0 = time.perf_counter()
    rc = cli_main(["pipeline", sys.argv[1], "--quiet"])
    times = dict(TIMES)
    times["total"] = time.perf_counter() - t0
    times["merge"] = times.get("merge_stage", 0.0) - sum(times.get(k, 0.0) for k in ("read", "nf4", "fused", "write"))
    out = os.environ.get("QMERGE_BENCH_TIMES")
    if out:
        with open(out, "w") as f:
            json.dump(times, f, indent=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
