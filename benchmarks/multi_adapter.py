"""Which multi-adapter method keeps every task: qmerge's methods (exact float32 ΔW space) against PEFT's
`add_weighted_adapter` with the same settings, on the demo adapters, each task scored on its own text.

    python benchmarks/multi_adapter.py                       # configs/demo-multi.toml, every method below
    python benchmarks/multi_adapter.py --config my-multi.toml

Every candidate is a bf16 dense checkpoint of the NF4 base (as trained) plus a combination of the adapters:
- qmerge: `linear` (Σ ΔWᵢ), `ties`, `dare_linear`, `dare_ties` and `magnitude_prune` at a few densities, each
  computed by qmerge's merge on the exact ΔWᵢ = scaleᵢ·BᵢAᵢ;
- PEFT 0.21: `add_weighted_adapter` on the same float32 NF4 base with the same weights, density and seed, then
  `merge_and_unload` (its `linear`/`ties`/`dare_*`/`magnitude_prune` combine the A and B factors separately, its
  `*_svd` variants combine full ΔWs and truncate back to a rank by SVD).
Each task is then scored like the gate does it, on its own eval text against the NF4 base + that adapter alone
(one streamed pass per task with every candidate as a view), and decided with the config's gate thresholds.
Prints one table per task and writes benchmarks/results/multi_adapter.json. Accuracy, not speed: no timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QMERGE = [("linear", 1.0), ("ties", 0.2), ("ties", 0.5), ("ties", 0.8), ("dare_linear", 0.5), ("dare_ties", 0.5),
          ("magnitude_prune", 0.5)]
PEFT = [("linear", 1.0), ("ties", 0.5), ("dare_ties", 0.5), ("ties_svd", 0.5)]
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo-multi.toml")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "multi_adapter.json")
    return p.parse_args(argv)


def qmerge_candidate(plan, method: str, density: float, out: Path) -> Path:
    from qmerge.merging import Combination, open_inputs, run_merge

    inputs = open_inputs(plan, "nf4", "cpu", Combination(method, density, "total", SEED))
    run_merge(inputs, out, "bfloat16", 5 * 2**30, quiet=True)
    return out


def peft_candidate(plan, method: str, density: float, out: Path, tokenizer_folder: Path) -> Path:
    """PEFT's own combination of the adapters on the float32 NF4 base as trained, merged and stored in bf16."""
    import contextlib
    import shutil

    import torch
    from peft import PeftModel

    from qmerge.merging import open_inputs
    from qmerge.models import base_model_as_trained

    base = open_inputs(plan, "nf4", "cpu").base
    with contextlib.redirect_stdout(sys.stderr):
        model = PeftModel.from_pretrained(base_model_as_trained(base), plan.adapters[0].path, adapter_name="a0")
        for i, a in enumerate(plan.adapters[1:], 1):
            model.load_adapter(a.path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(plan.adapters))]
    weights = [a.weight for a in plan.adapters]
    torch.manual_seed(SEED)  # PEFT's DARE draws its masks from the global generator
    kwargs = {} if method == "linear" else {"density": density}
    model.add_weighted_adapter(names, weights, "combined", combination_type=method, **kwargs)
    model.set_adapter("combined")
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_folder / f).is_file():
            shutil.copyfile(tokenizer_folder / f, out / f)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from qmerge.config import load_config
    from qmerge.numerics import no_tf32
    from qmerge.plan import Plan
    from qmerge.scores import EvalReport
    from qmerge.stages.evaluate import _texts, load_tokenizer, score_pass
    from qmerge.stages.gate import decide
    from qmerge.stages.resolve import resolve

    cfg = load_config(args.config)
    plan = Plan.from_json(resolve(cfg, progress=False).to_json())
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="qmerge-multi-") as tmp:
        tmp = Path(tmp)
        candidates = {}
        for method, density in QMERGE:
            name = f"qmerge {method}" + ("" if method == "linear" else f" d={density}")
            print(f"merging: {name}", file=sys.stderr, flush=True)
            candidates[name] = qmerge_candidate(plan, method, density, tmp / f"q-{method}-{density}")
        for method, density in PEFT:
            name = f"peft {method}" + ("" if method == "linear" else f" d={density}")
            print(f"merging: {name}", file=sys.stderr, flush=True)
            try:
                candidates[name] = peft_candidate(plan, method, density, tmp / f"p-{method}-{density}",
                                                  plan.tokenizer_folder())
            except Exception as e:  # PEFT refuses some settings; the table says so
                rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        ctx = types.SimpleNamespace(cfg=cfg, quiet=False)
        tokenizer = load_tokenizer(candidates["qmerge linear"])
        base = None
        from qmerge.merging import open_inputs

        base = open_inputs(plan, "nf4", "cpu").base
        tasks = {}
        with no_tf32():
            for i, adapter in enumerate(cfg.adapters):
                if adapter.eval is None:
                    continue
                texts = _texts(ctx, tokenizer, [(adapter.eval, f"adapters[{i}].eval")])
                tasks[adapter.task] = score_pass(ctx, [(plan.adapter_weights[i][0], 1.0)], texts, candidates, "cpu",
                                                 base, desc=f"score {adapter.task}")[0]
    report = EvalReport({}, "nf4", "", None, None, (), {}, tasks)
    for name in candidates:
        verdict = decide(report, cfg.gate, tuple(tasks), candidate=name)
        row = {"verdict": verdict.verdict}
        for task, section in tasks.items():
            c = section.candidates[name]
            row[task] = {"ppl": section.ppl[name].value, "ppl_reference": section.ppl["reference"].value,
                         "ppl_base": section.ppl["base"].value,
                         "retention": c.retention.value if c.retention.defined else None,
                         "retention_se": c.retention.stderr if c.retention.defined else None,
                         "kl": c.kl["mean"].value}
        rows[name] = row
    print_table(rows, list(tasks))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": str(args.config), "seed": SEED, "rows": rows}, indent=2) + "\n")
    return 0


def print_table(rows: dict, tasks: list[str]) -> None:
    head = "| method | " + " | ".join(f"{t} ppl | {t} retention | {t} KL" for t in tasks) + " | gate |"
    print(head)
    print("|---" * (2 + 3 * len(tasks)) + "|")
    for name, row in rows.items():
        if "error" in row:
            print(f"| {name} | " + " | ".join("—" for _ in range(3 * len(tasks))) + f" | {row['error']} |")
            continue
        cells = []
        for t in tasks:
            r = row[t]
            ret = "undefined" if r["retention"] is None else f"{r['retention']:.3f} ± {r['retention_se']:.3f}"
            cells += [f"{r['ppl']:.2f}", ret, f"{r['kl']:.4f}"]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['verdict']} |")


if __name__ == "__main__":
    raise SystemExit(main())
