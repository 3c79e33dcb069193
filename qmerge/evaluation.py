"""Scoring models on token windows: one fixed protocol for every figure in the report.

Protocol: non-overlapping windows of `seq_len` tokens (from `qmerge.io.textset`), next-token NLL of
every position but the first, float32 logits, batches of `batch_size` windows. The reference and the
base are one PEFT model (adapter on / off); candidates are scored window batch by window batch against
the reference so only one batch of logits per model exists at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from qmerge.ops import metrics

Forward = Callable[[torch.Tensor], torch.Tensor]


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
    """(reference, base): the same PEFT model with its adapters enabled / disabled."""
    ref = _forward(reference)

    def base(ids: torch.Tensor) -> torch.Tensor:
        with reference.disable_adapter():
            return ref(ids)

    return ref, base


def score(ids: torch.Tensor, reference: Forward, others: dict[str, Forward], candidates: tuple[str, ...],
          batch_size: int = 4, device: str = "cpu", quiet: bool = False, desc: str = "evaluate") -> WindowScores:
    """Runs every model over the windows; `candidates` (a subset of `others`) are compared with the reference."""
    out = WindowScores()
    batches = list(torch.split(ids, batch_size))
    for batch in tqdm(batches, desc=desc, disable=quiet, unit="batch"):
        batch = batch.to(device)
        targets = batch[:, 1:]
        ref_logits = reference(batch)
        out.nll.setdefault("reference", []).append(metrics.token_nll(ref_logits, batch).mean(dim=1).cpu())
        ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
        out.p_ref.append(ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp().cpu())
        for name, forward in others.items():
            logits = forward(batch)
            out.nll.setdefault(name, []).append(metrics.token_nll(logits, batch).mean(dim=1).cpu())
            if name in candidates:
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                out.kl.setdefault(name, []).append(kl.clamp_min(0).cpu())
                out.agree.setdefault(name, []).append((logp.argmax(-1) == ref_logp.argmax(-1)).float().cpu())
                out.p_cand.setdefault(name, []).append(logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp().cpu())
            del logits
        del ref_logits, ref_logp
    return out


def summarize(scores: WindowScores, candidates: tuple[str, ...]) -> dict:
    """Report section for one eval set: ppl ± SE of every model, and per candidate KL stats, ppl ratio
    against the reference and delta retention, all with standard errors over windows."""
    nll = {name: scores.window_nll(name) for name in scores.nll}
    section = {"ppl": {n: _est(metrics.perplexity(v)) for n, v in nll.items()},
               "nll": {n: {"value": float(v.mean()), "stderr": float(v.std(unbiased=True) / len(v) ** 0.5)}
                       for n, v in nll.items()},
               "candidates": {}}
    for name in candidates:
        kl = torch.cat(scores.kl[name])
        agree = torch.cat(scores.agree[name])
        dp = torch.cat(scores.p_cand[name]) - torch.cat(scores.p_ref)
        ret = metrics.delta_retention(nll["base"], nll["reference"], nll[name])
        section["candidates"][name] = {
            "kl": _jsonable(metrics.kl_summary(kl, agree, dp)),
            "ppl_ratio": _est(metrics.ppl_ratio(nll[name], nll["reference"])),
            "retention": {"value": ret.value, "stderr": ret.stderr, "defined": ret.defined, "reason": ret.reason},
        }
    return section


def _est(e) -> dict:
    return {"value": float(e.value), "stderr": float(e.stderr)}


def _jsonable(obj):
    if hasattr(obj, "value") and hasattr(obj, "stderr"):
        return _est(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return float(obj)
    return obj
