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
    slow = (weight_retention(stored.to(torch.float32), base, delta), relative_delta_norm(delta, base),
            float(delta.double().pow(2).sum()))
    assert fast == pytest.approx(slow, rel=1e-12, abs=0)


def test_delta_metrics_none_when_unchanged():
    base = torch.randn(10, 10)
    assert delta_metrics(base.clone(), base.clone(), base) is None


@pytest.mark.parametrize("n", [1, 2, 37, 1000])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 0.999, 1.0])
def test_quantile_equals_torch_quantile(n, q):
    from qmerge.ops.metrics import quantile

    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert quantile(x.sort().values, q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-12, abs=1e-15)


def test_kl_summary_above_torch_quantiles_limit():
    """torch.quantile raises above 2^24 elements; a 48-window × 350k-token eval passes that."""
    from qmerge.ops.metrics import kl_summary

    windows, tokens = 2, 2**23 + 1  # 2^24 + 2 per-token values
    kl = torch.zeros(windows, tokens)
    kl[:, -100:] = 1.0  # 200 tokens of KL 1: p99 is 0, p99.9 is 0, max is 1
    with pytest.raises(RuntimeError):
        torch.quantile(kl.double().reshape(-1), 0.99)
    out = kl_summary(kl, torch.ones(windows, tokens), torch.zeros(windows, tokens))
    assert out["p99"] == 0.0 and out["max"] == 1.0 and out["p999"] == 0.0
