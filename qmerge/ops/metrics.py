"""Evaluation metrics as pure functions. Reductions in float64; standard errors over *windows*
(tokens within a window are correlated), ratios and retention from paired per-window differences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float


@dataclass(frozen=True)
class Retention:
    value: float | None
    stderr: float | None
    defined: bool
    reason: str | None = None


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL [B, T-1] of `ids` [B, T] under `logits` [B, T, V], log_softmax in float32."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def mean_se(x: torch.Tensor) -> Estimate:
    x = x.double().reshape(-1)
    se = float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return Estimate(float(x.mean()), se)


def perplexity(window_nll: torch.Tensor) -> Estimate:
    """exp(mean NLL); SE by the delta method on the per-window means."""
    m = mean_se(window_nll)
    ppl = math.exp(m.value)
    return Estimate(ppl, ppl * m.stderr)


def ppl_ratio(window_nll_cand: torch.Tensor, window_nll_ref: torch.Tensor) -> Estimate:
    """ppl_cand / ppl_ref = exp(mean paired difference); SE by the delta method."""
    d = mean_se(window_nll_cand.double() - window_nll_ref.double())
    r = math.exp(d.value)
    return Estimate(r, r * d.stderr)


def delta_retention(nll_base: torch.Tensor, nll_ref: torch.Tensor, nll_cand: torch.Tensor,
                    min_effect_se: float = 2.0) -> Retention:
    """(nll_base − nll_cand) / (nll_base − nll_ref): 1 = the adapter's whole effect kept, 0 = plain base.
    Undefined when the adapter's own effect is within `min_effect_se` standard errors of zero or negative."""
    effect_w = nll_base.double() - nll_ref.double()
    kept_w = nll_base.double() - nll_cand.double()
    effect = mean_se(effect_w)
    if effect.value <= 0:
        return Retention(None, None, False, f"the adapter makes this text worse (Δnll {effect.value:+.4f})")
    if effect.value < min_effect_se * effect.stderr:
        return Retention(None, None, False, f"the adapter's effect ({effect.value:.4f} ± {effect.stderr:.4f} nats) "
                                            "is within eval noise")
    kept = float(kept_w.mean())
    r = kept / effect.value
    # Delta method for a ratio of paired means: var(r) ≈ var(kept − r·effect) / (n · effect²).
    resid = kept_w - r * effect_w
    n = len(resid)
    se = float(resid.std(unbiased=True) / math.sqrt(n) / effect.value) if n > 1 else float("nan")
    return Retention(r, se, True, None)


def kl_summary(token_kl: torch.Tensor, agree: torch.Tensor, dp: torch.Tensor) -> dict:
    """The statistics llama.cpp `perplexity --kl-divergence` prints, with SEs over windows.
    Inputs are [W, T-1]: per-token KL(ref ‖ cand), top-1 agreement (0/1), p_cand − p_ref of the target."""
    flat = token_kl.double().reshape(-1)
    ordered = flat.sort().values
    return {
        "mean": mean_se(token_kl.double().mean(dim=1)),
        "median": float(flat.median()),
        "p99": quantile(ordered, 0.99),
        "p999": quantile(ordered, 0.999),
        "max": float(flat.max()),
        "top1_agreement": mean_se(agree.double().mean(dim=1)),
        "mean_dp_correct": mean_se(dp.double().mean(dim=1)),
    }


def quantile(ordered: torch.Tensor, q: float) -> float:
    """`torch.quantile(x, q)` (linear interpolation between order statistics) of the sorted 1-D `ordered`, for any
    size: torch.quantile refuses inputs above 2^24 elements, which a large eval reaches."""
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def weight_retention(w_stored: torch.Tensor, w_base: torch.Tensor, delta: torch.Tensor) -> float:
    """⟨W_stored − W_base, ΔW⟩ / ‖ΔW‖² (float64); nan when ΔW = 0."""
    d = delta.double()
    denom = float((d * d).sum())
    if denom == 0.0:
        return float("nan")
    return float(((w_stored.double() - w_base.double()) * d).sum()) / denom


def relative_delta_norm(delta: torch.Tensor, w_base: torch.Tensor) -> float:
    """‖ΔW‖ / ‖W‖ (0 when W = 0)."""
    base = float(w_base.double().norm())
    return float(delta.double().norm()) / base if base else 0.0


def delta_metrics(w_stored: torch.Tensor, merged: torch.Tensor, w_base: torch.Tensor,
                  chunk: int = 1 << 20) -> tuple[float, float, float] | None:
    """(`weight_retention`, `relative_delta_norm`, ‖ΔW‖²) with ΔW = merged − W_base (float32, as the merge computed
    it), or None when ΔW is all zero: streamed over `chunk` elements at a time, so that the float64
    temporaries stay small (the slow twins above convert whole tensors). Same sums, other order: agrees
    with them to float64 rounding (tests: 1e-12 relative)."""
    stored, new, base = (t.reshape(-1) for t in (w_stored, merged, w_base))
    dd = sd = bb = 0.0
    for i in range(0, new.numel(), chunk):
        b = base[i:i + chunk]
        d = (new[i:i + chunk] - b).double()
        b = b.double()
        dd += float(torch.dot(d, d))
        sd += float(torch.dot(stored[i:i + chunk].double() - b, d))
        bb += float(torch.dot(b, b))
    return metrics_from_sums(dd, sd, bb)


def projection_sums(w_stored: torch.Tensor, w_base: torch.Tensor, delta: torch.Tensor,
                    chunk: int = 1 << 20) -> tuple[float, float]:
    """(⟨W_stored − W_base, Δ⟩, ‖Δ‖²) for a given Δ (one adapter's own ΔWᵢ in a combination), chunked float64 sums:
    summed over tensors, their ratio is that adapter's weight-space retention."""
    stored, base, d = (t.reshape(-1) for t in (w_stored, w_base, delta))
    sd = dd = 0.0
    for i in range(0, d.numel(), chunk):
        di = d[i:i + chunk].double()
        dd += float(torch.dot(di, di))
        sd += float(torch.dot(stored[i:i + chunk].double() - base[i:i + chunk].double(), di))
    return sd, dd


def metrics_from_sums(dd: float, sd: float, bb: float) -> tuple[float, float, float] | None:
    """(retention, relative ΔW norm, ‖ΔW‖²) from ‖ΔW‖², ⟨W_stored − W_base, ΔW⟩ and ‖W_base‖²; None when ΔW = 0.
    ‖ΔW‖² weighs each tensor in the model-wide aggregate retention."""
    if dd == 0.0:
        return None
    return sd / dd, (dd ** 0.5) / (bb ** 0.5) if bb else 0.0, dd
