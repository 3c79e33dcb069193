"""merge: the exact float32 merge (qmerge/merging.py) into the weights `merge.into` names, written as a dense
HF checkpoint with `merge_report.json`.

`into = "auto"` merges into both the NF4 weights (as trained) and the original weights, scores both against
the reference on the `merge.select` split (never the gate's eval split), layer by layer like evaluate, and
passes on the one with the lower NLL.
"""

from __future__ import annotations

import shutil

from qmerge.config import Config
from qmerge.dag import StageContext
from qmerge.evaluation import StreamedLogits, View, score
from qmerge.io.textset import build_windows, check_disjoint, load_text_spec
from qmerge.layerwise import LayerwiseModel
from qmerge.merging import Combination, open_inputs, run_merge
from qmerge.models import streamed_base
from qmerge.plan import Plan
from qmerge.runtime import pick_device
from qmerge.io.atomic import write_json


def run_merge_stage(ctx: StageContext) -> dict:
    plan = ctx.plan
    into = ctx.cfg.merge.into
    if into == "auto" and plan.base.prequantized:
        into = "nf4"  # a pre-quantized base has no original weights to try
    if into == "auto":
        report = _merge_and_select(ctx, plan)
    else:
        inputs = open_inputs(plan, into, pick_device(ctx.cfg.merge.device), Combination.of(ctx.cfg.merge))
        report = run_merge(inputs, ctx.out, ctx.cfg.merge.dtype, ctx.cfg.merge.max_shard_size, ctx.quiet)
    write_json(ctx.out / "merge_report.json", report)
    return {k: v for k, v in report.items() if k != "layers"}


def select_windows(cfg: Config, tokenizer):
    """The `merge.select` windows `into = "auto"` chooses on (resolve checks them too, to fail before the merges)."""
    spec = load_text_spec(cfg.path(cfg.merge.select, "merge.select"))
    for other, what in cfg.eval_texts():
        # Choosing on the gate's own text would bias the gate in favour of the chosen candidate.
        check_disjoint(spec, load_text_spec(cfg.path(other, what)), "merge.select", what)
    return build_windows(tokenizer, spec, cfg.select_window_shape[0], cfg.merge.select_windows)


def _merge_and_select(ctx: StageContext, plan: Plan) -> dict:
    import torch
    from transformers import AutoTokenizer

    device = pick_device(ctx.cfg.merge.device)
    reports, folders = {}, {}
    for into in ("nf4", "original"):
        folders[into] = ctx.out / "candidates" / into
        folders[into].mkdir(parents=True)
        reports[into] = run_merge(open_inputs(plan, into, device, Combination.of(ctx.cfg.merge)), folders[into], ctx.cfg.merge.dtype,
                                  ctx.cfg.merge.max_shard_size, ctx.quiet)
    tokenizer = AutoTokenizer.from_pretrained(folders["nf4"])
    windows = select_windows(ctx.cfg, tokenizer)
    batches = list(torch.split(windows.ids, ctx.cfg.select_window_shape[1]))
    reference = streamed_base(open_inputs(plan, "nf4", "cpu").base, plan.adapter_weights, device, device)
    views = {"reference": View(reference)}
    views |= {into: View(LayerwiseModel.from_folder(folder, device)) for into, folder in folders.items()}
    logits = StreamedLogits(views, batches, ctx.quiet, desc="select")
    scores = score(batches, logits, tuple(folders), ())
    logits.close()
    nll = {into: float(scores.window_nll(into).mean()) for into in reports}
    winner = min(nll, key=nll.get)
    for f in folders[winner].iterdir():
        shutil.move(f, ctx.out / f.name)
    shutil.rmtree(ctx.out / "candidates")
    return {**reports[winner], "selection": {"spec": ctx.cfg.merge.select, "tokens_sha256": windows.sha256,
                                             "mean_nll": nll, "reference_nll": float(scores.window_nll("reference").mean()),
                                             "chosen": winner}}
