"""An independent GPTQ, written straight from the paper (Frantar et al. 2022, arXiv:2210.17323) to check
qmerge's solver: float64, one column at a time, no lazy batching and no Cholesky reformulation.

It follows the OBQ update the paper starts from (Sec. 3, eqs. 2–3, with the fixed column order of
"Step 1"): quantize column p, move the remaining columns by −(w_p − q_p)/[H⁻¹]_pp · [H⁻¹]_p,:, then
remove p from H⁻¹ by Gaussian elimination, H⁻¹ ← H⁻¹ − H⁻¹_:,p H⁻¹_p,: / [H⁻¹]_pp. The per-group grid
(`reference_grid`, written here row by row in plain Python) is found when a group's first column is reached.

With `cross` = 2(X̃ − X)Xᵀ/n (GPTAQ, Li et al. 2025, arXiv:2504.02692: the target is WX̃, X̃ the inputs in the
unquantized model) each step also moves the remaining columns R by α·w_p·cross[p, R]·(H_R)⁻¹, w_p the column's
value just before it was quantized: the least-squares fit, in the remaining columns, of the part w_p(X̃_p − X_p)
of column p's target that X_p no longer carries. (H_R)⁻¹ is what the elimination leaves in H⁻¹, so this is the
paper's closed form before its Cholesky reformulation, which qmerge's solver uses.

It makes qmerge's choices where qmerge departs from the published GPTQ code (fp16 grid, zero ≥ 1, symmetric range
for one-signed groups, grids on fully updated columns, dead columns kept; docs/design.md, "GPTQ: where qmerge
differs"), so it cannot catch those: test_gptq_gptqmodel.py checks them against GPTQModel itself.
"""

from __future__ import annotations

import torch

import numpy as np


def reference_grid(w: torch.Tensor, bits: int, sym: bool, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the min/max grid of GPTQ (range widened to include 0), scale stored as fp16 (so rounded to
    it), symmetric zero at the middle code, asymmetric zero = round(−min/scale) kept ≥ 1 because the v1 format
    stores zero − 1 unsigned (a row that would get zero 0 uses scale max/(maxq − 1) and zero 1).

    search "mse" (GPTQ's `Quantizer(mse=True)`: grid 100, maxshrink 0.8, norm 2.4): the grid of [p·min, p·max],
    p = 1 − i/100 for i < 80, with the least Σ|w − q|^2.4 over the row; the first (widest) wins a tie."""
    maxq = 2 ** bits - 1
    scales, zeros = [], []
    for row in w.double().tolist():
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        shrinks = [1 - i / 100 for i in range(80)] if search == "mse" else [1.0]
        best = None
        for p in shrinks:
            scale, zero = _row_grid(p * lo, p * hi, maxq, sym)
            if len(shrinks) == 1:
                best = (0.0, scale, zero)
                break
            t = torch.tensor(row, dtype=torch.float64)
            err = float((fake_quantize(t, torch.tensor(scale), torch.tensor(zero), bits) - t).abs().pow(2.4).sum())
            if best is None or err < best[0]:
                best = (err, scale, zero)
        scales.append(best[1])
        zeros.append(best[2])
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def _row_grid(lo: float, hi: float, maxq: int, sym: bool) -> tuple[float, float]:
    if sym:
        hi = max(-lo, hi)
        lo = -hi
    if lo == 0.0 and hi == 0.0:
        lo, hi = -1.0, 1.0
    scale = float(np.float16((hi - lo) / maxq))
    zero = float((maxq + 1) // 2) if sym else float(np.round(-lo / scale))
    if not sym and zero < 1:
        scale, zero = float(np.float16(hi / (maxq - 1))), 1.0
    return scale, min(max(zero, 1.0), maxq + 1.0)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """scale · (clamp(round(w / scale) + zero, 0, maxq) − zero), the GPTQ paper's quantizer."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1) - zero)


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool,
                   damp: float, search: str = "minmax", cross: torch.Tensor | None = None,
                   alpha: float = 0.25, static_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dequantized Q [out, in], g_idx [in]) in float64. `static_groups`: each group of contiguous columns
    gets its grid from the weights as given, before anything is quantized, and keeps it whatever the order."""
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
    static = [reference_grid(w[:, g:g + size], bits, sym, search) for g in range(0, cols, size)] \
        if static_groups else None
    for position, p in enumerate(order):
        if static_groups and size < cols:
            scale, zero = static[p // size]
            g_idx[p] = p // size
        else:
            if position % size == 0:
                group_cols = order[position:position + size]
                scale, zero = reference_grid(w[:, group_cols], bits, sym, search)
            g_idx[p] = position // size
        before = w[:, p].clone()
        q[:, p] = fake_quantize(w[:, p], scale, zero, bits)
        err = (w[:, p] - q[:, p]) / hinv[p, p]
        remaining.remove(p)
        w[:, remaining] -= err.unsqueeze(1) * hinv[p, remaining].unsqueeze(0)
        w[:, p] = q[:, p]
        hinv = hinv - torch.outer(hinv[:, p], hinv[p, :]) / hinv[p, p]
        if cross is not None and remaining:
            move = cross.double()[p, remaining] @ hinv[remaining][:, remaining]
            w[:, remaining] += alpha * before.unsqueeze(1) * move.unsqueeze(0)
    return q, g_idx
