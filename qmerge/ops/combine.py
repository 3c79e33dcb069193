"""Combining several adapters' deltas into one, per tensor, on the exact float32 ΔWᵢ = scaleᵢ·BᵢAᵢ.

Methods, named and defined as PEFT's `peft.utils.merge_utils` defines them (the functions behind
`add_weighted_adapter`), but applied to the full-rank ΔWᵢ, never to the A/B factors and never SVD-truncated:

- `linear` (task arithmetic, Ilharco et al. 2023, arXiv:2212.04089): Σ wᵢ·ΔWᵢ. Negative weights negate a task.
- `magnitude_prune`: Σ wᵢ·top_k(ΔWᵢ), keeping the k = ⌊density·numel⌋ entries of largest |value| of each ΔWᵢ.
- `ties` (Yadav et al. 2023, arXiv:2306.01708): trim each ΔWᵢ to its top-k, elect a sign per entry (`total`:
  sign of Σ trimmedᵢ; `frequency`: sign of Σ sign(trimmedᵢ); a zero sum elects +), and average the weighted
  trimmed deltas that agree with the elected sign over how many agree (a disjoint mean; 0 where none does).
- `dare_linear` (Yu et al. 2023, arXiv:2311.03099): drop each entry of ΔWᵢ with probability 1−density, rescale
  the kept ones by 1/density, then the weighted sum.
- `dare_ties`: DARE's drop-and-rescale in place of TIES' trim, then TIES' election and disjoint mean.

Determinism. Top-k ties at the threshold magnitude are broken by the lower flat index (torch.topk leaves that
order unspecified). DARE's keep mask for adapter i of tensor `name` is drawn on CPU from its own generator,
seeded by (merge seed, i, name) through SHA-256, so it does not depend on the order tensors are merged in, on
the device, or on any other tensor: the same seed gives the same bytes. The sums run in adapter order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from qmerge.numerics import MATH_DTYPE

METHODS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SPARSIFY = {"linear": None, "magnitude_prune": "magnitude", "ties": "magnitude", "dare_linear": "random",
            "dare_ties": "random"}
ELECTS_SIGN = {"ties", "dare_ties"}


def top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = ⌊density·numel⌋ entries of largest |value| (ties at the k-th magnitude: lower
    flat index first). O(numel): a k-th value selection, not a sort."""
    flat = delta.reshape(-1).abs()
    n = flat.numel()
    k = int(density * n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest magnitude
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:  # entries equal to the threshold, in index order, until k are kept
        at = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[at] = True
    return mask.reshape(delta.shape)


def keep_generator(seed: int, adapter: int, tensor: str) -> torch.Generator:
    """The CPU generator of DARE's keep mask for one adapter's delta of one tensor."""
    digest = hashlib.sha256(f"{seed}\0{adapter}\0{tensor}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry independently with probability `density` (u < density, u uniform in [0, 1))."""
    return torch.rand(shape, generator=generator, dtype=torch.float64) < density


def sparsified(delta: torch.Tensor, method: str, density: float, seed: int, adapter: int,
               tensor: str) -> torch.Tensor:
    """ΔWᵢ after the method's trim (magnitude) or drop-and-rescale (random); float32, on delta's device."""
    kind = SPARSIFY[method]
    if kind is None or density >= 1:
        return delta
    if kind == "magnitude":
        return delta * top_k_mask(delta, density)
    keep = dare_mask(delta.shape, density, keep_generator(seed, adapter, tensor)).to(delta.device)
    return delta * keep / density


def elected(trimmed: Sequence[torch.Tensor], method: str) -> torch.Tensor:
    """The sign TIES elects per entry: +1 or −1 (a zero total elects +1)."""
    total = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total += t if method == "total" else t.sign()
    return torch.where(total >= 0, 1.0, -1.0).to(trimmed[0].dtype)


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], method: str, density: float = 1.0,
            majority_sign_method: str = "total", seed: int = 0, tensor: str = "") -> torch.Tensor:
    """The combined delta of one tensor (float32). `deltas[i]` is adapter i's exact ΔWᵢ (float32, unweighted);
    `tensor` names it for DARE's per-tensor keep masks."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}")
    parts = [sparsified(d.to(MATH_DTYPE), method, density, seed, i, tensor) for i, d in enumerate(deltas)]
    if method not in ELECTS_SIGN:
        total = parts[0] * weights[0] if weights[0] != 1.0 else parts[0].clone()
        for part, weight in zip(parts[1:], weights[1:]):
            total += part * weight if weight != 1.0 else part
        return total
    sign = elected(parts, majority_sign_method)
    total = torch.zeros_like(parts[0])
    count = torch.zeros_like(parts[0])
    for part, weight in zip(parts, weights):
        agrees = part.sign() == sign  # a zero entry (trimmed or dropped) never agrees
        total += torch.where(agrees, part * weight, 0.0)
        count += agrees
    return total / count.clamp_min(1.0)
