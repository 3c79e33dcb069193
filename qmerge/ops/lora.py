"""LoRA merge math (Hu et al. 2021, arXiv:2106.09685; DoRA: Liu et al. 2024, arXiv:2402.09353).

Pure tensor functions, float32 in and out. Conventions follow PEFT 0.21 `tuners/lora/layer.py`:
- Linear: ΔW = scale · B @ A, shape [out, in]. GPT-2 `Conv1D` stores [in, out]: the caller passes
  `transpose=True` and gets ΔWᵀ (PEFT's `fan_in_fan_out`; we decide from shapes, not from the flag,
  because PEFT's bnb layers force the flag off).
- Embedding: PEFT stores lora_embedding_A [r, num_embeddings] and lora_embedding_B [dim, r];
  ΔW = (B @ A)ᵀ · scale, shape [num_embeddings, dim].
- DoRA: W' = m / ‖W + ΔW‖_row · (W + ΔW), the norm over dim=1 of the [out, in] weight
  (PEFT `DoraLinearLayer.get_weight_norm`), so it is not additive.
"""

from __future__ import annotations

import math

import torch

from qmerge.numerics import MATH_DTYPE


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's `scaling`: alpha/r, or alpha/sqrt(r) for rank-stabilized LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """ΔW = scale · B @ A in float32, [out, in] for a linear layer; into `out` (float32, that shape, contiguous)
    when given: the same product, the same bits (tested)."""
    return lora_product(lora_a, lora_b, out=out).mul_(scale)  # scaled in place: no second whole-tensor allocation


def lora_product(lora_a: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """B @ A in float32, unscaled (`lora_delta` before its scaling), into `out` when given."""
    return torch.matmul(lora_b.to(MATH_DTYPE), lora_a.to(MATH_DTYPE), out=out)


def embedding_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW for an embedding: (B @ A)ᵀ · scale, [num_embeddings, dim]."""
    return lora_delta(lora_a, lora_b, scale).T.contiguous()


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA merged weight m / ‖W + ΔW‖ · (W + ΔW), row norms of the [out, in] matrix."""
    combined = weight.to(MATH_DTYPE) + delta.to(MATH_DTYPE)
    norm = torch.linalg.norm(combined, dim=1)
    return (magnitude.to(MATH_DTYPE) / norm).unsqueeze(1) * combined


def dora_weight_reference(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Slow obvious twin of `dora_weight`, in float64, row by row (test oracle)."""
    out = torch.empty(weight.shape, dtype=torch.float64)
    for i in range(weight.shape[0]):
        row = weight[i].double() + delta[i].double()
        out[i] = magnitude[i].double() * row / row.norm()
    return out
