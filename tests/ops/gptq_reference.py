"""An independent GPTQ, written straight from the paper (Frantar et al. 2022, arXiv:2210.17323) to check
qmerge's solver: float64, one column at a time, no lazy batching and no Cholesky reformulation.

It follows the OBQ update the paper starts from (Sec. 3, eqs. 2–3, with the fixed column order of
"Step 1"): quantize column p, move the remaining columns by −(w_p − q_p)/[H⁻¹]_pp · [H⁻¹]_p,:, then
remove p from H⁻¹ by Gaussian elimination, H⁻¹ ← H⁻¹ − H⁻¹_:,p H⁻¹_p,: / [H⁻¹]_pp. The per-group grid
(`reference_grid`, written here row by row in plain Python) is found when a group's first column is reached.

It makes qmerge's choices where qmerge departs from the published GPTQ code (fp16 grid, zero ≥ 1, symmetric range
for one-signed groups, grids on fully updated columns, dead columns kept; docs/design.md, "GPTQ: where qmerge
differs"), so it cannot catch those: test_gptq_gptqmodel.py checks them against GPTQModel itself.
"""

from __future__ import annotations

import torch

import numpy as np


def reference_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the min/max grid of GPTQ (range widened to include 0), scale stored as fp16 (so rounded to
    it), symmetric zero at the middle code, asymmetric zero = round(−min/scale) kept ≥ 1 because the v1 format
    stores zero − 1 unsigned (a row that would get zero 0 uses scale max/(maxq − 1) and zero 1)."""
    maxq = 2 ** bits - 1
    scales, zeros = [], []
    for row in w.double().tolist():
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        if sym:
            hi = max(-lo, hi)
            lo = -hi
        if lo == 0.0 and hi == 0.0:
            lo, hi = -1.0, 1.0
        scale = float(np.float16((hi - lo) / maxq))
        zero = float((maxq + 1) // 2) if sym else float(np.round(-lo / scale))
        if not sym and zero < 1:
            scale, zero = float(np.float16(hi / (maxq - 1))), 1.0
        scales.append(scale)
        zeros.append(min(max(zero, 1.0), maxq + 1.0))
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """scale · (clamp(round(w / scale) + zero, 0, maxq) − zero), the GPTQ paper's quantizer."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1) - zero)


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool,
                   damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dequantized Q [out, in], g_idx [in]) in float64."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    order = list(range(cols))
    if desc_act:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist()
    h = h + damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    g_idx = torch.zeros(cols, dtype=torch.int32)
    remaining = list(order)
    scale = zero = None
    for position, p in enumerate(order):
        if position % size == 0:
            group_cols = order[position:position + size]
            scale, zero = reference_grid(w[:, group_cols], bits, sym)
        g_idx[p] = position // size
        q[:, p] = fake_quantize(w[:, p], scale, zero, bits)
        err = (w[:, p] - q[:, p]) / hinv[p, p]
        remaining.remove(p)
        w[:, remaining] -= err.unsqueeze(1) * hinv[p, remaining].unsqueeze(0)
        w[:, p] = q[:, p]
        hinv = hinv - torch.outer(hinv[:, p], hinv[p, :]) / hinv[p, p]
    return q, g_idx
