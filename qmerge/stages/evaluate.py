"""evaluate: perplexity and KL of reference, base, merged (and quantized) on the gate's text, plus the
weight-space retention of every candidate. Writes report.json; the gate decides on it.

Every model runs layer by layer (qmerge/evaluation.py `StreamedLogits`): the reference and the base are the
NF4 base as trained with PEFT's LoRA layers on / off, re-derived layer by layer from the base shards; the
candidates are read from their written checkpoints (the GPTQ one dequantized tensor by tensor). Memory is one
decoder layer per model plus every window's hidden states, never a whole model. All eval texts share one
pass through the layers.

A quantized artifact with a compensation adapter is scored as served (GPTQ weights + the adapter through PEFT's
LoRA layers), and once more without it as "quantized-alone" (reported, never shipped or gated): the same loaded
layers, the adapter switched off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qmerge.dag import StageContext
from qmerge.errors import BadInputError
from qmerge.evaluation import StreamedLogits, View, score, summarize
from qmerge.scores import EvalReport, TextScores
from qmerge.io.compensation import compensation_folder
from qmerge.io.paths import sha256_file
from qmerge.io.state_cache import StateCache, batches_digest
from qmerge.io.sources import artifact_bytes, tensor_source
from qmerge.io.textset import build_windows, load_text_spec
from qmerge.layerwise import LayerwiseModel
from qmerge.io.base import BaseCheckpoint
from qmerge.merging import LINEAR, Combination, adapter_deltas, merge_one, open_inputs, output_names
from qmerge.models import streamed_base
from qmerge.numerics import MATH_DTYPE, no_tf32
from qmerge.plan import Plan
from qmerge.ops.metrics import delta_metrics, projection_sums
from qmerge.runtime import pick_device
from qmerge.io.atomic import write_json

log = logging.getLogger("qmerge")
VANISHED = 0.5  # a layer keeping less than half its delta (weight space) is named in the report
ALONE = "quantized-alone"  # the quantized artifact without its compensation adapter


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BadInputError(f"no usable tokenizer ({type(e).__name__}: {str(e)[:200]})", path=folder,
                            fix="ship the tokenizer files with the base model or the adapter") from None


class WeightRetention:
    """⟨W_cand − W_base, ΔW⟩ / ‖ΔW‖² per changed tensor of every candidate, ΔW = exact float32 merge − W_base; and for
    each task (an adapter with its own eval text), its own ΔWᵢ = scaleᵢ·BᵢAᵢ in place of ΔW.

    Fed during the streamed pass: `add_layer` takes each decoder layer's tensors with the W_nf4 the reference's
    layer already holds (so W_nf4 is derived once per evaluation, not twice); `finish` does every tensor not seen
    yet (embeddings, head) by re-deriving it, and reports. `finish` alone is the whole computation (the twin)."""

    def __init__(self, plan: Plan, candidates: dict[str, Path], nf4_device: str = "cpu",
                 combination: Combination = LINEAR, tasks: dict[int, str] | None = None, into: str = "nf4"):
        # W_base is the base the merge added ΔW to (`into`): W_nf4, or the original weights
        self.inputs = open_inputs(plan, into, nf4_device, combination)
        # each candidate's stored weights, read back from its written files (qmerge/io/sources.py)
        self.stored = {name: tensor_source(path, compensation=name != ALONE) for name, path in candidates.items()}
        self.names = output_names(self.inputs)
        self.replaced = {t for adapter, _ in self.inputs.adapters for t in adapter.replacements}
        self.tasks = tasks or {}
        self.seen: set[str] = set()
        self.layers: dict[str, dict[str, float]] = {name: {} for name in candidates}
        # per tensor (r·‖ΔW‖², ‖ΔW‖²), and each task's projection sums: added up in `names` order by `finish`,
        # whatever order the tensors came in (layer by layer while streaming, name order from cached states)
        self.parts: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in candidates}
        self.task_parts = {name: {task: {} for task in self.tasks.values()} for name in candidates}

    def add(self, tensor: str, w_nf4=None) -> None:
        self.seen.add(tensor)
        exact, w_base = merge_one(self.inputs, tensor, w_nf4)
        if w_base is None or w_base.shape != exact.shape:
            return
        own = [(self.tasks[i], d) for i, d in adapter_deltas(self.inputs, tensor)[0] if i in self.tasks] \
            if self.tasks else []
        for name, source in self.stored.items():
            if tensor not in source.names:
                continue
            stored = source.get(tensor)
            # chunked float64 sums (ops/metrics.py; twin of weight_retention): no whole-tensor float64 copies
            metrics = delta_metrics(stored, exact, w_base)
            for task, delta in own:
                self.task_parts[name][task][tensor] = projection_sums(stored, w_base, delta)
            if metrics is None:  # ΔW = 0 for this tensor
                continue
            r, _, norm2 = metrics
            self.layers[name][tensor] = r
            self.parts[name][tensor] = (r * norm2, norm2)

    def add_layer(self, model: LayerwiseModel, index: int, layer: torch.nn.Module) -> None:
        """Layer `index` of the reference, real right now: its base weights are W_nf4 (replaced tensors aside)."""
        held = {}
        for pname, p in layer.named_parameters(prefix=model.layer_prefix(index)):
            source = model.source_name(pname)
            if source is not None and source not in self.replaced:
                held[source] = p.detach()
        prefix = model.base_layer_prefix(index) + "."

        def w_nf4(name: str) -> torch.Tensor:
            if name in held:
                return held[name].to(device="cpu", dtype=MATH_DTYPE)
            return self.inputs.base.as_trained(name, self.inputs.device)

        for tensor in self.names:
            if tensor.startswith(prefix):
                self.add(tensor, w_nf4)

    def finish(self) -> dict[str, dict]:
        for tensor in self.names:
            if tensor not in self.seen:
                self.add(tensor)

        def ratio(parts: dict[str, tuple[float, float]]) -> float | None:
            num = den = 0.0
            for tensor in self.names:
                if tensor in parts:
                    num, den = num + parts[tensor][0], den + parts[tensor][1]
            return num / den if den else None

        out = {}
        for name, per_layer in self.layers.items():
            per_layer = {t: per_layer[t] for t in self.names if t in per_layer}
            worst = sorted(per_layer.items(), key=lambda kv: kv[1])[:10]
            out[name] = {"aggregate": ratio(self.parts[name]), "worst": worst,
                         "vanished": [n for n, r in worst if r < VANISHED], "layers": per_layer}
            if self.tasks:
                out[name]["tasks"] = {task: ratio(parts) for task, parts in self.task_parts[name].items()}
        return out


def _texts(ctx: StageContext, tokenizer, specs: list[tuple[str, str]]) -> list:
    cfg = ctx.cfg
    texts = []
    for spec_path, what in specs:
        windows = build_windows(tokenizer, load_text_spec(cfg.path(spec_path, what)), cfg.gate.seq_len, cfg.gate.windows)
        texts.append((spec_path, windows, list(torch.split(windows.ids, cfg.gate.batch_size))))
    return texts


def model_identities(ctx: StageContext, adapters: list[tuple[Path, float]], candidates: dict[str, Path],
                     nf4_device: str) -> dict[str, tuple[dict, bool]]:
    """Each view's (identity, adapters on) as the hidden-state cache keys it (qmerge/io/state_cache.py). The
    reference is the base files + the NF4 recipe + `adapters` (their files' sha256 and weights); the base is the
    same with its adapters off, and leaves the adapters out unless one replaces whole tensors (then "adapters
    off" still holds that adapter's embedding or head shapes). A candidate is its stage key plus the sha256 of
    its stage's done.json (a rebuilt artifact is a new identity); one whose done.json cannot be read has no
    identity and is left out (not cached)."""
    plan = ctx.plan
    sha = {Path(a.path): a.sha256 for a in plan.adapters}
    replaces = any(a.replaced_tensors for a in plan.adapters)
    nf4 = {"base": plan.base.sha256, "nf4": plan.nf4, "quantized": list(plan.quantized_modules),
           "skipped": list(plan.skipped_modules), "tied": plan.tied, "nf4_device": nf4_device}
    used = [[sha[Path(path)], float(weight)] for path, weight in adapters]
    out = {"reference": ({**nf4, "adapters": used}, True),
           "base": ({**nf4, "adapters": used if replaces else []}, False)}
    stages = {"merged": "merge", "quantized": "quantize", ALONE: "quantize"}
    for name, path in candidates.items():
        stage = stages.get(name, "export")
        try:
            done = sha256_file(ctx.inputs[stage] / "done.json")
        except OSError:
            continue
        out[name] = ({"stage": stage, "key": ctx.keys[stage], "done": done,
                      "artifact": name if stage == "export" else None}, name != ALONE)
    return out


def score_pass(ctx: StageContext, adapters: list[tuple[Path, float]], texts: list, candidates: dict[str, Path],
               device: str, base: BaseCheckpoint, on_layer=None, desc: str = "evaluate",
               cache: StateCache | None = None, reused: dict | None = None) -> list[TextScores]:
    """One streamed pass: the reference (the NF4 base + `adapters`, unmerged), the base, and every candidate on
    `texts`; one TextScores per text. With `cache`, views whose last-layer states it holds are not streamed, and
    the states computed here are added to it; `reused` collects {view: "reused" | "computed"}."""
    nf4_device = pick_device(ctx.cfg.merge.device)
    # W_nf4 from the codes of the device the merge used (one rule for the run; CPU and CUDA codes may differ).
    reference = streamed_base(base, adapters, device, nf4_device)
    views = {"reference": View(reference), "base": View(reference, adapters=False)}
    for name, path in candidates.items():
        if name == ALONE:  # the quantized model's own layers, its compensation adapter off
            views[name] = View(views["quantized"].model, adapters=False)
        else:
            views[name] = View(LayerwiseModel.from_folder(path, device))
    batches = [b for *_, text_batches in texts for b in text_batches]
    keys, ready = {}, {}
    if cache is not None:
        ids = batches_digest(batches)
        for name, (identity, on) in model_identities(ctx, adapters, candidates, nf4_device).items():
            keys[name] = cache.key(identity, on, ids, device)
            states = cache.load(keys[name][0], batches, device)
            if states is not None:
                ready[name] = states
    hook = (lambda model, i, layer: on_layer(model, i, layer) if model is reference else None) if on_layer else None
    logits = StreamedLogits(views, batches, ctx.quiet, desc=desc, on_layer=hook, ready=ready)
    for name in logits.computed:
        if name in keys:
            cache.save(keys[name][0], [b.hidden for b in logits.states[name]], keys[name][1])
    if reused is not None:
        reused.update({name: "reused" if name in ready else "computed" for name in views})
    if ready:
        log.info("%s: last-layer states of %s reused from %s", desc, ", ".join(ready), cache.root)
    sections, first = [], 0
    others = tuple(n for n in views if n != "reference")
    for spec_path, windows, text_batches in texts:
        scores = score(text_batches, logits, others, tuple(candidates), first=first)
        first += len(text_batches)
        sections.append(summarize(scores, tuple(candidates), {**windows.describe(), "spec": spec_path,
                                                              "windows": int(windows.ids.shape[0]),
                                                              "seq_len": ctx.cfg.gate.seq_len}))
    logits.close()
    return sections


def state_cache(ctx: StageContext) -> StateCache:
    """The work dir's hidden-state cache (qmerge/io/state_cache.py); a forced evaluate reads none of it."""
    return StateCache(ctx.cfg.output_path(ctx.cfg.work_dir) / "states", refresh=ctx.forced)


def evaluate_candidates(ctx: StageContext, candidates: dict[str, Path], device: str, retention: WeightRetention,
                        cache: StateCache, reused: dict) -> tuple[list[TextScores], dict[str, TextScores]]:
    """(sections on gate.eval and gate.extra_eval against the reference of all adapters, {task: its section against
    the NF4 base + that adapter alone}). All texts of one reference share one pass through the layers. `reused`
    collects, per pass, which views came from `cache`."""
    cfg, plan = ctx.cfg, ctx.plan
    tokenizer = load_tokenizer(next(iter(candidates.values())))
    base = retention.inputs.base
    hook = retention.add_layer
    sections = []
    shared = [(v, w) for v, w in cfg.eval_texts() if w.startswith("gate.")]
    if shared:
        sections = score_pass(ctx, plan.adapter_weights, _texts(ctx, tokenizer, shared), candidates, device, base,
                              hook, cache=cache, reused=reused.setdefault("gate", {}))
        hook = None
    tasks = {}
    for adapter in cfg.tasks:
        i = cfg.adapters.index(adapter)
        texts = _texts(ctx, tokenizer, [(adapter.eval, f"adapters[{i}].eval")])
        tasks[adapter.task] = score_pass(ctx, [(plan.adapter_weights[i][0], 1.0)], texts, candidates, device, base,
                                         hook, desc=f"evaluate {adapter.task}", cache=cache,
                                         reused=reused.setdefault(adapter.task, {}))[0]
        hook = None
    return sections, tasks


def run_evaluate(ctx: StageContext) -> dict:
    merge_result = ctx.results["merge"]
    candidates = {"merged": ctx.inputs["merge"]}
    if "quantize" in ctx.inputs:
        candidates["quantized"] = ctx.inputs["quantize"]
        if compensation_folder(ctx.inputs["quantize"]) is not None:
            candidates[ALONE] = ctx.inputs["quantize"]
    candidates |= {artifact: ctx.inputs["export"] / artifact for artifact in ctx.cfg.exports}
    shipped = ctx.cfg.artifacts
    final = shipped[0]
    device = pick_device("auto")  # where the layers run; float32 (TF32 off) on either
    cfg = ctx.cfg
    retention = WeightRetention(ctx.plan, candidates, pick_device(cfg.merge.device), Combination.of(cfg.merge),
                                {cfg.adapters.index(a): a.task for a in cfg.tasks}, into=merge_result["into"])
    reused: dict[str, dict] = {}
    with no_tf32():
        sections, tasks = evaluate_candidates(ctx, candidates, device, retention, state_cache(ctx), reused)
    report = EvalReport(
        protocol={"windows": "consecutive non-overlapping, BOS-prefixed when the tokenizer adds one",
                  "seq_len": ctx.cfg.gate.seq_len, "logits": "float32", "kl": "KL(reference || candidate)",
                  "stderr": "over windows; ratios and retention from paired per-window differences",
                  "device": device, "models": "streamed one decoder layer at a time",
                  "quantized_weights": "fp16 s*(q-z), as the serving kernels compute them",
                  **({"compensation": "the quantized artifact's compensation adapter through PEFT's LoRA layers "
                                      f"on its dequantized weights; '{ALONE}' without it"}
                     if ALONE in candidates else {}),
                  "artifacts": "read back from the written files by a reader that is not the writer: GGUF by gguf's "
                               "dequantizer, compressed-tensors by its own decompressor"},
        into=merge_result["into"], final=final, selection=merge_result.get("selection"),
        eval=sections[0] if cfg.gate.eval is not None else None,
        extra_eval=tuple(sections[1:] if cfg.gate.eval is not None else sections),
        weight_retention=retention.finish(), tasks=tasks, shipped=tuple(shipped),
        combination=merge_result.get("combination"))
    write_json(ctx.out / "report.json", report.to_json())
    out = {"final": final, "bytes": {name: artifact_bytes(path, compensation=name != ALONE)
                                     for name, path in candidates.items()}, "states": reused}
    if report.eval is not None:
        scores = report.final_scores
        out |= {"ppl": {k: v.value for k, v in report.eval.ppl.items()}, "retention": scores.retention.value,
                "kl_mean": scores.kl["mean"].value,
                # each artifact's, for whoever reports the one the release ships (the first that passes the gate)
                "artifacts": {a: {"retention": report.eval.candidates[a].retention.value,
                                  "kl_mean": report.eval.candidates[a].kl["mean"].value} for a in shipped}}
    for task, section in tasks.items():
        c = section.candidates[final]
        out.setdefault("tasks", {})[task] = {"ppl": section.ppl[final].value, "retention": c.retention.value,
                                             "kl_mean": c.kl["mean"].value}
    return out
