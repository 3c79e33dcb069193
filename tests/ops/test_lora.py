"""LoRA math against its slow twins."""

from __future__ import annotations

import torch

from qmerge.ops.lora import dora_weight, dora_weight_reference, embedding_delta, lora_delta, lora_scale


def test_dora_weight_matches_its_row_by_row_float64_twin():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g) * 0.05
    delta = torch.randn(48, 32, generator=g) * 1e-3
    magnitude = w.norm(dim=1) * (1 + 0.1 * torch.rand(48, generator=g))
    fast = dora_weight(w, delta, magnitude)
    slow = dora_weight_reference(w, delta, magnitude)
    assert torch.allclose(fast.double(), slow, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(fast, w + delta, rtol=1e-4)  # the magnitude really rescales rows


def test_scales_and_layouts():
    assert lora_scale(16, 4, False) == 4.0 and lora_scale(16, 4, True) == 8.0
    a, b = torch.randn(4, 10), torch.randn(6, 4)
    assert lora_delta(a, b, 2.0).shape == (6, 10)
    assert torch.equal(embedding_delta(a, b, 2.0), (b @ a * 2.0).T)
