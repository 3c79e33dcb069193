"""evaluate: perplexity and KL of reference, base, merged (and quantized) on the gate's text, plus the
weight-space retention of the dense candidate. Writes report.json; the gate decides on it.

A first release evaluates whole models (they must fit in memory); the reference and the base share
one PEFT model (adapters on / off).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qmerge.dag import StageContext
from qmerge.evaluation import peft_forwards, score, summarize, _forward
from qmerge.io.textset import build_windows, load_text_spec
from qmerge.models import checkpoint_model, reference_model
from qmerge.ops.metrics import weight_retention
from qmerge.stages.merge import merged_tensors, open_inputs

VANISHED = 0.5  # a layer keeping less than half its delta (weight space) is named in the report


def eval_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from qmerge.errors import BadInputError

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BadInputError(f"no usable tokenizer ({type(e).__name__}: {str(e)[:200]})", path=folder,
                            fix="ship the tokenizer files with the base model or the adapter") from None


def _stored_tensors(candidate: Path, quantized: bool):
    """(names, get) of a candidate's stored weights; a GPTQ candidate through qmerge's dequantization."""
    if quantized:
        from qmerge.io.gptq_checkpoint import dequantized_state

        state = dequantized_state(candidate)
        return set(state), state.__getitem__
    from qmerge.io.safetensors_io import CheckpointReader

    reader = CheckpointReader(candidate)
    return set(reader.tensors), reader.get


def dense_weight_retention(plan: dict, into: str, candidates: dict[str, Path]) -> dict[str, dict]:
    """⟨W_cand − W_base, ΔW⟩ / ‖ΔW‖² per changed tensor of every candidate, ΔW = exact float32 merge − W_base,
    streamed over one pass of the exact merge (it re-derives W_nf4, so it is done once for all candidates)."""
    inputs = open_inputs(plan, into, "cpu")
    stored = {name: _stored_tensors(path, name == "quantized") for name, path in candidates.items()}
    layers = {name: {} for name in candidates}
    sums = {name: [0.0, 0.0] for name in candidates}
    for tensor, exact, w_base in merged_tensors(inputs):
        if w_base is None or w_base.shape != exact.shape:
            continue
        delta = exact - w_base
        norm2 = float(delta.double().pow(2).sum())
        if norm2 == 0.0:
            continue
        for name, (available, get) in stored.items():
            if tensor not in available:
                continue
            r = weight_retention(get(tensor).to(torch.float32), w_base, delta)
            layers[name][tensor] = r
            sums[name][0] += r * norm2
            sums[name][1] += norm2
    out = {}
    for name, per_layer in layers.items():
        num, den = sums[name]
        worst = sorted(per_layer.items(), key=lambda kv: kv[1])[:10]
        out[name] = {"aggregate": num / den if den else None, "worst": worst,
                     "vanished": [n for n, r in worst if r < VANISHED], "layers": per_layer}
    return out


def candidate_model(name: str, path: Path, device: str) -> torch.nn.Module:
    """A candidate in float32. The GPTQ checkpoint is scored through qmerge's own dequantization of what it
    stores (exactly what a correct kernel computes, up to the kernel's own arithmetic), so evaluating needs
    no GPTQ kernel package; tests hold transformers+gptqmodel's loading of the same files to it."""
    if name == "quantized":
        from qmerge.io.gptq_checkpoint import load_dequantized

        return load_dequantized(path).to(device).eval()
    return checkpoint_model(path, device)


def evaluate_candidates(ctx: StageContext, candidates: dict[str, Path], into: str) -> dict:
    cfg, plan = ctx.cfg, ctx.results["resolve"]
    device = eval_device()
    inputs = open_inputs(plan, "nf4", "cpu")
    adapters = [(Path(a["path"]), float(a["weight"])) for a in plan["adapters"]]
    reference = reference_model(inputs.base, adapters, device)
    ref_fwd, base_fwd = peft_forwards(reference)
    forwards = {"base": base_fwd}
    models = {name: candidate_model(name, path, device) for name, path in candidates.items()}
    forwards.update({name: _forward(m) for name, m in models.items()})
    tokenizer = load_tokenizer(next(iter(candidates.values())))
    sections = []
    for i, spec_path in enumerate((cfg.gate.eval, *cfg.gate.extra_eval)):
        spec = load_text_spec(cfg.path(spec_path, "gate.eval" if i == 0 else f"gate.extra_eval[{i - 1}]"))
        windows = build_windows(tokenizer, spec, cfg.gate.seq_len, cfg.gate.windows)
        scores = score(windows.ids, ref_fwd, forwards, tuple(candidates), cfg.gate.batch_size, device, ctx.quiet,
                       desc=f"evaluate {Path(spec_path).stem}")
        sections.append({"tokens": {**windows.describe(), "spec": spec_path, "windows": int(windows.ids.shape[0]),
                                    "seq_len": cfg.gate.seq_len},
                         **summarize(scores, tuple(candidates))})
    return {"eval": sections[0], "extra_eval": sections[1:]}


def run_evaluate(ctx: StageContext) -> dict:
    merge_result = ctx.results["merge"]
    into = merge_result["into"]
    candidates = {"merged": ctx.inputs["merge"]}
    if "quantize" in ctx.inputs:
        candidates["quantized"] = ctx.inputs["quantize"]
    final = "quantized" if "quantize" in ctx.inputs else "merged"
    report = {
        "protocol": {"windows": "consecutive non-overlapping, BOS-prefixed when the tokenizer adds one",
                     "seq_len": ctx.cfg.gate.seq_len, "logits": "float32", "kl": "KL(reference || candidate)",
                     "stderr": "over windows; ratios and retention from paired per-window differences",
                     "device": eval_device()},
        "into": into, "final": final, "selection": merge_result.get("selection"),
        **evaluate_candidates(ctx, candidates, into),
        "weight_retention": dense_weight_retention(ctx.results["resolve"], into, candidates),
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    ev = report["eval"]
    return {"final": final, "ppl": {k: v["value"] for k, v in ev["ppl"].items()},
            "retention": ev["candidates"][final]["retention"]["value"],
            "kl_mean": ev["candidates"][final]["kl"]["mean"]["value"]}
