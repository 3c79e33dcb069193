"""How many eval windows make the gate's verdict stable, on the demo adapters.

    python benchmarks/gate_stability.py                 # both demos, 500 draws per window count
    python benchmarks/gate_stability.py --draws 100 --configs configs/demo.toml

For each demo config: runs its pipeline once with the gate's eval text widened to every in-domain news document
no demo stage has seen (lee_background documents 250:300: training used 0:110, GPTQ calibration 110:250) and every
window of it evaluated (the evaluate report keeps per-window NLL and KL). Then, for each window count n, draws n
of those windows without replacement (`--draws` seeds), re-derives the gate's figures from the drawn windows with
the same metric functions and decides with the same `decide` as the gate stage. Prints, per config and n, how
often the verdict was pass / reject / inconclusive. The weight-space check (exact, no sampling) keeps its value.

Work dirs are the demos' own (`runs/`), so merge and quantize are reused when the demo ran already; nothing is
promoted (output goes to a temporary folder). Writes benchmarks/results/gate_stability.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmerge.scores import EvalReport  # noqa: E402

POOL_SPEC = """# lee news documents no demo stage used: the pool the window draws come from
[source]
path = "package:gensim/test/test_data/lee_background.cor"
format = "text"

[split]
documents = "250:300"
"""
COUNTS = (3, 4, 6, 8, 12, 16, 24, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=[str(REPO / "configs" / "demo.toml"),
                                                     str(REPO / "configs" / "demo-fragile.toml")])
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "gate_stability.json")
    return p.parse_args(argv)


def widened_config(config: Path, tmp: Path, windows: int = 2) -> Path:
    """The demo config with absolute paths, the pool as eval text (all its windows), no extra eval, output in tmp."""
    from qmerge.io.paths import dump_toml, read_toml
    from qmerge.matrix import absolute_paths

    raw = absolute_paths(read_toml(config, "config file"), config.parent)
    (tmp / "pool.toml").write_text(POOL_SPEC)
    raw["gate"].update(eval=str(tmp / "pool.toml"), windows=windows)
    raw["gate"].pop("extra_eval", None)
    raw["output"]["dir"] = str(tmp / "releases")
    out = tmp / config.name
    out.write_text(dump_toml(raw))
    return out


def pool_windows(cfg_path: Path) -> int:
    """Every window the pool (the config's gate.eval) holds at its seq_len, counted with the base's tokenizer."""
    from qmerge.config import load_config
    from qmerge.io.textset import build_windows, load_text_spec
    from qmerge.stages.evaluate import load_tokenizer
    from qmerge.stages.resolve import base_folder

    cfg = load_config(cfg_path)
    folder, _, _ = base_folder(cfg, progress=False)
    spec = load_text_spec(cfg.path(cfg.gate.eval, "gate.eval"))
    return int(build_windows(load_tokenizer(folder), spec, cfg.gate.seq_len, None).ids.shape[0])


def evaluate_report(cfg_path: Path) -> tuple[dict, object]:
    from qmerge.config import load_config
    from qmerge.dag import Options, Runner
    from qmerge.pipeline import STAGES

    cfg = load_config(cfg_path)
    runner = Runner(cfg, STAGES, Options(quiet=True))
    records, code = runner.run()
    rec = next(r for r in records if r.name == "evaluate")
    report = EvalReport.from_json(json.loads((runner.work / "evaluate" / rec.key / "report.json").read_text()))
    print(f"{cfg_path.name}: pipeline exit {code} on all {report.eval.windows} windows", flush=True)
    return report, cfg.gate


def stability(report: dict, gate, counts: tuple[int, ...], draws: int) -> dict[int, Counter]:
    import torch

    from qmerge.stages.gate import decide

    total = report.eval.windows
    out = {}
    for n in (c for c in counts if c <= total):
        seen = Counter()
        for seed in range(draws):
            rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
            seen[decide(report.on_windows(rows), gate).verdict] += 1
        out[n] = seen
    return out


def main(argv: list[str] | None = None) -> int:
    from qmerge.runtime import set_process_defaults, silence_third_party

    set_process_defaults()
    silence_third_party()
    args = parse_args(argv)
    results, lines = {}, []
    with tempfile.TemporaryDirectory(prefix="qmerge-stability-") as tmp:
        for config in map(Path, args.configs):
            windows = pool_windows(widened_config(config.resolve(), Path(tmp)))
            report, gate = evaluate_report(widened_config(config.resolve(), Path(tmp), windows))
            total = report.eval.windows
            table = stability(report, gate, (*COUNTS, total), args.draws)
            full = {"ppl_ratio": dataclasses.asdict(report.final_scores.ppl_ratio),
                    "retention": dataclasses.asdict(report.final_scores.retention)}
            results[config.name] = {"windows_in_pool": total, "final": report.final, "all_windows": full,
                                    "draws": args.draws, "verdicts": {n: dict(c) for n, c in table.items()}}
            for n, c in table.items():
                lines.append(f"| {config.name} ({report.final}) | {n} | "
                             + " | ".join(f"{100 * c[v] / args.draws:.0f} %" for v in ("pass", "reject",
                                                                                       "inconclusive")) + " |")
    print(f"\n{args.draws} draws of n windows without replacement from the pool; verdict frequencies\n")
    print("| config (candidate) | windows | pass | reject | inconclusive |\n|---|---:|---:|---:|---:|")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
