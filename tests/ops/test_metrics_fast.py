"""`delta_metrics` (chunked, float64 accumulation) agrees with its slow twins `weight_retention` and
`relative_delta_norm` (whole-tensor float64)."""

from __future__ import annotations

import pytest
import torch

from qmerge.ops.metrics import delta_metrics, relative_delta_norm, weight_retention


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_delta_metrics_match_slow_twins(storage, chunk):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 130, generator=g) * 0.02
    merged = base + torch.randn(300, 130, generator=g) * 1e-4
    stored = merged.to(storage)
    delta = merged - base
    fast = delta_metrics(stored, merged, base, chunk=chunk)
    slow = (weight_retention(stored.to(torch.float32), base, delta), relative_delta_norm(delta, base))
    assert fast == pytest.approx(slow, rel=1e-12, abs=0)


def test_delta_metrics_none_when_unchanged():
    base = torch.randn(10, 10)
    assert delta_metrics(base.clone(), base.clone(), base) is None
