"""The compensation fit (qmerge.ops.compensation): optimal in the calibration-weighted norm, exact at full rank,
and the randomized SVD of large weights close to the exact one and deterministic."""

from __future__ import annotations

import pytest
import torch

from qmerge.ops import compensation
from qmerge.ops.compensation import fit, hessian_root


def problem(seed: int = 0, rows: int = 40, cols: int = 64, tokens: int = 300):
    """A residual and a Hessian of correlated, unevenly scaled inputs (so H-weighting matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                   dtype=torch.float64)
    x *= torch.rand(cols, generator=g, dtype=torch.float64) * 3
    r = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.01
    return r, 2 * x.T @ x / tokens, x


def weighted(delta: torch.Tensor, lower: torch.Tensor) -> float:
    return float((delta @ lower).square().sum())


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_fit_reaches_the_truncated_svd_bound(rank):
    """‖(R − B·A)·L‖² equals the sum of the squared singular values of R·L past `rank` (Eckart–Young): no rank-r
    correction can do better in the calibration-weighted norm."""
    r, h, _ = problem()
    lower = hessian_root(h, 0.01)
    a, b = fit(r, lower, rank)
    assert a.shape == (rank, r.shape[1]) and b.shape == (r.shape[0], rank)
    s = torch.linalg.svdvals(r @ lower)
    assert weighted(r - b @ a, lower) == pytest.approx(float(s[rank:].square().sum()), rel=1e-9)


def test_fit_beats_the_plain_svd_of_the_residual_on_the_inputs():
    """Weighting by the inputs is the point: the plain truncated SVD of R leaves more output error ‖(R − ·)X‖."""
    r, h, x = problem(seed=3)
    a, b = fit(r, hessian_root(h, 0.0), 4)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    plain = (u[:, :4] * s[:4]) @ vh[:4]
    ours = float(((r - b @ a) @ x.T).square().sum())
    theirs = float(((r - plain) @ x.T).square().sum())
    assert ours < 0.9 * theirs


def test_full_rank_is_exact_and_a_larger_rank_is_zero_padded():
    r, h, _ = problem(rows=6, cols=10)
    a, b = fit(r, hessian_root(h, 0.01), 8)
    assert a.shape == (8, 10) and b.shape == (6, 8)
    torch.testing.assert_close(b @ a, r, rtol=0, atol=1e-12)
    assert torch.count_nonzero(a[6:]) == 0 and torch.count_nonzero(b[:, 6:]) == 0


def test_randomized_svd_is_close_to_exact_and_deterministic(monkeypatch):
    r, h, _ = problem(seed=5, rows=80, cols=96)
    r, h = r.float(), h.float()
    lower = hessian_root(h, 0.01)
    exact = weighted(r - torch.mm(*reversed(fit(r, lower, 8))), lower)
    monkeypatch.setattr(compensation, "FULL_SVD_UP_TO", 16)
    monkeypatch.setattr(compensation, "OVERSAMPLE", 10)
    a1, b1 = fit(r, lower, 8)
    a2, b2 = fit(r, lower, 8)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    approx = weighted(r - b1 @ a1, lower)
    assert exact <= approx * (1 + 1e-4) and approx <= exact * 1.02


def test_dead_columns_and_non_finite_hessians():
    r, h, _ = problem(rows=8, cols=12)
    h[3, :] = 0
    h[:, 3] = 0
    lower = hessian_root(h, 0.01)
    assert torch.isfinite(lower).all() and lower[3, 3] > 0
    a, b = fit(r, lower, 2)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="positive definite"):
        hessian_root(h, 0.01)


def test_asymmetric_target_is_the_ridge_solution_and_the_fit_aims_at_it():
    """GPTAQ's target T = W + α·W·ΔXXᵀ·(H + λI)⁻¹: with α = 1 it solves T(H + λI) = W(H + ΔXXᵀ + λI), the normal
    equations of ‖TX − WX̃‖ with GPTQ's ridge; α = 0.25 goes a quarter of the way. A compensation fitted to T − Q
    leaves less output error against WX̃ than one fitted to W − Q (which would undo GPTAQ's correction)."""
    from qmerge.ops.compensation import asymmetric_target

    _, h, x = problem(seed=3)
    g = torch.Generator().manual_seed(4)
    target_x = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(dim=0)
    cross = 2 * (target_x - x).T @ x / x.shape[0]
    w = torch.randn(40, 64, generator=g, dtype=torch.float64)
    lower = hessian_root(h, 0.01)
    damped = lower @ lower.T
    t = asymmetric_target(w, cross, lower, 1.0)
    torch.testing.assert_close(t @ damped, w @ (damped + cross), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(asymmetric_target(w, cross, lower, 0.25) - w, 0.25 * (t - w), rtol=1e-9, atol=1e-12)
    q = w + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64)  # a stand-in for the quantized weight
    want = w @ target_x.T

    def error(weight):
        return float((weight @ x.T - want).norm())

    a_t, b_t = fit(t - q, lower, 8)
    a_w, b_w = fit(w - q, lower, 8)
    assert error(q + b_t @ a_t) < error(q + b_w @ a_w) and error(q + b_t @ a_t) < error(q)
