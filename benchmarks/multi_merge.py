"""Memory and speed of a multi-adapter merge against the single-adapter merge, on the 7B-shaped slice.

    .venv/bin/python benchmarks/multi_merge.py [--repeat 3] [--allow-busy] [--json OUT]

Runs qmerge's pipeline (resolve + merge, bf16 storage, CPU) in a child process per run (benchmarks/measure.py:
wall, CPU seconds, sampled peak RssAnon) for: one r=16 adapter (`linear`), and three r=16 adapters combined by
`linear`, `ties` (density 0.5) and `dare_ties` (density 0.5). The configurations alternate run by run, each in a fresh work dir, after
an idle check. Prints medians with min–max and writes `--json` (default benchmarks/results/multi-merge-latest.json,
not a file the docs cite). The goal: a multi-adapter merge costs what the single-adapter merge costs plus the
adapters' factors. Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import run_measured, wait_for_idle  # noqa: E402
from workloads import CACHE, random_adapter, slice7b  # noqa: E402

CASES = [("1 adapter, linear", 1, "linear", 1.0), ("3 adapters, linear", 3, "linear", 1.0),
         ("3 adapters, ties d=0.5", 3, "ties", 0.5), ("3 adapters, dare_ties d=0.5", 3, "dare_ties", 0.5)]


def config(run: Path, base: Path, adapters: list[Path], method: str, density: float) -> Path:
    lines = ['name = "bench"', f'work_dir = "{run / "work"}"', "[base]", f'path = "{base}"', "[base.nf4]",
             'load_dtype = "float32"', 'compute_dtype = "float32"']
    for a in adapters:
        lines += ["[[adapters]]", f'path = "{a}"']
    lines += ["[merge]", 'dtype = "bfloat16"', 'device = "cpu"', f'method = "{method}"']
    if method != "linear":
        lines.append(f"density = {density}")
    run.mkdir(parents=True, exist_ok=True)
    path = run / "qmerge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--allow-busy", action="store_true")
    p.add_argument("--json", type=Path, default=HERE / "results" / "multi-merge-latest.json")
    args = p.parse_args(argv)
    w = slice7b()
    adapters = [w.adapter] + [random_adapter(w.base, CACHE / f"llama2-7b-slice4-r16-s{s}", r=16, alpha=32, seed=s)
                              for s in (17, 18)]
    root = CACHE / "runs" / "multi-merge"
    results = {name: [] for name, *_ in CASES}
    for rep in range(args.repeat):
        for name, n, method, density in CASES:
            wait_for_idle(allow_busy=args.allow_busy)
            run = root / f"{rep}-{method}-{n}"
            shutil.rmtree(run, ignore_errors=True)
            cfg = config(run, w.base, adapters[:n], method, density)
            m = run_measured([sys.executable, "-m", "qmerge", "pipeline", str(cfg), "--quiet"])
            if m.rc != 0:
                raise SystemExit(f"{name}: exit {m.rc} (see {run})")
            results[name].append({"wall_s": m.wall_s, "cpu_s": m.cpu_s, "anon_peak_mb": m.anon_peak_mb,
                                  "steal_share": m.steal_share})
            print(f"[{time.strftime('%H:%M:%S')}] {name} run {rep + 1}: {m.wall_s:.1f} s ({m.cpu_s:.1f} CPU s), "
                  f"peak anon {m.anon_peak_mb:.0f} MB, host steal {100 * m.steal_share:.0f} %",
                  file=sys.stderr, flush=True)
            save(args.json, w.note, args.repeat, results)  # after every run: a cut-short benchmark keeps what it measured
            shutil.rmtree(run, ignore_errors=True)
    print(f"\n7B-shaped slice ({w.note}); {args.repeat} alternating runs each, medians (min–max)\n")
    print("| merge | wall s | CPU s (user + system) | peak anon RSS MB | host steal % (max) |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        walls, peaks, cpus = ([r[key] for r in runs] for key in ("wall_s", "anon_peak_mb", "cpu_s"))
        print(f"| {name} | {statistics.median(walls):.1f} ({min(walls):.1f}–{max(walls):.1f}) | "
              f"{statistics.median(cpus):.1f} ({min(cpus):.1f}–{max(cpus):.1f}) | "
              f"{statistics.median(peaks):.0f} ({min(peaks):.0f}–{max(peaks):.0f}) | "
              f"{100 * max(r['steal_share'] for r in runs):.0f} |")
    return 0


def save(out: Path, note: str, repeat: int, results: dict) -> None:
    out.write_text(json.dumps({"workload": note, "repeat": repeat, "results": results,
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
