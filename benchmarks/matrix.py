"""The nightly release matrix four ways: its builds as separate `qmerge pipeline` runs one after another, each with
its own work dir (`independent`: what a shell loop over four configs does) or all in the matrix's work dir
(`sequential`: sharing every stage and evaluate's hidden states, without running two builds at once), `qmerge
matrix` with the local scheduler, and `qmerge matrix --ray` (a local Ray instance started by qmerge).

    python benchmarks/matrix.py                                  # configs/nightly.toml, 3 rounds (~10+ min per run)
    python benchmarks/matrix.py --matrix tiny.toml --repeat 1 --allow-busy      # a smoke run of the plumbing
    python benchmarks/matrix.py --modes local,ray --ray-address 10.0.0.5:6379   # an existing cluster

Every run starts from fresh work and release dirs (a copy of the matrix with `work_dir` and every `output.dir`
pointing into `<work>/<mode>-<round>/`; the GGUF conversion cache is shared, as in the README's timings), and is
followed by a rerun with nothing changed in the same dirs (what a nightly job costs when nothing moved). Timing:
`--repeat N` rounds, the modes taking turns in an order reversed every other round; before every run the machine
must be idle (1-minute load ≤ 0.5 and no other torch process, waited for up to 2 min, else refused unless
`--allow-busy`, which marks the figures). Memory: the peak of the summed anonymous RSS of the whole process tree
(the driver, every pipeline child, and for Ray its raylet, GCS and workers), sampled every 50 ms.
Each run's per-build exit codes are compared across modes (they must agree). Prints a markdown table (medians with
min–max) and writes JSON (default benchmarks/results/matrix.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
MODES = ("independent", "sequential", "local", "ray")
SAMPLE_S = 0.05
CHEAP = {"resolve", "promote", "register"}  # what a rerun with nothing changed runs again (they check, not build)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--matrix", type=Path, default=REPO / "configs" / "nightly.toml")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians and min-max")
    p.add_argument("--jobs", type=int, help="qmerge matrix --jobs (default: qmerge's)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: qmerge starts a local instance)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qmerge" / "bench" / "matrix")
    p.add_argument("--no-rerun", dest="rerun", action="store_false", help="skip the rerun with nothing changed")
    p.add_argument("--allow-busy", action="store_true",
                   help="time even when the machine is not idle (the table then says so); default: wait, then refuse")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "matrix.json")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    return args


def fresh_matrix(matrix: Path, folder: Path) -> Path:
    """A copy of `matrix` in `folder` whose paths are absolute and whose work dir and releases are under `folder`."""
    from qmerge.io.paths import dump_toml, read_toml
    from qmerge.matrix import absolute_paths

    raw = read_toml(matrix, "matrix file")
    src = matrix.resolve().parent
    defaults = absolute_paths(raw.get("defaults", {}), src)
    defaults.setdefault("output", {})["dir"] = str(folder / "releases")
    bases = [absolute_paths({"base": dict(b)}, src)["base"] for b in raw["bases"]]
    adapters = [absolute_paths({"adapters": [dict(a)]}, src)["adapters"][0] for a in raw["adapters"]]
    targets = []
    for t in raw["targets"]:
        t = absolute_paths(dict(t), src)
        if "dir" in t.get("output", {}):
            t["output"]["dir"] = str(folder / "releases")
        targets.append(t)
    folder.mkdir(parents=True, exist_ok=False)
    out = folder / "matrix.toml"
    out.write_text(dump_toml({"work_dir": str(folder / "work"), "defaults": defaults, "bases": bases,
                              "adapters": adapters, "targets": targets}))
    return out


def _tree(root: int) -> list[int]:
    """`root` and every descendant, from /proc/<pid>/stat parent links."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_tree(cmd: list[str], env: dict, log: Path) -> dict:
    """Runs `cmd`; wall time and the peak summed RssAnon of its process tree."""
    start = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], sum(_anon_kb(p) for p in _tree(proc.pid)))
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
    return {"rc": rc, "wall_s": time.perf_counter() - start, "peak_anon_mb": peak[0] / 1024}


def run_mode(mode: str, matrix: Path, args: argparse.Namespace, env: dict) -> dict:
    """One run of `mode` on `matrix` (fresh dirs or not: the caller decides); per-build exit codes included."""
    folder = matrix.parent
    log = folder / f"{mode}.log"
    if mode in ("independent", "sequential"):
        from qmerge.io.paths import dump_toml, read_toml
        from qmerge.matrix import write_builds

        _, builds = write_builds(matrix)
        runs, codes, ran = [], {}, {}
        for b in builds:
            if mode == "independent":  # the build's own work dir: nothing shared with the other builds
                config = read_toml(b.config, "build config")
                b.config.write_text(dump_toml({**config, "work_dir": str(folder / f"work-{b.name}")}))
            summary = b.config.with_suffix(".summary.json")
            summary.unlink(missing_ok=True)
            runs.append(run_tree([sys.executable, "-m", "qmerge", "pipeline", str(b.config), "--quiet",
                                  "--summary-json", str(summary)], env, log))
            codes[b.name] = runs[-1]["rc"]
            stages = json.loads(summary.read_text())["stages"] if summary.is_file() else []
            ran[b.name] = [st["name"] for st in stages if st["status"] == "ran"]
        return {"rc": max(r["rc"] for r in runs), "wall_s": sum(r["wall_s"] for r in runs),
                "peak_anon_mb": max(r["peak_anon_mb"] for r in runs), "builds": codes, "ran": ran}
    cmd = [sys.executable, "-m", "qmerge", "matrix", str(matrix), "--quiet"]
    if args.jobs:
        cmd += ["--jobs", str(args.jobs)]
    if mode == "ray":
        cmd += ["--ray"] + ([args.ray_address] if args.ray_address else [])
    run = run_tree(cmd, env, log)
    report = folder / "work" / "matrix" / "matrix_report.json"
    rows = json.loads(report.read_text())["builds"] if report.is_file() else []
    run["builds"] = {b["build"]: b["exit_code"] for b in rows}
    run["ran"] = {b["build"]: b["ran"] for b in rows}
    return run


def alternate(args: argparse.Namespace) -> tuple[dict[str, list[dict]], list[str]]:
    from measure import wait_for_idle

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[dict]] = {}
    mismatches = []
    for i in range(args.repeat):
        order = args.modes if i % 2 == 0 else args.modes[::-1]
        for mode in order:
            matrix = fresh_matrix(args.matrix, args.work / f"{stamp}-{mode}-{i}")
            for kind in ("fresh", "rerun") if args.rerun else ("fresh",):
                busy = wait_for_idle(args.allow_busy)
                run = run_mode(mode, matrix, args, env) | {"round": i, "busy": busy, "folder": str(matrix.parent)}
                runs.setdefault(f"{mode} ({kind})", []).append(run)
                rebuilt = {b: sorted(set(st) - CHEAP) for b, st in run["ran"].items() if set(st) - CHEAP}
                if kind == "rerun" and rebuilt:
                    mismatches.append(f"round {i + 1} {mode}: the rerun with nothing changed rebuilt {rebuilt}")
                print(f"round {i + 1}/{args.repeat} {mode} {kind}: exit {run['rc']}, builds {run['builds']}",
                      flush=True)
        codes = {m: runs[f"{m} (fresh)"][-1]["builds"] for m in args.modes}
        if len({json.dumps(c, sort_keys=True) for c in codes.values()}) > 1:
            mismatches.append(f"round {i + 1}: per-build exit codes differ: {codes}")
    return runs, mismatches


def summarize(runs: list[dict]) -> dict:
    wall = [r["wall_s"] for r in runs]
    mem = [r["peak_anon_mb"] for r in runs]
    return {"runs": len(runs), "wall_s_median": statistics.median(wall), "wall_s_min": min(wall),
            "wall_s_max": max(wall), "peak_anon_mb_median": statistics.median(mem), "peak_anon_mb_max": max(mem),
            "exit_codes": sorted({r["rc"] for r in runs}), "busy": any(r["busy"] for r in runs)}


def table(summary: dict[str, dict]) -> str:
    lines = ["| run | wall s, median (min–max) | peak anon RSS of the tree, MB, median (max) | exit | busy |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['wall_s_median']:.1f} ({s['wall_s_min']:.1f}–{s['wall_s_max']:.1f}) | "
                     f"{s['peak_anon_mb_median']:.0f} ({s['peak_anon_mb_max']:.0f}) | "
                     f"{','.join(map(str, s['exit_codes']))} | {'yes' if s['busy'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    runs, mismatches = alternate(args)
    summary = {name: summarize(r) for name, r in runs.items()}
    print(table(summary))
    for m in mismatches:
        print(f"WARNING: {m}")
    result = {"matrix": str(args.matrix.resolve()), "modes": args.modes, "repeat": args.repeat, "jobs": args.jobs,
              "ray_address": args.ray_address, "summary": summary, "runs": runs, "mismatches": mismatches,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
              "date": time.strftime("%Y-%m-%d")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
