"""The pipeline's stages in order, each with its config slice (what its artifact key hashes)."""

from __future__ import annotations

import json

import torch

from qmerge.config import Config
from qmerge.dag import Stage, StageContext
from qmerge.errors import BadInputError


def pick_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise BadInputError('merge.device = "cuda" but no CUDA device is available', fix='use "auto" or "cpu"')
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _resolve(ctx: StageContext) -> dict:
    from qmerge.stages.resolve import resolve

    return resolve(ctx.cfg, dry_run=ctx.dry_run, progress=not ctx.quiet)


def _merge(ctx: StageContext) -> dict:
    from qmerge.stages.merge import open_inputs, run_merge

    plan = ctx.results["resolve"]
    into = ctx.cfg.merge.into
    if into == "auto" and plan["base"]["prequantized"]:
        into = "nf4"  # a pre-quantized base has no original weights to try
    if into == "auto":
        from qmerge.stages.select import merge_and_select

        return merge_and_select(ctx, plan)
    inputs = open_inputs(plan, into, pick_device(ctx.cfg.merge.device))
    report = run_merge(inputs, ctx.out, ctx.cfg.merge.dtype, ctx.cfg.merge.max_shard_size, ctx.quiet)
    (ctx.out / "merge_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return {k: v for k, v in report.items() if k != "layers"}


def text_digest(cfg: Config, value: str, what: str) -> dict:
    """A text spec as its artifact keys see it: the spec's bytes and its source's bytes, so that editing
    `split.documents` or the text itself never reuses windows built from the old ones."""
    from qmerge.io.paths import sha256_file
    from qmerge.io.textset import load_text_spec

    spec = load_text_spec(cfg.path(value, what))
    return {"spec": value, "spec_sha256": sha256_file(spec.spec_path), "source_sha256": sha256_file(spec.source_path)}


def _eval_texts(cfg: Config) -> dict | None:
    if cfg.gate is None:
        return None
    return {"eval": text_digest(cfg, cfg.gate.eval, "gate.eval"),
            "extra_eval": [text_digest(cfg, v, f"gate.extra_eval[{i}]") for i, v in enumerate(cfg.gate.extra_eval)]}


def _merge_slice(cfg: Config) -> dict:
    out = cfg.merge.model_dump(exclude={"device"})
    if cfg.merge.into == "auto":  # the choice is scored on `select` windows of gate.seq_len, disjoint from gate.eval
        out["select_text"] = text_digest(cfg, cfg.merge.select, "merge.select")
        out["gate"] = {"seq_len": cfg.gate.seq_len if cfg.gate else None, "texts": _eval_texts(cfg)}
    return out


def _calibrate_slice(cfg: Config) -> dict:
    q = cfg.quantize
    return {**q.model_dump(include={"calibration", "samples", "seq_len"}),
            "text": text_digest(cfg, q.calibration, "quantize.calibration"), "eval_texts": _eval_texts(cfg)}


def _evaluate_slice(cfg: Config) -> dict:
    return {**cfg.gate.model_dump(exclude={"max_ppl_increase", "min_delta_retention", "max_kl"}),
            "texts": _eval_texts(cfg)}


def _calibrate(ctx: StageContext) -> dict:
    from qmerge.stages.calibrate import run_calibrate

    return run_calibrate(ctx)


def _quantize(ctx: StageContext) -> dict:
    from qmerge.stages.quantize import run_quantize

    return run_quantize(ctx)


def _evaluate(ctx: StageContext) -> dict:
    from qmerge.stages.evaluate import run_evaluate

    return run_evaluate(ctx)


def _gate(ctx: StageContext) -> dict:
    from qmerge.stages.gate import run_gate

    return run_gate(ctx)


def _promote(ctx: StageContext) -> dict:
    from qmerge.stages.promote import run_promote

    return run_promote(ctx)


def _gate_slice(cfg: Config) -> dict | None:
    return cfg.gate.model_dump() if cfg.gate else None


STAGES = [
    Stage("resolve", (), lambda cfg: {"base": cfg.base.model_dump(), "adapters": [a.model_dump() for a in cfg.adapters]},
          _resolve, keyed_by_result=True),
    Stage("merge", ("resolve",), _merge_slice, _merge),
    Stage("calibrate", ("resolve",), _calibrate_slice, _calibrate, enabled=lambda cfg: cfg.quantize is not None),
    Stage("quantize", ("merge", "calibrate"), lambda cfg: cfg.quantize.model_dump(), _quantize,
          enabled=lambda cfg: cfg.quantize is not None),
    Stage("evaluate", ("resolve", "merge", "quantize"), _evaluate_slice, _evaluate,
          enabled=lambda cfg: cfg.gate is not None),
    Stage("gate", ("evaluate",), _gate_slice, _gate, enabled=lambda cfg: cfg.gate is not None),
    Stage("promote", ("resolve", "merge", "calibrate", "quantize", "gate"), lambda cfg: cfg.output.model_dump() | {"name": cfg.name}, _promote,
          enabled=lambda cfg: cfg.gate is not None, cached=False),
]
