"""Scoring models on token windows: one fixed protocol for every figure in the report.

Protocol: non-overlapping windows of `seq_len` tokens (from `qmerge.io.textset`), next-token NLL of
every position but the first, float32 logits, batches of `batch_size` windows. The reference and the
base are one PEFT model (adapters on / off); candidates are scored batch by batch against the reference, so
only one batch of logits per model exists at a time. The models run layer by layer (`StreamedLogits`); the
whole-model forwards (`whole_model_logits`) are its twin in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from qmerge.errors import BadInputError
from qmerge.layerwise import LayerBatch, LayerwiseModel, run_layer
from qmerge.ops import metrics
from qmerge.scores import CandidateScores, TextScores

Forward = Callable[[torch.Tensor], torch.Tensor]
Logits = Callable[[str, int], torch.Tensor]  # (model name, batch index) -> float32 logits of that batch


@dataclass
class WindowScores:
    """Per-window mean NLL for every model, per-token KL/agreement/p_correct for every candidate."""

    nll: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    kl: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    agree: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    p_ref: list[torch.Tensor] = field(default_factory=list)
    p_cand: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def window_nll(self, name: str) -> torch.Tensor:
        return torch.cat(self.nll[name])


def _forward(model: torch.nn.Module) -> Forward:
    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    return run


def peft_forwards(reference) -> tuple[Forward, Forward]:
    """(reference, base): the same whole PEFT model with its adapters enabled / disabled."""
    ref = _forward(reference)

    def base(ids: torch.Tensor) -> torch.Tensor:
        with reference.disable_adapter():
            return ref(ids)

    return ref, base


def whole_model_logits(forwards: dict[str, Forward], batches: list[torch.Tensor], device: str = "cpu") -> Logits:
    """Logits of whole models, batch by batch (the twin of `StreamedLogits` in tests and benchmarks)."""
    return lambda name, i: forwards[name](batches[i].to(device))


@dataclass(frozen=True)
class View:
    """A model as scored: a layer-wise model, with its overlay's adapters on or off."""

    model: LayerwiseModel
    adapters: bool = True


class StreamedLogits:
    """Every view advances through the decoder together, one layer at a time over all batches: per model only
    the current layer is real, plus every view's hidden states; then each view's final norm + head gives the
    logits of one batch at a time. Views of the same model (reference and base) share its loaded layer."""

    def __init__(self, views: dict[str, View], batches: list[torch.Tensor], quiet: bool = False,
                 desc: str = "evaluate", on_layer=None, ready: dict[str, list[torch.Tensor]] | None = None):
        """`on_layer(model, index, layer)`: called while a model's layer is real, after every view ran it.
        `ready`: views whose last-layer states are already known (qmerge/io/state_cache.py), one tensor per batch;
        a model all of whose views are ready never loads a layer."""
        self.views = views
        models = list({id(v.model): v.model for v in views.values()}.values())
        depth = {len(m.layers) for m in models}
        if len(depth) != 1:
            raise BadInputError(f"the models to compare have different numbers of decoder layers: {sorted(depth)}",
                                fix="every candidate must be the base's architecture")
        for model in models:  # a head or stack the runner cannot rebuild is refused before any layer runs
            model.logit_steps  # noqa: B018
        ready = ready or {}
        self.states = {name: [LayerBatch(h, {}) for h in states] for name, states in ready.items()}
        self.computed = tuple(name for name in views if name not in ready)
        for name in self.computed:
            view = views[name]
            with view.model.adapters(view.adapters):
                self.states[name] = view.model.layer_inputs_of(batches)
        streamed = [m for m in models if any(views[n].model is m for n in self.computed)]
        for index in tqdm(range(depth.pop()), desc=desc, disable=quiet or not streamed, unit="layer"):
            for model in streamed:
                layer = model.load_layer(index)
                for name in self.computed:
                    view = views[name]
                    if view.model is model:
                        with model.adapters(view.adapters):
                            self.states[name] = [b.with_hidden(run_layer(layer, b)) for b in self.states[name]]
                if on_layer is not None:
                    on_layer(model, index, layer)
                model.free_layer(index)
        for model in models:
            model.load_head()
        self.models = models

    def __call__(self, name: str, index: int) -> torch.Tensor:
        view = self.views[name]
        with view.model.adapters(view.adapters):
            return view.model.logits(self.states[name][index].hidden)

    def close(self) -> None:
        for model in self.models:
            model.free_head()
        self.states.clear()


def score(batches: list[torch.Tensor], logits: Logits, others: tuple[str, ...], candidates: tuple[str, ...],
          quiet: bool = True, desc: str = "score", first: int = 0) -> WindowScores:
    """Scores every model on the batches against "reference"; `candidates` (a subset of `others`) also get KL,
    top-1 agreement and p(correct). `first`: the index `logits` knows the first batch by.

    Each model's log-softmax of a batch is taken once and serves its NLL, KL, agreement and p(correct) (the same
    op on the same logits as `metrics.token_nll`, so the same bits); the reference's probabilities and argmax are
    taken once per batch. Every big operation runs over all positions of the contiguous logits, and only its
    per-position results are cut to the positions that have a next token: the rows are computed independently, so
    the bits are those of the cut tensors' own operations (tested), while the cut tensors' strides made the CPU
    kernels 4x slower. A batch's log-probabilities are ~200 MB per model on CPU, and a fresh buffer of that size
    costs its page faults (in a VM with free page reporting sometimes 1.5 s): the four big ones (the reference's
    log-probabilities and probabilities, a candidate's log-probabilities, KL's elementwise terms) are kept from
    batch to batch (`_Scratch`)."""
    out = WindowScores()
    scratch = _Scratch()
    for i, batch in enumerate(tqdm(batches, desc=desc, disable=quiet, unit="batch")):
        ref_logits = logits("reference", first + i).float()
        targets = batch[:, 1:].to(ref_logits.device).unsqueeze(-1)  # gather takes positions 0 … n−2 with them
        ref_logp = torch.log_softmax(ref_logits, dim=-1, out=scratch("ref_logp", ref_logits))  # = token_nll's
        del ref_logits
        ref_target = ref_logp.gather(-1, targets).squeeze(-1)
        out.nll.setdefault("reference", []).append((-ref_target).mean(dim=1).cpu())
        out.p_ref.append(ref_target.exp().cpu())
        ref_p = ref_argmax = terms = None
        for name in others:
            cand_logits = logits(name, first + i).float()
            logp = torch.log_softmax(cand_logits, dim=-1, out=scratch("logp", cand_logits))
            del cand_logits
            target = logp.gather(-1, targets).squeeze(-1)
            out.nll.setdefault(name, []).append((-target).mean(dim=1).cpu())
            if name in candidates:
                if ref_p is None:
                    ref_p = torch.exp(ref_logp, out=scratch("ref_p", ref_logp))
                    ref_argmax, terms = ref_logp.argmax(-1)[:, :-1], scratch("terms", ref_logp)
                torch.sub(ref_logp, logp, out=terms)
                kl = terms.mul_(ref_p).sum(-1)[:, :-1]  # Σ p_ref · (log p_ref − log p_cand)
                out.kl.setdefault(name, []).append(kl.clamp_min(0).cpu())
                out.agree.setdefault(name, []).append((logp.argmax(-1)[:, :-1] == ref_argmax).float().cpu())
                out.p_cand.setdefault(name, []).append(target.exp().cpu())
    return out


class _Scratch:
    """Named buffers kept while the shape they are asked for stays the same (`score`)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (like.shape, like.dtype, like.device):
            self.buffers[name] = None  # the old one goes before the new one is made
            buffer = self.buffers[name] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return buffer


def summarize(scores: WindowScores, candidates: tuple[str, ...], tokens: dict | None = None) -> TextScores:
    """One eval text's section: ppl ± SE of every model, and per candidate KL stats, ppl ratio against the
    reference and delta retention, all with standard errors over windows."""
    nll = {name: scores.window_nll(name) for name in scores.nll}
    per_window = {"nll": {n: [float(x) for x in v] for n, v in nll.items()}, "kl_mean": {}}
    cands = {}
    for name in candidates:
        kl = torch.cat(scores.kl[name])
        per_window["kl_mean"][name] = [float(x) for x in kl.double().mean(dim=1)]  # what kl_summary's mean averages
        agree = torch.cat(scores.agree[name])
        dp = torch.cat(scores.p_cand[name]) - torch.cat(scores.p_ref)
        cands[name] = CandidateScores(metrics.ppl_ratio(nll[name], nll["reference"]),
                                      metrics.delta_retention(nll["base"], nll["reference"], nll[name]),
                                      _floats(metrics.kl_summary(kl, agree, dp)))
    return TextScores(tokens or {}, {n: metrics.perplexity(v) for n, v in nll.items()},
                      {n: metrics.Estimate(float(v.mean()), float(v.std(unbiased=True) / len(v) ** 0.5))
                       for n, v in nll.items()}, cands, per_window)


def _floats(kl: dict) -> dict:
    return {k: v if isinstance(v, metrics.Estimate) else float(v) for k, v in kl.items()}
