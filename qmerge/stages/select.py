"""merge.into = "auto": merge into both the NF4 weights (as trained) and the original weights, score
both on the `merge.select` split (never the gate's eval split) and pass on the one with lower NLL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qmerge.dag import StageContext
from qmerge.evaluation import _forward, peft_forwards, score
from qmerge.io.textset import build_windows, check_disjoint, load_text_spec
from qmerge.models import checkpoint_model, reference_model
from qmerge.stages.merge import open_inputs, run_merge


def _select_spec(ctx: StageContext):
    cfg = ctx.cfg
    spec = load_text_spec(cfg.path(cfg.merge.select, "merge.select"))
    if cfg.gate is not None:
        # Choosing on the gate's own text would bias the gate in favour of the chosen candidate.
        check_disjoint(spec, load_text_spec(cfg.path(cfg.gate.eval, "gate.eval")), "merge.select", "gate.eval")
    return spec


def merge_and_select(ctx: StageContext, plan: dict) -> dict:
    from transformers import AutoTokenizer

    from qmerge.pipeline import pick_device

    spec = _select_spec(ctx)
    device = pick_device(ctx.cfg.merge.device)
    reports = {}
    for into in ("nf4", "original"):
        out = ctx.out / "candidates" / into
        out.mkdir(parents=True)
        reports[into] = run_merge(open_inputs(plan, into, device), out, ctx.cfg.merge.dtype,
                                  ctx.cfg.merge.max_shard_size, ctx.quiet)
    tokenizer = AutoTokenizer.from_pretrained(ctx.out / "candidates" / "nf4")
    windows = build_windows(tokenizer, spec, ctx.cfg.gate.seq_len if ctx.cfg.gate else 256,
                            ctx.cfg.merge.select_windows)
    inputs = open_inputs(plan, "nf4", "cpu")
    adapters = [(Path(a["path"]), float(a["weight"])) for a in plan["adapters"]]
    ref_fwd, _ = peft_forwards(reference_model(inputs.base, adapters))
    forwards = {into: _forward(checkpoint_model(ctx.out / "candidates" / into)) for into in reports}
    scores = score(windows.ids, ref_fwd, forwards, (), quiet=ctx.quiet, desc="select")
    nll = {into: float(scores.window_nll(into).mean()) for into in reports}
    winner = min(nll, key=nll.get)
    for f in (ctx.out / "candidates" / winner).iterdir():
        shutil.copyfile(f, ctx.out / f.name)
    report = {**reports[winner], "selection": {"spec": ctx.cfg.merge.select, "tokens_sha256": windows.sha256,
                                              "mean_nll": nll, "reference_nll": float(scores.window_nll("reference").mean()),
                                              "chosen": winner}}
    shutil.rmtree(ctx.out / "candidates")
    (ctx.out / "merge_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return {k: v for k, v in report.items() if k != "layers"}
