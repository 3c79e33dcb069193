"""Multi-adapter combination methods against independent float64 transcriptions of the papers' algorithms
(entry by entry, small tensors), against PEFT's `merge_utils` (the definitions qmerge follows) and mergekit's
generalized task arithmetic where the two coincide, and the degenerate cases."""

from __future__ import annotations

import functools

import pytest
import torch

from qmerge.ops import combine as combine_module
from qmerge.ops.combine import combine, dare_mask, top_k_mask

SHAPE = (7, 9)


def _deltas(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) * 10 ** -(i % 3) for i in range(n)]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) or 1.0
    assert float((got.double() - want).abs().max()) <= 1e-6 * scale, (got, want)


# --- float64 transcriptions, entry by entry --------------------------------------------------------------------

def _topk_keep(t: torch.Tensor, density: float) -> set[int]:
    """TIES' 'keep top-k%' by magnitude: the k = ⌊density·n⌋ largest |values| (ties: lower index first)."""
    flat = [abs(float(x)) for x in t.reshape(-1)]
    k = int(density * len(flat))
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    return set(order[:k])


def _sgn(x: float) -> int:
    return (x > 0) - (x < 0)


def oracle(deltas, weights, method, density, sign_method="total", keep=None):
    """Yadav et al. Algorithm 1 (trim, elect, disjoint merge) with PEFT's per-task weights λᵢ applied before the
    disjoint mean; Yu et al. DARE (drop with p = 1 − density, rescale by 1/(1 − p)) with `keep` the drop masks;
    task arithmetic as Σ λᵢ τᵢ. An elected sign of 0 (an exact zero total) counts as + (PEFT's rule)."""
    n, flat = len(deltas), [d.double().reshape(-1).tolist() for d in deltas]
    size = len(flat[0])
    if method in ("ties", "magnitude_prune"):
        kept = [_topk_keep(d, density) for d in deltas]
        trimmed = [[v if j in kept[i] else 0.0 for j, v in enumerate(flat[i])] for i in range(n)]
    elif method in ("dare_linear", "dare_ties"):
        trimmed = [[v / density if keep[i].reshape(-1)[j] else 0.0 for j, v in enumerate(flat[i])] for i in range(n)]
    else:
        trimmed = flat
    out = []
    for j in range(size):
        if method in ("ties", "dare_ties"):
            votes = sum(trimmed[i][j] if sign_method == "total" else _sgn(trimmed[i][j]) for i in range(n))
            elected = 1 if votes >= 0 else -1
            agree = [i for i in range(n) if _sgn(trimmed[i][j]) == elected]
            out.append(sum(weights[i] * trimmed[i][j] for i in agree) / len(agree) if agree else 0.0)
        else:
            out.append(sum(weights[i] * trimmed[i][j] for i in range(n)))
    return torch.tensor(out, dtype=torch.float64).reshape(deltas[0].shape)


def _keep_masks(n: int, density: float, seed: int, name: str) -> list[torch.Tensor]:
    return [dare_mask(torch.Size(SHAPE), density, seed, i, name) for i in range(n)]


@pytest.mark.parametrize("method,density,sign", [
    ("linear", 1.0, "total"), ("magnitude_prune", 0.3, "total"), ("ties", 0.5, "total"),
    ("ties", 0.2, "frequency"), ("ties", 1.0, "total"), ("dare_linear", 0.4, "total"), ("dare_ties", 0.6, "total"),
    ("dare_ties", 0.3, "frequency")])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.7, 1.3, 0.25)])
def test_methods_equal_their_paper_transcriptions(method, density, sign, weights):
    deltas = _deltas(3)
    keep = _keep_masks(3, density, 5, "w") if method.startswith("dare") else None
    got = combine(deltas, weights, method, density, sign, seed=5, tensor="w")
    assert got.dtype == torch.float32
    _close(got, oracle(deltas, weights, method, density, sign, keep))


def test_linear_negation_and_single_adapter():
    a, b = _deltas(2)
    _close(combine([a, b], [1.0, -0.5], "linear"), a.double() - 0.5 * b.double())
    # one adapter, density 1: every method is that adapter's ΔW times its weight
    for method in ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"):
        _close(combine([a], [2.0], method, 1.0), 2.0 * a.double())


def test_ties_with_density_one_elects_but_does_not_trim():
    a, b = _deltas(2)
    a[0, 0], b[0, 0] = 3.0, -1.0  # opposite signs: the + side wins the 'total' election, b's entry is dropped
    got = combine([a, b], [1.0, 1.0], "ties", 1.0)
    assert float(got[0, 0]) == 3.0
    same = (a.sign() == b.sign())
    _close(got[same], (a[same].double() + b[same].double()) / 2)


def test_top_k_keeps_exactly_k_and_breaks_ties_by_index():
    t = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 3.0])
    mask = top_k_mask(t, 0.5)  # k = 3: 3.0, then the first two of the three |2.0|
    assert mask.tolist() == [False, True, True, False, False, True]
    assert int(top_k_mask(torch.randn(1000), 0.137).sum()) == 137
    assert not top_k_mask(t, 0.1).any() and top_k_mask(t, 1.0).all()


def _direct_threshold(t: torch.Tensor, density: float) -> tuple[float, int, int]:
    """The k-th largest magnitude, how many entries equal to it are kept and how many there are, by a full sort."""
    flat = t.reshape(-1).abs()
    k = int(density * flat.numel())
    value = float(flat.sort(descending=True).values[k - 1])
    return value, k - int((flat > value).sum()), int((flat == value).sum())


def _check_threshold(got, t: torch.Tensor, density: float, sampled: bool | None) -> None:
    """`got` (a `TopK`) is the full sort's threshold and tie counts, and, where the sampled bracket found it
    (`sampled`; None: either way) and only some threshold-equal entries are kept, its count of them in each BLOCK
    of the flat tensor is right too."""
    assert tuple(got[:3]) == _direct_threshold(t, density)
    assert sampled is None or (got.by_block is not None) == (sampled and 0 < got.kept < got.equal)
    if got.by_block is None:
        return
    equal = (t.reshape(-1).abs() == got.value).int()
    assert got.by_block == tuple(int(equal[i:i + combine_module.BLOCK].sum())
                                 for i in range(0, equal.numel(), combine_module.BLOCK))


@pytest.mark.parametrize("density", [0.003, 0.1, 0.5, 0.77, 0.999])
def test_sampled_bracket_finds_the_exact_threshold(monkeypatch, density):
    """The bracket from a strided sample (forced onto tensors of 7 000 entries) gives the full sort's threshold
    and tie count: on smooth values, on few distinct magnitudes (long ties), on a rank-1 product whose rows
    repeat, and on values whose sampled positions are all smaller than the rest (the bracket misses rank k:
    the fallback selects over the whole tensor)."""
    monkeypatch.setattr(combine_module, "SAMPLE", 256)
    monkeypatch.setattr(combine_module, "BLOCK", 999)
    g = torch.Generator().manual_seed(5)
    aliased = torch.rand(7000, generator=g) + 2
    aliased[::(7000 // 256) | 1] = 1.0  # every sampled position (the sample's stride) holds the smallest value
    cases = {
        "smooth": torch.randn(70, 100, generator=g),
        "ties": torch.randint(-3, 4, (70, 100), generator=g).float(),
        "rank-1": torch.randn(70, 1, generator=g) @ torch.randn(1, 100, generator=g),
        "aliased": aliased,
    }
    for name, t in cases.items():
        _check_threshold(combine_module._threshold(t, density), t, density, sampled=None if name == "aliased" else True)
    assert combine_module._bracket(cases["smooth"].reshape(-1), 3500) is not None  # the sampled path runs …
    assert combine_module._bracket(aliased, 3500) is None  # … and the fallback where the sample misjudges


@pytest.mark.parametrize("with_c", [True, False])
def test_threshold_found_while_scaling_equals_scaling_then_thresholding(monkeypatch, with_c):
    """`scaled_threshold` (the product scaled entry by entry inside the bracket's counting pass) returns the
    threshold of the ΔW that `mul_(scale)` gives (lora_delta's ΔW) and leaves the product as it was: scales that
    float32 holds exactly and ones it rounds (rsLoRA's α/√r), densities, smooth values, long ties, a rank-1
    product, the sampled path, the small-tensor path and the fallback where the sample misjudges; with and without
    the C helper (then torch scales a copy of each block of the numpy pass)."""
    from qmerge.ops import native

    monkeypatch.setattr(combine_module, "SAMPLE", 256)
    monkeypatch.setattr(combine_module, "BLOCK", 999)
    if not with_c:
        monkeypatch.setenv("QMERGE_NO_COMPILE", "1")
    calls = []  # (scale, whether the C loop answered)

    def spy(*args, **kwargs):
        answer = native.count_and_gather(*args, **kwargs)
        calls.append((kwargs.get("scale"), answer is not None))
        return answer

    monkeypatch.setattr(combine_module, "count_and_gather", spy)
    g = torch.Generator().manual_seed(9)
    aliased = torch.rand(7000, generator=g) + 2
    aliased[::(7000 // 256) | 1] = 1.0
    cases = {"smooth": torch.randn(70, 100, generator=g), "ties": torch.randint(-3, 4, (70, 100), generator=g).float(),
             "rank-1": torch.randn(70, 1, generator=g) @ torch.randn(1, 100, generator=g), "aliased": aliased,
             "small": torch.randn(30, 30, generator=g)}
    for name, product in cases.items():
        for scale in (2.0, 16 / 8**0.5, 0.3):
            for density in (0.2, 0.5, 0.9):
                fused = product.clone()
                got = combine_module.scaled_threshold(fused, scale, density)
                want_delta = product.clone().mul_(scale)
                assert torch.equal(fused.view(torch.int32), product.view(torch.int32)), (name, scale, density)
                assert got == combine_module._threshold(want_delta, density)
                _check_threshold(got, want_delta, density, {"aliased": None, "small": False}.get(name, True))
    assert (16 / 8**0.5, with_c) in calls and (16 / 8**0.5, not with_c) not in calls  # the fused pass scaled


def test_bracket_pass_on_cpu_equals_the_torch_pass(monkeypatch):
    """On CPU the bracket's counting pass runs in qmerge's C loop (one call per thread over a run of blocks; numpy
    where the helper is missing); elsewhere in torch. Each counts and gathers the same entries, in the same order,
    and the same count per block, over blocks that entries equal to either bound straddle."""
    monkeypatch.setattr(combine_module, "BLOCK", 1000)
    g = torch.Generator().manual_seed(3)
    flat = torch.randint(-40, 41, (25_000,), generator=g).float() / 8  # many exact ties, zeros, both signs
    for lo, hi in ((1.0, 2.5), (0.0, 0.125), (4.875, 5.0), (2.0, 2.0)):
        above, inside, lengths = combine_module._count_and_gather(flat.numpy(), lo, hi)
        want_above, want_inside, want_lengths = combine_module._count_and_gather(flat, lo, hi)
        assert above == want_above == int((flat.abs() > hi).sum())
        assert torch.equal(inside, want_inside) and lengths == want_lengths
        assert lengths == [int(((b.abs() >= lo) & (b.abs() <= hi)).sum()) for b in flat.split(1000)]
        assert inside.numel() == int(((flat.abs() >= lo) & (flat.abs() <= hi)).sum())


def test_bracket_pass_in_c_equals_numpy_on_every_kind_of_float(monkeypatch):
    """The C loop (ops/native.py) reads magnitudes as float32 bits: it must count and gather what numpy's float
    comparisons do, for zeros of both signs, subnormals, infinities, NaNs (neither above nor inside), values equal
    to either bound and an infinite upper bound; and the C helper must really be built here (the suite runs with
    QMERGE_COMPILE_STRICT=1, so a failed build raises instead of comparing numpy with itself). Both C forms: the
    AVX-512 one (where this CPU has it) and the plain loop."""
    import numpy as np

    from qmerge.ops import native

    g = np.random.default_rng(11)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 2.5, -2.5,
                         np.float32(3.4e38)], dtype=np.float32)
    block = np.concatenate([specials, g.standard_normal(5000).astype(np.float32) * 2,
                            np.round(g.standard_normal(2000) * 4).astype(np.float32) / 2])
    g.shuffle(block)
    assert native.count_and_gather(block, 0.0, 1.0) is not None
    monkeypatch.setattr(combine_module, "count_and_gather", lambda *args, **kwargs: None)  # numpy only
    for lo, hi in ((0.0, 0.0), (0.0, 1.0), (1.0, 2.5), (2.5, 2.5), (1e-45, 1e-40), (2.0, np.inf), (0.0, np.inf)):
        for size in (block.size, 16, 15, 1):  # whole 16-entry steps of the AVX-512 form and tails of each length
            for scale in (None, 3.0, 16 / 8**0.5, 1e-30):  # each entry scaled as read (torch's mul_ bits), or not
                part = block[:size].copy()
                scaled = torch.from_numpy(part.copy()).mul_(scale).numpy() if scale is not None else part.copy()
                want_above, want_inside, _ = combine_module._count_and_gather(scaled.copy(), lo, hi)
                unfused = combine_module._count_and_gather(part.copy(), lo, hi, scale)  # numpy scales a copy
                assert unfused[0] == want_above and torch.equal(unfused[1], want_inside)
                within = (np.abs(scaled) >= lo) & (np.abs(scaled) <= hi)
                for portable in (False, True):
                    for per in (None, 16, 37):  # one call over runs of blocks: each block's count, in order
                        mine = part.copy()
                        above, inside, lengths = native.count_and_gather(mine, lo, hi, portable=portable,
                                                                         scale=scale, block=per)
                        assert above == want_above and np.array_equal(inside, want_inside.numpy()), (
                            lo, hi, size, portable, scale, per)
                        step = per or size
                        assert lengths == [int(within[i:i + step].sum()) for i in range(0, size, step)], per
                        assert np.array_equal(mine.view(np.int32), part.view(np.int32)), (size, portable, scale)
    assert native.count_and_gather(block.astype(np.float64), 0.0, 1.0) is None  # float64: numpy's exact path


KINDS = pytest.mark.parametrize("kind", [None, 0, 1, 2], ids=["this-cpu", "plain", "avx2", "avx512"])


def combine_block_of_kind(kind: int | None):
    """native.combine_block on one CPU kind's loop; the test is skipped where this CPU has no such loop."""
    import numpy as np

    from qmerge.ops import native

    try:
        native.combine_block([np.zeros(1, np.float32)], np.zeros(1, np.float32), "keep_all", np.ones(1), False, False,
                             kind=kind)
    except LookupError as e:
        pytest.skip(str(e))
    return functools.partial(native.combine_block, kind=kind)


@KINDS
def test_combination_in_c_gives_the_op_by_op_bits_on_every_kind_of_float(kind):
    """The C helper's block (ops/native.py, each form: the one this CPU takes, the plain, AVX2 and AVX-512 loops
    where the CPU has them) against
    the op-by-op kernels it replaces, bit for bit: zeros of both signs, subnormals, infinities and NaNs in the
    deltas, entries equal to a threshold, 1, 3 and 5 adapters, both sign methods and the weighted sum, lengths that
    are not whole chunks or vector steps, and DARE's flat indices past 2³² (the hash's high word) with densities
    that keep nothing, some, and everything."""
    import numpy as np

    from qmerge.ops import native

    assert native.combine_available()  # the suite runs with QMERGE_COMPILE_STRICT=1: a failed build raises
    combine_block = combine_block_of_kind(kind)
    g = torch.Generator().manual_seed(8)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, float("inf"), -float("inf"), float("nan"), 1.0, -1.0,
                             0.5, -0.5, 3.4e38, -3.4e38])
    for k in (1, 3, 5):
        for n in (1, 15, 300, 1000):
            raws = tuple(torch.cat([specials, torch.randn(n, generator=g) * 10 ** -i])[torch.randperm(
                n + len(specials), generator=g)][:n].contiguous() for i in range(k))
            weights = torch.randn(k, generator=g)
            thresholds = torch.tensor([0.5, 1.0, 0.0, float("inf"), 1e-45][:k])
            take_equal = torch.tensor([True, False, True, False, True][:k])
            keys = torch.randint(0, 2**32, (k, 2), generator=g, dtype=torch.int64)
            for elect, frequency in ((True, False), (True, True), (False, False)):
                cases = [("keep_all", {}, combine_module._masked_kernel(raws, None, 1.0, weights, elect, frequency)),
                         ("magnitude", {"thresholds": thresholds.numpy(), "take_equal": take_equal.numpy()},
                          combine_module._magnitude_kernel(raws, thresholds, take_equal, weights, elect, frequency))]
                for density in (0.3, 1.0, 1e-12):
                    below = combine_module.keep_threshold(density)
                    for start in (0, 2**32 - 7, 3 * 2**32 + 5):
                        cases.append(("dare", {"keys": keys.numpy(), "keep_below": below, "start": start,
                                               "density": density},
                                      combine_module._dare_kernel(raws, torch.tensor(start), keys, torch.tensor(below),
                                                                  density, weights, elect, frequency)))
                for mode, how, want in cases:
                    out = np.full(n, 7.0, dtype=np.float32)
                    combine_block([r.numpy() for r in raws], out, mode, weights.numpy(), elect, frequency, **how)
                    assert np.array_equal(out.view(np.int32), want.numpy().view(np.int32)), (k, n, mode, how, elect,
                                                                                               frequency)


@KINDS
def test_combination_in_c_forms_each_delta_from_its_product_as_mul_does(kind):
    """Given the products BᵢAᵢ and their scales, the C block forms ΔWᵢ = scaleᵢ·BᵢAᵢ as it reads them: the same
    bits as the block given the ΔWᵢ that torch's `mul_` makes (which the test above holds to the op-by-op
    kernels), with scales float32 holds exactly and ones it rounds (rsLoRA's α/√r), one that makes subnormals and
    one that overflows to infinity; the products are only read."""
    import numpy as np

    combine_block = combine_block_of_kind(kind)
    g = torch.Generator().manual_seed(13)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-40, float("inf"), 1.0, -1.0, 0.5, 3.4e38])
    for k in (1, 3):
        for n in (15, 300):
            products = [torch.cat([specials, torch.randn(n, generator=g)])[:n].contiguous() for _ in range(k)]
            scales = torch.tensor([2.0, 16 / 8**0.5, 1e-30, 3e38][:k] if k > 1 else [16 / 8**0.5])
            deltas = [p.clone().mul_(float(s)) for p, s in zip(products, scales)]
            weights = torch.randn(k, generator=g).numpy()
            hows = [("keep_all", {}), ("magnitude", {"thresholds": np.full(k, 0.5, np.float32),
                                                     "take_equal": np.ones(k, np.uint8)}),
                    ("dare", {"keys": np.arange(2 * k, dtype=np.uint32).reshape(k, 2), "keep_below": 2**31,
                              "start": 7, "density": 0.5})]
            for mode, how in hows:
                for elect, frequency in ((True, False), (False, False)):
                    want = np.full(n, 7.0, dtype=np.float32)
                    combine_block([d.numpy() for d in deltas], want, mode, weights, elect, frequency, **how)
                    out, before = np.full(n, 7.0, dtype=np.float32), [p.clone() for p in products]
                    combine_block([p.numpy() for p in products], out, mode, weights, elect, frequency,
                                  scales=scales.numpy(), **how)
                    assert np.array_equal(out.view(np.int32), want.view(np.int32)), (k, n, mode, elect)
                    assert all(torch.equal(p.view(torch.int32), b.view(torch.int32)) for p, b in zip(products, before))


@pytest.mark.parametrize("method,density", [("ties", 0.4), ("magnitude_prune", 0.3), ("dare_ties", 0.5),
                                            ("dare_linear", 0.4), ("ties", 1.0)])
@pytest.mark.parametrize("path", ["c", "compiled", "eager"])
def test_combine_given_products_and_scales_equals_combine_given_the_deltas(monkeypatch, method, density, path):
    """`combine(products, scales=…)` (what the merge passes: ΔWᵢ never written out) stores the bits of `combine`
    given the ΔWᵢ that `mul_` forms, with thresholds found by `combine` or passed in (`scaled_threshold`, whose
    blocks' tie counts spare `combine` its count), on every path: the C loop (products only read), inductor's
    kernels and the op-by-op twin (products scaled in place first)."""
    monkeypatch.setattr(combine_module, "BLOCK", 64)
    monkeypatch.setattr(combine_module, "SAMPLE", 64)
    g = torch.Generator().manual_seed(22)
    products = [torch.randint(-2, 3, (40, 50), generator=g).float(), torch.randn(40, 50, generator=g),
                torch.randn(40, 50, generator=g) * 0.1]
    scales = {0: 2.0, 1: 16 / 8**0.5}  # adapter 2 comes as its ΔW
    weights = [0.7, -1.3, 1.0]
    deltas = [p.clone().mul_(scales[i]) if i in scales else p.clone() for i, p in enumerate(products)]
    if path == "compiled":
        monkeypatch.setattr(combine_module, "_in_c", lambda *args: False)
    elif path == "eager":
        monkeypatch.setenv("QMERGE_NO_COMPILE", "1")
    want = combine(deltas, weights, method, density, "total", seed=5, tensor="f")
    sparse = method in ("ties", "magnitude_prune") and density < 1
    known = {i: combine_module.scaled_threshold(products[i], s, density) for i, s in scales.items()} if sparse else {}
    assert not sparse or known[0].by_block is not None  # ties partly kept: counted per block by the bracket
    for thresholds in ({}, known):
        given = [p.clone() for p in products]
        got = combine(given, weights, method, density, "total", seed=5, tensor="f", thresholds=thresholds,
                      scales=scales)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), thresholds
        if path == "c":
            assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(given, products))


def test_ties_straddling_blocks_are_counted_once_by_the_bracket(monkeypatch):
    """Threshold-equal entries spread over many blocks, only some of them kept: with the bracket's per-block tie
    counts (`TopK.by_block`) `combine` counts them in no block but the one where each adapter's quota runs out
    (its prefix sum), and keeps the same entries as when it counts them block by block itself."""
    monkeypatch.setattr(combine_module, "BLOCK", 100)
    monkeypatch.setattr(combine_module, "SAMPLE", 64)
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randint(-3, 4, (30, 40), generator=g).float() for _ in range(2)]
    thresholds = {i: combine_module._threshold(d, 0.3) for i, d in enumerate(deltas)}
    assert all(0 < t.kept < t.equal and t.by_block is not None for t in thresholds.values())  # partly kept ties
    counted = []
    real = torch.count_nonzero
    monkeypatch.setattr(torch, "count_nonzero", lambda *a, **k: counted.append(1) or real(*a, **k))
    fused = combine([d.clone() for d in deltas], [1.0, 1.0], "ties", 0.3, thresholds=thresholds)
    assert len(counted) == 2  # the prefix-sum block of each adapter
    unblocked = {i: t._replace(by_block=None) for i, t in thresholds.items()}
    plain = combine([d.clone() for d in deltas], [1.0, 1.0], "ties", 0.3, thresholds=unblocked)
    assert len(counted) > 2 + 2 and torch.equal(fused.view(torch.int32), plain.view(torch.int32))


def test_bracket_pass_without_a_working_compiler_falls_back_or_raises(monkeypatch, tmp_path):
    """A compiler that fails: numpy takes over with a warning naming the compiler's error; under
    QMERGE_COMPILE_STRICT=1 (the suite's setting) it is an error instead."""
    import numpy as np

    from qmerge.errors import KernelCompileError
    from qmerge.ops import native

    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'bracket.c: simulated failure' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    block = np.ones(40, dtype=np.float32)
    try:
        native._library.cache_clear()
        with pytest.raises(KernelCompileError, match="simulated failure"):
            native.count_and_gather(block, 0.5, 2.0)
        native._library.cache_clear()
        monkeypatch.setenv("QMERGE_COMPILE_STRICT", "0")
        assert native.count_and_gather(block, 0.5, 2.0) is None
        assert combine_module._count_and_gather(block, 0.5, 2.0)[0] == 0  # numpy's pass
    finally:
        native._library.cache_clear()  # the next test builds with the real compiler again


def test_a_damaged_helper_in_the_cache_is_built_again_and_cc_may_carry_arguments(monkeypatch, tmp_path):
    """A file under the helper's name that does not load (a copy cut short, another host's build on a shared cache)
    was kept, and every process fell back to the slow path for good: it is built again. `$CC = "ccache gcc"`-style
    commands are split as a shell would (they were ignored); the name keys the machine and the compiler's version."""
    import numpy as np

    from qmerge.ops import native

    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    wrapper = tmp_path / "wrap"  # a launcher in front of the compiler, as ccache is
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\nexec "$@"\n')
    wrapper.chmod(0o755)
    compiler = native._compiler()
    monkeypatch.setenv("CC", f"{wrapper} {compiler[0]}")
    assert native._compiler() == [str(wrapper), compiler[0]]
    target = tmp_path / "cache" / "native" / native._helper_name(native._compiler())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF" + b"\0" * 60)
    block = np.ones(40, dtype=np.float32)
    try:
        native._library.cache_clear()
        assert native.count_and_gather(block, 0.5, 2.0)[0] == 0
        assert target.stat().st_size > 64 and "-march=x86-64" in (tmp_path / "calls").read_text() or \
            native.platform.machine() not in native.BASELINE
    finally:
        native._library.cache_clear()
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native._helper_name(native._compiler()) != target.name


def test_the_c_helper_is_built_once_when_both_worker_threads_ask_for_it_at_once(monkeypatch, tmp_path):
    """The bracket pass's blocks start on two threads together: the first call builds the helper, the other waits
    for it and loads the same library, instead of compiling it a second time."""
    import threading
    import time

    from qmerge.ops import native

    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    builds = []
    real = native._build

    def slow_build(compiler, target):
        builds.append(target)
        time.sleep(0.3)  # both threads are inside _library before the first build ends
        real(compiler, target)

    monkeypatch.setattr(native, "_build", slow_build)
    start = threading.Barrier(2)
    libraries = []

    def ask():
        start.wait()
        libraries.append(native._library())

    try:
        native._library.cache_clear()
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(builds) == 1 and libraries[0] is not None
        assert libraries[0]._name == libraries[1]._name == str(builds[0])
    finally:
        native._library.cache_clear()


def test_dare_keeps_about_density_and_is_seeded_per_tensor():
    shape = torch.Size((300, 400))
    mask = dare_mask(shape, 0.3, 0, 0, "x")
    share = float(mask.double().mean())
    assert abs(share - 0.3) < 5 * (0.3 * 0.7 / mask.numel()) ** 0.5
    assert torch.equal(mask, dare_mask(shape, 0.3, 0, 0, "x"))
    for other in ((1, 0, "x"), (0, 1, "x"), (0, 0, "y")):
        assert not torch.equal(mask, dare_mask(shape, 0.3, *other))


def _mix32_int(x: int) -> int:
    """The keep hash's mixer on Python integers (unbounded, so the products need no splitting)."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_dare_mask_is_the_documented_hash_of_each_flat_index():
    """Entry j is kept iff h(j) < ⌈density·2³²⌉, h = mix(mix(j_lo ^ k0) ^ j_hi ^ k1) with (k0, k1) the first two
    little-endian words of SHA-256("dare\\0seed\\0adapter\\0tensor"); checked on Python integers, for flat
    indices past 2³² too (a 70B embedding has ~2³⁰ entries; the high word must still count)."""
    import hashlib
    import math

    digest = hashlib.sha256(b"dare\x003\x001\x00model.layers.0.mlp.down_proj.weight").digest()
    k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")
    assert combine_module.dare_key(3, 1, "model.layers.0.mlp.down_proj.weight") == (k0, k1)
    for density in (0.1, 0.5, 0.9):
        mask = dare_mask(torch.Size((50, 40)), density, 3, 1, "model.layers.0.mlp.down_proj.weight").reshape(-1)
        limit = math.ceil(density * 2**32)
        want = [_mix32_int(_mix32_int(j ^ k0) ^ k1) < limit for j in range(mask.numel())]
        assert mask.tolist() == want
    far = [2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 7, 2**40 + 123]
    got = combine_module.keep_hash(torch.tensor(far), torch.tensor([k0, k1])).tolist()
    assert got == [_mix32_int(_mix32_int((j & 0xFFFFFFFF) ^ k0) ^ (j >> 32) ^ k1) for j in far]
    assert len(set(got)) == len(far)


def test_dare_masks_of_adapters_and_neighbours_are_uncorrelated():
    """Keep masks look independent: across adapters of one tensor, and between neighbouring entries (a row's
    next column, the next row) of one mask; each within 5 standard errors of no correlation."""
    shape = torch.Size((512, 1024))
    masks = [dare_mask(shape, 0.4, 0, i, "t").double() for i in range(3)]
    n = masks[0].numel()

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])

    assert abs(corr(masks[0], masks[1])) < 5 / n**0.5 and abs(corr(masks[1], masks[2])) < 5 / n**0.5
    assert abs(corr(masks[0][:, 1:], masks[0][:, :-1])) < 5 / n**0.5
    assert abs(corr(masks[0][1:], masks[0][:-1])) < 5 / n**0.5


@pytest.mark.parametrize("method,density", [("ties", 0.3), ("magnitude_prune", 0.5), ("dare_ties", 0.5),
                                            ("dare_linear", 0.4)])
def test_streaming_over_blocks_changes_nothing(monkeypatch, method, density):
    """Blocks of 5 elements over a 7×9 tensor (13 blocks): top-k ties that straddle blocks (adapter 0 holds only
    magnitudes 1 and 2), masks drawn block by block, the election and disjoint mean per block, all equal to the
    whole-tensor oracle."""
    monkeypatch.setattr(combine_module, "BLOCK", 5)
    deltas = _deltas(3, seed=12)
    g = torch.Generator().manual_seed(3)  # adapter 0: magnitudes 1 or 2 only, so the k-th largest is a tie that
    deltas[0] = torch.randint(1, 3, SHAPE, generator=g).float() * (torch.randint(0, 2, SHAPE, generator=g) * 2 - 1)
    kth = deltas[0].abs().reshape(-1).sort(descending=True).values[int(density * 63) - 1]
    assert int((deltas[0].abs() >= kth).sum()) > int(density * 63)  # more entries at the k-th magnitude than fit
    keep = _keep_masks(3, density, 4, "b") if method.startswith("dare") else None
    got = combine(deltas, [1.0, 0.5, 2.0], method, density, seed=4, tensor="b")
    _close(got, oracle(deltas, [1.0, 0.5, 2.0], method, density, keep=keep))


def test_result_written_over_the_first_delta_is_the_same(monkeypatch):
    """The merge writes the combination over adapter 0's delta (one whole tensor fewer): with blocks smaller than
    the tensor and top-k ties straddling them, the bits equal a combination into fresh memory."""
    monkeypatch.setattr(combine_module, "BLOCK", 5)
    deltas = _deltas(3, seed=21)
    deltas[1] = torch.randint(-2, 3, SHAPE, generator=torch.Generator().manual_seed(4)).float()  # long ties
    for method in ("ties", "magnitude_prune", "dare_ties", "dare_linear", "linear"):
        want = combine(deltas, [1.0, -0.5, 2.0], method, 0.4, seed=5, tensor="o")
        own = [d.clone() for d in deltas]
        got = combine(own, [1.0, -0.5, 2.0], method, 0.4, seed=5, tensor="o", out=own[0])
        assert got.data_ptr() == own[0].data_ptr() and torch.equal(got, want), method


def test_bit_identical_for_the_same_seed():
    deltas = _deltas(3, seed=3)
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        one = combine(deltas, [1.0, 0.5, 2.0], method, 0.4, seed=11, tensor="t")
        two = combine([d.clone() for d in deltas], [1.0, 0.5, 2.0], method, 0.4, seed=11, tensor="t")
        assert torch.equal(one, two)


# --- PEFT's merge_utils: the definitions qmerge follows ----------------------------------------------------------

@pytest.mark.parametrize("density,sign", [(0.5, "total"), (0.3, "frequency")])
def test_ties_and_magnitude_prune_equal_peft_merge_utils(density, sign):
    from peft.utils import merge_utils

    deltas = _deltas(3, seed=2)
    w = torch.tensor([0.7, 1.3, 0.25])
    _close(combine(deltas, w.tolist(), "ties", density, sign), merge_utils.ties(deltas, w, density, sign).double())
    _close(combine(deltas, w.tolist(), "magnitude_prune", density),
           merge_utils.magnitude_prune(deltas, w, density).double())
    _close(combine(deltas, w.tolist(), "linear"), merge_utils.task_arithmetic(deltas, w).double())


def test_dare_equals_peft_given_the_same_keep_mask(monkeypatch):
    """PEFT draws DARE's mask from the global RNG with torch.bernoulli; handed qmerge's masks, its arithmetic
    (drop, rescale, weight, elect, disjoint mean) gives the same result."""
    from peft.utils import merge_utils

    deltas, w, density = _deltas(3, seed=4), torch.tensor([1.0, 0.5, 2.0]), 0.4
    masks = iter(_keep_masks(3, density, 9, "t"))
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda p: next(masks).to(p.dtype))
    want = merge_utils.dare_ties(deltas, w, density, "total")
    _close(combine(deltas, w.tolist(), "dare_ties", density, seed=9, tensor="t"), want.double())


# --- mergekit's generalized task arithmetic, where its definitions coincide with PEFT's ---------------------------

def mergekit_gta(deltas, weights, consensus, normalize, sparsified):
    """mergekit `generalized_task_arithmetic`: weights applied before the sign consensus ("sum" / "count" on the
    weighted deltas), mixed = Σ masked weighted deltas, divided by Σ weights·mask when normalizing."""
    tvs = torch.stack([s.double() for s in sparsified]) * torch.tensor(weights, dtype=torch.float64)[:, None, None]
    w = torch.tensor(weights, dtype=torch.float64)[:, None, None].expand_as(tvs)
    if consensus:
        sign = tvs.sign()
        votes = tvs.sum(0) if consensus == "sum" else sign.sum(0)
        mask = sign == ((votes >= 0).double() * 2 - 1)
        mixed, divisor = (tvs * mask).sum(0), (w * mask).sum(0)
    else:
        mixed, divisor = tvs.sum(0), w.sum(0)
    divisor[divisor.abs() < 1e-8] = 1
    return mixed / divisor if normalize else mixed


@pytest.mark.parametrize("consensus,sign", [("sum", "total"), ("count", "frequency")])
def test_ties_equals_mergekit_at_unit_weights(consensus, sign):
    """With unit weights mergekit's weighted election and Σ weight·mask divisor are PEFT's count-of-agreeing mean."""
    deltas = _deltas(3, seed=6)
    trimmed = [d * top_k_mask(d, 0.4) for d in deltas]
    _close(combine(deltas, [1.0] * 3, "ties", 0.4, sign), mergekit_gta(deltas, [1.0] * 3, consensus, True, trimmed))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 1.7)])
def test_dare_linear_equals_mergekit_without_normalization(weights):
    deltas, density = _deltas(2, seed=7), 0.5
    dropped = [d * m / density for d, m in zip(deltas, _keep_masks(2, density, 1, "t"))]
    _close(combine(deltas, list(weights), "dare_linear", density, seed=1, tensor="t"),
           mergekit_gta(deltas, list(weights), None, False, dropped))


def test_the_oracle_can_fail():
    """The transcription is not a copy of the implementation: a wrong election rule is caught."""
    deltas = _deltas(3, seed=8)
    got = combine(deltas, [1.0] * 3, "ties", 0.5, "total")
    wrong = oracle(deltas, [1.0] * 3, "ties", 0.5, "frequency")
    assert float((got.double() - wrong).abs().max()) > 1e-3


@pytest.mark.parametrize("method,density,sign", [
    ("ties", 0.4, "total"), ("ties", 0.3, "frequency"), ("magnitude_prune", 0.3, "total"), ("ties", 1.0, "total"),
    ("magnitude_prune", 1.0, "total"), ("dare_ties", 0.5, "total"), ("dare_linear", 0.4, "total"),
    ("dare_linear", 1.0, "total")])
@pytest.mark.parametrize("path", ["c", "compiled"])
def test_fused_blocks_give_the_op_by_op_bits(monkeypatch, method, density, sign, path):
    """The fused block kernels (trim or drop, election, disjoint mean or weighted sum in one pass) write the same
    float32 bits as the op-by-op twin, over blocks that threshold ties straddle (where the prefix-sum block takes
    the twin inside the same run), exact zeros and weights of both signs; and the fused code really ran. Both
    fused forms: qmerge's C helper (CPU) and the inductor-compiled kernels (what other devices take)."""
    from qmerge.ops import native

    monkeypatch.setattr(combine_module, "BLOCK", 64)
    g = torch.Generator().manual_seed(21)
    deltas = [torch.randn(40, 50, generator=g) * scale for scale in (1.0, 1e-2, 0.3)]
    deltas[0] = torch.randint(-2, 3, (40, 50), generator=g).float()  # magnitudes 0, 1, 2: ties and zeros
    deltas[2][::3] = 0.0
    weights = [0.7, -1.3, 1.0]
    kernel = (combine_module.MAGNITUDE if method in ("ties", "magnitude_prune") and density < 1
              else combine_module.DARE if method.startswith("dare") and density < 1 else combine_module.MASKED)
    before, c_calls = kernel.ran, []
    if path == "compiled":
        monkeypatch.setattr(combine_module, "_in_c", lambda *args: False)
    else:
        real = native.combine_block
        monkeypatch.setattr(native, "combine_block", lambda *a, **k: c_calls.append(real(*a, **k)))
    fused = combine(deltas, weights, method, density, sign, seed=5, tensor="f")
    assert (kernel.ran > before) if path == "compiled" else (len(c_calls) > 0 and kernel.ran == before)
    monkeypatch.setenv("QMERGE_NO_COMPILE", "1")
    eager = combine(deltas, weights, method, density, sign, seed=5, tensor="f")
    assert torch.equal(fused.view(torch.int32), eager.view(torch.int32))
    if not method.startswith("dare") or density == 1.0:  # density 1: nothing dropped, no masks to give the oracle
        _close(fused.reshape(40, 50), oracle(deltas, weights, method, density, sign,
                                                   [torch.ones(40, 50, dtype=torch.bool)] * 3))
