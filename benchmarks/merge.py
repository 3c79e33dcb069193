"""qmerge's merge stage against the PEFT scripts users write today, on the same work, in one run.

    .venv/bin/python benchmarks/merge.py [--workload smollm|7b-slice|all] [--device cpu|cuda]
                                         [--paths cp,qmerge,peft-fp32,peft-4bit] [--dtype float32]

Every path runs in its own child process (benchmarks/measure.py: wall, ru_maxrss, sampled RssAnon,
/proc/<pid>/io); each output is then compared with a float64 reference merge (benchmarks/children.py).
Prints a markdown table per workload with the goals next to the figures and saves everything as JSON
(benchmarks/results/merge-<workload>-<device>.json). Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import run_measured  # noqa: E402
from workloads import CACHE, WORKLOADS, Workload  # noqa: E402

PY = sys.executable
ALL_PATHS = ("cp", "qmerge", "peft-fp32", "peft-4bit")
IMPORTS = "import torch, transformers, peft, bitsandbytes, safetensors, qmerge.merging, qmerge.stages.resolve"
WORST_TENSOR_COPIES = 6  # "small constant": float32 W, W_nf4, ΔW, W+ΔW, the stored cast, the read buffer


def qmerge_config(w: Workload, run: Path, dtype: str, device: str) -> Path:
    """A pipeline config (shape as tests/conftest.py `write_config`) matching what the PEFT paths do."""
    lines = ['name = "bench"', f'work_dir = "{run / "work"}"', "[base]", f'path = "{w.base}"', "[base.nf4]",
             'quant_type = "nf4"', "blocksize = 64", "double_quant = true", 'load_dtype = "float32"',
             'compute_dtype = "float32"', 'dequant_dtype = "auto"', "[[adapters]]", f'path = "{w.adapter}"',
             "weight = 1.0", "[merge]", 'into = "nf4"', f'dtype = "{dtype}"', f'device = "{device}"',
             "[output]", f'dir = "{run / "releases"}"']
    path = run / "qmerge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _merged_folder(work: Path) -> Path:
    return next(p.parent for p in (work / "merge").glob("*/config.json"))


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}


def _median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one for an even count), with every run's wall time
    and the highest peak anon RSS of all runs beside it."""
    ordered = sorted(runs, key=lambda m: m["wall_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["walls_s"] = [m["wall_s"] for m in runs]
    pick["anon_peak_mb_median_run"] = pick["anon_peak_mb"]
    pick["anon_peak_mb"] = max(m["anon_peak_mb"] for m in runs)  # memory goals hold for every run, not a median
    return pick


def run_paths(w: Workload, paths: list[str], run: Path, dtype: str, device: str, split: bool,
              repeat: int = 1) -> dict:
    """Each path cold, in its own process; with `repeat` > 1 the paths take turns (qmerge, PEFT, qmerge, ...)
    so that drift of the machine's speed hits both, and each row is the median run."""
    results, outputs, runs = {}, {}, {}
    log = open(run / "children.log", "ab")
    base_files = sorted(str(p) for p in w.base.iterdir() if p.is_file())

    def measure(key: str, cmd: list[str], env: dict | None = None) -> dict:
        os.sync()  # untimed: the previous path's dirty pages must not be written back during this one
        print(f"  {key} ...", file=sys.stderr, flush=True)
        m = run_measured(cmd, env or _env(), log).to_dict()
        print(f"  {key}: {m['wall_s']:.1f} s, rc {m['rc']}", file=sys.stderr, flush=True)
        runs.setdefault(key, []).append(m)
        return m

    def fresh(folder: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        return folder

    measure("imports", [PY, "-c", IMPORTS])  # the interpreter + library floor every python path pays
    if "cp" in paths:  # cp, then fsync what it wrote (qmerge fsyncs too; PEFT's save_pretrained does not)
        measure("cp", ["sh", "-c", 'cp "$@" "$0" && sync "$0"/*', str(fresh(run / "cp")), *base_files])
    for i in range(repeat):
        last = i == repeat - 1  # outputs of the last round are kept for the comparison with the reference
        if "qmerge" in paths:
            cfg = qmerge_config(w, fresh(run / "qmerge"), dtype, device)
            if measure("qmerge", [PY, "-m", "qmerge", "pipeline", str(cfg), "--quiet"])["rc"] == 0 and last:
                outputs["qmerge"] = _merged_folder(run / "qmerge" / "work")
        for key in ("peft-fp32", "peft-4bit"):
            if key in paths:
                out = run / key
                shutil.rmtree(out, ignore_errors=True)
                dev = "cuda" if device == "cuda" else "cpu"
                if measure(key, [PY, str(HERE / "children.py"), key, str(w.base), str(w.adapter), str(out), dtype,
                                 dev])["rc"] == 0 and last:
                    outputs[key] = out
    if "qmerge" in paths:  # once with empty inductor and qmerge caches: a fresh machine's first run builds the C
        cfg = qmerge_config(w, fresh(run / "qmerge-cold-build"), dtype, device)  # helper (and any inductor kernel)
        measure("qmerge-cold-build", [PY, "-m", "qmerge", "pipeline", str(cfg), "--quiet"],
                {**_env(), "TORCHINDUCTOR_CACHE_DIR": str(fresh(run / "inductor-empty")),
                 "QMERGE_CACHE": str(fresh(run / "qmerge-cache-empty"))})
        shutil.rmtree(run / "qmerge-cold-build" / "work", ignore_errors=True)
    if split and "qmerge" in paths:  # one more cold run with outside timers, for the time split
        cfg2 = qmerge_config(w, fresh(run / "qmerge-split"), dtype, device)
        times = run / "qmerge-split" / "times.json"
        m = measure("qmerge-split", [PY, str(HERE / "qmerge_timed.py"), str(cfg2)],
                    {**_env(), "QMERGE_BENCH_TIMES": str(times)})
        if m["rc"] == 0:
            m["split"] = json.loads(times.read_text())
        shutil.rmtree(run / "qmerge-split" / "work", ignore_errors=True)
    results = {key: _median_run(ms) for key, ms in runs.items()}
    if outputs:
        print("  comparing with the float64 reference ...", file=sys.stderr, flush=True)
        diff = run / "diff.json"
        m = run_measured([PY, str(HERE / "children.py"), "compare", str(w.base), str(w.adapter), str(diff),
                          *(f"{k}={v}" for k, v in outputs.items())], _env(), log)
        if m.rc == 0:
            for k, d in json.loads(diff.read_text()).items():
                results[k]["diff"] = {**d, "missing": len(d["missing"])}
    return results


def _largest_tensor_bytes(w: Workload) -> int:
    from qmerge.io.safetensors_io import CheckpointReader

    return max(4 * max(1, _numel(i.shape)) for i in CheckpointReader(w.base).tensors.values())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def goals(r: dict, largest: int, writer_buffer: int) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) rows."""
    rows = []
    q, p = r.get("qmerge"), r.get("peft-fp32")
    if q and p:
        x = p["wall_s"] / q["wall_s"]
        pairs = [pw / qw for pw, qw in zip(p.get("walls_s", []), q.get("walls_s", []))]
        spread = f" (run pairs {min(pairs):.2f}–{max(pairs):.2f}×)" if len(pairs) > 1 else ""
        rows.append(("qmerge vs PEFT float32, wall (medians)", "≥ 2× (stretch 5×)", f"{x:.2f}×{spread}",
                     "stretch met" if x >= 5 else "met" if x >= 2 else "MISSED"))
        lim = p["anon_peak_mb"] / 4
        rows.append(("qmerge peak anon RSS ≤ ¼ PEFT float32's", f"≤ {lim:.0f} MB", f"{q['anon_peak_mb']:.0f} MB",
                     "met" if q["anon_peak_mb"] <= lim else "MISSED"))
    if q:
        floor = r["imports"]["anon_peak_mb"]
        lim = floor + (WORST_TENSOR_COPIES * largest + writer_buffer) / 2**20
        rows.append((f"qmerge peak anon RSS ≤ imports + {WORST_TENSOR_COPIES} × largest tensor (f32, "
                     f"{largest / 2**20:.0f} MB) + writer buffer ({writer_buffer / 2**20:.0f} MB)",
                     f"≤ {lim:.0f} MB", f"{q['anon_peak_mb']:.0f} MB",
                     "met" if q["anon_peak_mb"] <= lim else "MISSED"))
        split = r.get("qmerge-split", {}).get("split")
        if split and "cp" in r:
            floor_s = r["cp"]["wall_s"] + split.get("nf4", 0.0) + split.get("fused", 0.0)
            rows.append(("qmerge wall vs floor = cp + NF4 round trip (the fused kernel's time, which also adds ΔW: "
                         "an upper bound on NF4 alone)", f"{floor_s:.1f} s", f"{q['wall_s']:.1f} s",
                         f"{q['wall_s'] / floor_s:.2f}× floor"))
    return rows


def table(name: str, r: dict, largest: int, writer_buffer: int, device: str) -> str:
    p = r.get("peft-fp32")
    lines = [f"### {name} ({device})", "",
             "| path | wall s (min–max) | speed vs PEFT f32 | peak RSS (ru_maxrss, incl. mmap'd file pages) MB | "
             "peak anon RSS MB (max of runs) "
             "| read() MB | written MB | max abs diff vs f64 ref (merged layers) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key in ("imports", "cp", "qmerge", "qmerge-cold-build", "qmerge-split", "peft-fp32", "peft-4bit"):
        m = r.get(key)
        if m is None:
            continue
        speed = f"{p['wall_s'] / m['wall_s']:.2f}×" if p and key not in ("imports",) else ""
        d = m.get("diff")
        diff = f"{d['max_abs_diff']:.2e} ({d['max_abs_diff_merged']:.2e})" if d else ""
        if d and d["missing"]:
            diff += f", {d['missing']} tensors missing"
        rc = "" if m["rc"] == 0 else f" **rc {m['rc']}**"
        walls = m.get("walls_s", [m["wall_s"]])
        wall = f"{m['wall_s']:.1f}" + (f" ({min(walls):.1f}–{max(walls):.1f})" if len(walls) > 1 else "")
        lines.append(f"| {key}{rc} | {wall} | {speed} | {m['maxrss_mb']:.0f} | {m['anon_peak_mb']:.0f} | "
                     f"{m['read_mb']:.0f} | {m['write_mb']:.0f} | {diff} |")
    split = r.get("qmerge-split", {}).get("split")
    if split:
        parts = ", ".join(f"{k} {split.get(k, 0.0):.1f} s" for k in ("resolve", "read", "fused", "nf4", "merge",
                                                                       "write"))
        lines += ["", f"qmerge split (merge stage {split.get('merge_stage', 0):.1f} s of {split['total']:.1f} s): "
                  f"{parts}"]
    lines += ["", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {v} |" for g, t, m, v in goals(r, largest, writer_buffer)]
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import version

    out = {k: version(k) for k in ("torch", "bitsandbytes", "peft", "transformers", "safetensors", "qmerge")}
    out |= {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--paths", default=",".join(ALL_PATHS), help=f"comma-separated subset of {','.join(ALL_PATHS)}")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="storage dtype of every merged output (float32: the diff column shows merge error only)")
    ap.add_argument("--no-split", action="store_true", help="skip the extra qmerge run with the time split")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path, taking turns; rows show the median")
    ap.add_argument("--keep", action="store_true", help="keep the outputs under the cache's runs/ folder")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if bad := set(paths) - set(ALL_PATHS):
        ap.error(f"unknown paths {sorted(bad)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but torch sees no CUDA device")
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    (HERE / "results").mkdir(exist_ok=True)
    from qmerge.config import MergeSettings

    writer_buffer = MergeSettings().max_shard_size if os.environ.get("QMERGE_BENCH_BUFFERED") else 0
    for name in names:
        print(f"{name}: building / loading the workload ...", file=sys.stderr, flush=True)
        w = WORKLOADS[name]()
        run = CACHE / "runs" / f"{name}-{args.device}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        r = run_paths(w, paths, run, args.dtype, args.device, not args.no_split, args.repeat)
        if args.device == "cuda" and "qmerge-split" in r and "split" in r["qmerge-split"]:
            r["qmerge-split"]["dequant_merge_gb_s"] = _throughput(w, r["qmerge-split"]["split"])
        largest = _largest_tensor_bytes(w)
        text = table(f"{name}: {w.note}", r, largest, writer_buffer, args.device)
        print(text + "\n", flush=True)
        doc = {"workload": name, "note": w.note, "device": args.device, "dtype": args.dtype, "repeat": args.repeat,
               "results": r,
               "goals": goals(r, largest, writer_buffer), "versions": versions(),
               "date": time.strftime("%Y-%m-%d"), "largest_tensor_f32_bytes": largest}
        (HERE / "results" / f"merge-{name}-{args.device}.json").write_text(json.dumps(doc, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
    return 0


def _throughput(w: Workload, split: dict) -> float:
    """GB/s of float32 weight produced by dequantize + merge (the NF4 and merge parts of the split)."""
    from qmerge.io.safetensors_io import CheckpointReader

    nbytes = sum(4 * _numel(i.shape) for i in CheckpointReader(w.base).tensors.values())
    return nbytes / 1e9 / max(split.get("nf4", 0.0) + split.get("fused", 0.0) + split["merge"], 1e-9)


if __name__ == "__main__":
    sys.exit(main())
