"""An independent GPTQ, written straight from the paper (Frantar et al. 2022, arXiv:2210.17323) to check
qmerge's solver: float64, one column at a time, no lazy batching and no Cholesky reformulation.

It follows the OBQ update the paper starts from (Sec. 3, eqs. 2–3, with the fixed column order of
"Step 1"): quantize column p, move the remaining columns by −(w_p − q_p)/[H⁻¹]_pp · [H⁻¹]_p,:, then
remove p from H⁻¹ by Gaussian elimination, H⁻¹ ← H⁻¹ − H⁻¹_:,p H⁻¹_p,: / [H⁻¹]_pp. The per-group grid is
the stored format's (qmerge.ops.gptq.find_params), found when a group's first column is reached.
"""

from __future__ import annotations

import torch

from qmerge.ops.gptq import fake_quantize, find_params


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
            scale, zero = find_params(w[:, group_cols], bits, sym)
        g_idx[p] = position // size
        q[:, p] = fake_quantize(w[:, p], scale, zero, bits)
        err = (w[:, p] - q[:, p]) / hinv[p, p]
        remaining.remove(p)
        w[:, remaining] -= err.unsqueeze(1) * hinv[p, remaining].unsqueeze(0)
        w[:, p] = q[:, p]
        hinv = hinv - torch.outer(hinv[:, p], hinv[p, :]) / hinv[p, p]
    return q, g_idx
