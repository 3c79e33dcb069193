"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323): layer-wise quantization that minimises ‖WX − QX‖² column by column,
spreading each column's rounding error over the not-yet-quantized columns through the inverse Hessian.

Shaped like llm-compressor's `modifiers/gptq/gptq_quantize.py`: `make_empty_hessian`, `accumulate_hessian`
(running mean, float32) and `quantize_weight`. The per-group grid (`find_params`, `quantize`, `dequantize`)
is the one GPTQ checkpoints store: min/max asymmetric or symmetric, scales rounded to fp16 *before* use
(the format stores fp16 scales, so the error the solver feeds back is the error of what is stored), zero
points in [1, 2^bits] (the v1 format stores zero − 1 as an unsigned `bits`-bit field).
Where and why this departs from IST-DASLab's and GPTQModel's GPTQ: docs/design.md, "GPTQ: where qmerge differs".

With an asymmetric target (GPTAQ, Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration", arXiv:2504.02692) the objective is ‖QX − WX̃‖², X̃ the layer's inputs in the unquantized model:
`accumulate_cross` collects ΔXXᵀ = 2(X̃ − X)Xᵀ/n beside H and `asymmetric_update` turns it into the extra
per-column update the solver applies.

Pure tensor math, no I/O. Computes in GPTQ_PRECISION, or float64 when handed float64 (test oracles).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterable, NamedTuple

import torch

from qmerge.errors import BadInputError

GPTQ_PRECISION = torch.float32
SUPPORTED_BITS = (2, 3, 4, 8)
MAX_DAMP = 1.0  # dampening is retried ×10 up to this fraction of mean(diag H), then we give up
log = logging.getLogger("qmerge")


class HessianNotPositiveDefinite(ValueError):
    """Cholesky of the dampened Hessian failed at every dampening tried (e.g. inf/NaN activations)."""


class GPTQResult(NamedTuple):
    weight: torch.Tensor  # dequantized Q, [out, in], the solver's precision
    scales: torch.Tensor  # [groups, out], values exactly representable in fp16
    zeros: torch.Tensor  # [groups, out] int32, in [1, 2^bits]
    g_idx: torch.Tensor  # [in] int32: group of each input column
    error: float  # the paper's objective Σ (w − q)² / [H⁻¹]_qq / 2 (Alg. 1), summed over rows


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else GPTQ_PRECISION


def max_code(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits = {bits} is not supported; use one of {SUPPORTED_BITS}")
    return 2**bits - 1


# ---- the grid: per-row scale and zero point over a block of columns, and its quantize/dequantize pair ----

MSE_GRID = 100  # scale search: shrink the range in steps of 1/MSE_GRID ...
MSE_MAXSHRINK = 0.8  # ... down to (1 − MSE_MAXSHRINK) of min/max (GPTQ's and llm-compressor's MSE observer's values)
MSE_NORM = 2.4  # the error each candidate grid is scored by: Σ|w − q|^MSE_NORM per row (same sources)
SCALE_SEARCHES = ("minmax", "mse")


def find_params(w: torch.Tensor, bits: int, sym: bool, search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of `w` [rows, cols] from its min/max (range always includes 0, as GPTQ does).

    search "mse": the range [p·min, p·max] for p = 1, 0.99, ... 0.21 whose grid rounds the row with the least
    Σ|w − q|^2.4, per row (clipping a few outliers for a finer grid; ties keep the widest range)."""
    maxq = max_code(bits)
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if search == "minmax":
        return _grid(xmin, xmax, maxq, sym)
    if search != "mse":
        raise ValueError(f"scale search {search!r} is not one of {SCALE_SEARCHES}")
    best = torch.full_like(xmin, math.inf)
    scale = zero = None
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s, z = _grid(p * xmin, p * xmax, maxq, sym)
        err = (fake_quantize(w, s.unsqueeze(1), z.unsqueeze(1), bits) - w).abs_().pow_(MSE_NORM).sum(dim=1)
        better = err < best
        if scale is None:
            scale, zero = s, z
        else:
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        best = torch.where(better, err, best)
    return scale, zero


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16-exact scale and the zero point of the grid spanning [xmin ≤ 0, xmax ≥ 0] per row."""
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row still needs a finite, non-zero scale
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = _fp16_exact((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        # v1 stores zero − 1 unsigned, so zero 0 is unrepresentable: such a group (all w > −scale/2) gets the
        # grid [−s, (maxq − 1)·s] with zero 1, which still covers [xmin, xmax] (xmin > −scale/2 > −s).
        low = zero < 1
        scale = torch.where(low, _fp16_exact(xmax / (maxq - 1)), scale)
        zero = torch.where(low, 1.0, zero)
    return scale, zero.clamp(1, maxq + 1)


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """The nearest fp16 value (what the checkpoint stores), kept positive and finite."""
    tiny = torch.finfo(torch.float16).smallest_normal
    return scale.clamp(tiny, torch.finfo(torch.float16).max).to(torch.float16).to(scale.dtype)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(w / s) + z, 0, 2^bits − 1); `scale`, `zero` broadcast against `w`."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, bits), scale, zero)


def group_count(columns: int, group_size: int) -> int:
    """Groups along the input dimension; group_size −1 means one group per output row (per channel)."""
    size = columns if group_size == -1 else group_size
    if size <= 0 or columns % size:
        raise ValueError(f"group_size {group_size} does not divide {columns} input features")
    return columns // size


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int, sym: bool, search: str = "minmax") -> GPTQResult:
    """The baseline GPTQ improves on: every group's grid from the original weights, each weight rounded alone."""
    w = w.to(_math_dtype(w))
    rows, cols = w.shape
    groups = group_count(cols, group_size)
    size = cols // groups
    grouped = w.reshape(rows, groups, size)
    scale, zero = find_params(grouped.permute(1, 0, 2).reshape(groups * rows, size), bits, sym, search)
    scale, zero = scale.reshape(groups, rows), zero.reshape(groups, rows)
    q = fake_quantize(grouped, scale.T.unsqueeze(-1), zero.T.unsqueeze(-1), bits).reshape(rows, cols)
    g_idx = torch.arange(cols, dtype=torch.int32) // size
    return GPTQResult(q, scale, zero.to(torch.int32), g_idx, 0.0)


def codes_from_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """Integer codes [out, in] of a dequantized weight on its grid (exact: q = s·(c − z) with |c − z| ≤ 256)."""
    g = g_idx.long().to(q.device)
    codes = torch.empty(q.shape, dtype=torch.int32, device=q.device)
    step = max(1, BAND // max(1, q.shape[1]))
    for r in range(0, q.shape[0], step):  # a band of rows at a time: its float temporaries stay small
        c = torch.round(q[r:r + step] / scales.T[r:r + step][:, g] + zeros.T[r:r + step][:, g].to(q.dtype))
        if c.min() < 0 or c.max() > max_code(bits):
            raise ValueError("weight is not on its quantization grid")
        codes[r:r + step] = c.to(torch.int32)
    return codes


def dequantize_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       dtype: torch.dtype = GPTQ_PRECISION) -> torch.Tensor:
    """W [out, in] = scales[g_idx] · (codes − zeros[g_idx]), codes [out, in], scales/zeros [groups, out]."""
    g = g_idx.long()
    return scales.to(dtype).T[:, g] * (codes.to(dtype) - zeros.to(dtype).T[:, g])


# ---- the Hessian H = 2XXᵀ/n of the layer's inputs (paper Sec. 3, eq. 1) ----

def make_empty_hessian(columns: int, device: torch.device | str | None = None,
                       dtype: torch.dtype = GPTQ_PRECISION) -> torch.Tensor:
    return torch.zeros((columns, columns), device=device, dtype=dtype)


def accumulate_hessian(x: torch.Tensor, hessian: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Adds the rows of `x` [..., in] (one per token) to the running mean H = 2/n Σ x xᵀ, in place.

    A running mean (scale the old sum, add the new scaled by 2/n) keeps H's magnitude independent of how
    many tokens were seen, so float32 accumulation does not drift as n grows (as llm-compressor does)."""
    flat = x.reshape(-1, x.shape[-1])
    added = flat.shape[0]
    if added == 0:
        return hessian, count
    hessian *= count / (count + added)
    count += added
    scale = (2.0 / count) ** 0.5
    converted = flat.to(device=hessian.device, dtype=hessian.dtype)
    # scaled in place when the conversion made a copy (bf16 forwards), else into a new tensor (the caller's x)
    add_gram(hessian, converted.mul_(scale) if converted.data_ptr() != flat.data_ptr() else converted * scale)
    return hessian, count


def accumulate_cross(x: torch.Tensor, target: torch.Tensor, cross: torch.Tensor, count: int) -> torch.Tensor:
    """Adds the tokens of `x` [..., in] (the inputs the quantized model gives the layer) and `target` (the same
    tokens' inputs in the unquantized model) to the running mean 2/n Σ (x̃ − x) xᵀ, in place. `count`: the tokens
    already in it (H's count before the same batch is added, so the two stay the same mean)."""
    flat = x.reshape(-1, x.shape[-1]).to(device=cross.device, dtype=cross.dtype)
    added = flat.shape[0]
    if added == 0:
        return cross
    cross *= count / (count + added)
    delta = target.reshape(-1, target.shape[-1]).to(device=cross.device, dtype=cross.dtype) - flat
    cross.addmm_(delta.T, flat, alpha=2.0 / (count + added))
    return cross


# Rows of H per product in `add_gram`: the blocks on and above the diagonal of an n×n Hessian cost
# (n + GRAM_BLOCK)/2n of the full product (down_proj's 1536²: 58 %; 11008²: 51 %), each product still wide enough to
# run at full matmul speed.
GRAM_BLOCK = 256


def add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += xᵀx, in place, h symmetric: each block of GRAM_BLOCK rows is computed from the diagonal rightwards in
    one matmul and mirrored below it, so the product costs about half of the full xᵀx. The mirrored entries are
    the same float as their transposes (the full product does not promise that, nor does a diagonal block's own
    matmul on every BLAS: AVX2 kernels on AMD EPYC leave it off by an ulp, so its lower half is mirrored too)."""
    n = x.shape[1]
    for i in range(0, n, GRAM_BLOCK):
        j = min(i + GRAM_BLOCK, n)
        h[i:j, i:].addmm_(x[:, i:j].T, x[:, i:])
        h[j:, i:j] = h[i:j, j:].T
        _mirror_upper(h[i:j, i:j])


def _mirror_upper(block: torch.Tensor) -> None:
    """A square block's strict lower triangle := its upper one, transposed, in place."""
    rows, cols = torch.tril_indices(*block.shape, offset=-1)
    block[rows, cols] = block[cols, rows]


# ---- the solver (paper Alg. 1) ----

def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H) (paper Sec. 3, Step 3), retried ×10."""
    mean_diag = torch.diagonal(h).mean()
    tried = damp
    while True:
        # H + λI without an n×n identity and its scaled copy (three n² temporaries on an 11008² Hessian: 1.5 GB):
        # adding 0.0 everywhere first keeps the bits of `h + eye·λ` (-0.0 + 0.0 = +0.0 there too).
        damped = h.clone().add_(0.0)
        damped.diagonal().add_(tried * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0 and torch.isfinite(lower).all():
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if info == 0 and torch.isfinite(upper).all():
                return upper, tried
        tried = _next_damp(tried, damp)


def _next_damp(tried: float, asked: float) -> float:
    """The damping to retry with after `tried` failed: ×10, up to MAX_DAMP."""
    if tried * 10 > MAX_DAMP * (1 + 1e-9):
        raise HessianNotPositiveDefinite(
            f"Hessian is not positive definite even with damp = {tried:g} (tried from {asked:g}); "
            "its inputs may contain inf/NaN or be degenerate")
    return tried * 10


def _block_size(block_size: int, group_size: int, groups: int) -> int:
    """Blocks that never split a group (unless one group spans all), so every group's grid is found on
    fully updated weights, as in the column-by-column algorithm: the result does not depend on block_size."""
    if groups == 1 or group_size % block_size == 0:
        return block_size
    if group_size < block_size:
        return (block_size // group_size) * group_size
    return group_size


def _one_cpu_thread(device: torch.device) -> contextlib.AbstractContextManager:
    """The solve is thousands of small ops and one small Cholesky: intra-op threads only add synchronisation,
    which on a busy machine dominates (measured, 2 shared cores: 576×1536 took 28.7 s with 2 threads, 0.6 s
    with 1)."""
    return _threads(1, device)


@contextlib.contextmanager
def _threads(count: int, device: torch.device):
    if device.type != "cpu" or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The lazy batch update of a block (err1 @ H⁻¹[block, rest], one matmul of rows × rest × block) is worth the intra-op
# threads the rest of the solve avoids from this many updated entries on: a 7B layer's 12288 × 4096 q/k/v update
# is 13 GFLOP per block. Below it (every SmolLM2 linear) one thread, as before, so small models keep their bytes.
THREADED_UPDATE_FROM = 2**22
# Likewise the column loop as a whole, once each of its ops touches a block of this many entries (rows × block):
# a 7B layer's stacked q/k/v is 12288 × 128 per op, where one thread left the second core idle for most of the
# layer (GPTQModel, multi-threaded throughout, was 1.27× faster on the 7B slice). SmolLM2's largest group, gate/up
# with 3072 rows, stays below it on one thread.
THREADED_COLUMNS_FROM = 2**19
# Such a large solve also splits its blocks into sub-blocks of this many columns (`_solve`'s `sub`): each column's
# rank-1 update then touches rows × 32 entries instead of rows × the rest of the block (7B q/k/v: 7.2 → 5.1 s).
SUB_BLOCK = 32


class InverseHessian(NamedTuple):
    """What GPTQ needs of H, computed once for every linear that shares it (q/k/v, gate/up read one input)."""

    hinv: torch.Tensor  # upper Cholesky factor of (H + λI)⁻¹, columns in `perm` order
    perm: torch.Tensor | None  # act-order: columns by decreasing diag H
    damp: float  # the damping actually used


# From this size on the Cholesky factorisations (n³) outweigh the thread synchronisation that made one thread
# faster for small H: 2 threads on an 11008² Hessian take about half the time; such an H is also inverted the cheaper
# way (`_inverse_cholesky_reversed`). Below it, one thread and the small path, as before (so small models give the
# same bytes as earlier releases).
THREADED_CHOLESKY_FROM = 2048


def inverse_hessian(hessian: torch.Tensor, damp: float, desc_act: bool,
                    dtype: torch.dtype = GPTQ_PRECISION) -> InverseHessian:
    if hessian.shape[0] >= THREADED_CHOLESKY_FROM:
        return _inverse_reversed(hessian, damp, desc_act, dtype)
    h = hessian.to(dtype).clone()
    dead = torch.diagonal(h) == 0
    # A column no calibration token ever activated has no curvature: diag 1 decouples it (its off-diagonal
    # entries are 0 already), so it is rounded to nearest and its error reaches no other column.
    h[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if desc_act else None
    if perm is not None:  # one n² copy at a time
        h = h.index_select(0, perm)
        h = h.index_select(1, perm)
    with _one_cpu_thread(h.device):
        hinv, used = _inverse_cholesky(h, damp)
    return InverseHessian(hinv, perm, used)


def _inverse_reversed(hessian: torch.Tensor, damp: float, desc_act: bool, dtype: torch.dtype) -> InverseHessian:
    """`inverse_hessian` of a large H, factored in reversed column order (H' = JHJ, J the reversal): with
    H' + λI = L'L'ᵀ, the upper Cholesky factor of (H + λI)⁻¹ is J L'⁻¹ J. One Cholesky and one triangular inverse
    (~n³ flops) where the small path's Cholesky, inverse and second Cholesky take ~2n³, all in one n² buffer
    beside H (reordered, factored, inverted and reversed in place): an 11008² down_proj
    took 2.5× less time and 1.5 n² of memory beside H instead of 3.6 n². The same factor up to float rounding; dead
    columns and damping retries as `_inverse_cholesky`. The factor returned is column-major (a transposed view)."""
    diag = torch.diagonal(hessian).to(dtype)
    dead = diag == 0
    diag = torch.where(dead, 1.0, diag)
    perm = torch.argsort(diag, descending=True, stable=True) if desc_act else None
    order = (perm if perm is not None else torch.arange(diag.shape[0], device=diag.device)).flip(0)
    mean_diag = diag.mean()
    tried, h_device = damp, hessian.device
    while True:
        lower = hessian.index_select(0, order).to(dtype)
        for rows in _chunks(lower):  # the columns reordered a band of rows at a time: no second n² copy
            rows.copy_(rows.index_select(1, order))
        dead_reversed = dead[order]
        lower[dead_reversed, dead_reversed] = 1
        lower.diagonal().add_(tried * mean_diag)
        # factored through its column-major view (the same matrix, H being symmetric), which LAPACK takes as it is:
        # a row-major one torch copies first. The factor is then column-major too, and so is the result.
        factor = lower.mT
        info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32, device=h_device)))[1]
        if info == 0 and _finite(lower):
            _lower_inverse_(factor)
            if not _finite(lower):
                raise HessianNotPositiveDefinite(f"the inverse of H's Cholesky factor overflowed (damp = {tried:g});"
                                                 " its inputs may contain inf/NaN or be degenerate")
            return InverseHessian(_reverse_(factor), perm, tried)
        del lower, factor
        tried = _next_damp(tried, damp)


# Entries per band of rows where the large path works on an n² matrix a band at a time (16 MB in float32).
BAND = 1 << 22


def _chunks(m: torch.Tensor) -> list[torch.Tensor]:
    """`m` as bands of whole rows of about BAND entries each (views)."""
    return list(m.split(max(1, BAND // max(1, m.shape[1]))))


def _finite(m: torch.Tensor) -> bool:
    """torch.isfinite(m).all() a band at a time (whole, it takes a bool and a float temporary of m's size)."""
    return all(bool(torch.isfinite(rows).all()) for rows in _chunks(m))


# `_lower_inverse_` solves blocks up to this size directly; larger ones are split in two.
TRIANGULAR_BLOCK = 512


def _lower_inverse_(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L, in place, recursively: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹CA⁻¹, D⁻¹]] (as
    LAPACK's trtri, which torch does not expose). Two matmuls per level (~2n³/3 flops, against n³ for a triangular
    solve of the identity) and n²/2 of temporaries at the top level."""
    n = lower.shape[0]
    if n <= TRIANGULAR_BLOCK:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return lower
    k = n // 2
    _lower_inverse_(lower[:k, :k])
    _lower_inverse_(lower[k:, k:])
    c = lower[k:, :k]
    c.copy_(lower[k:, k:] @ (c @ lower[:k, :k])).neg_()
    return lower


def _reverse_(m: torch.Tensor) -> torch.Tensor:
    """m.flip((0, 1)) in place, a band of rows at a time from either end (flip would copy all of m)."""
    n = m.shape[0]
    step = _chunks(m)[0].shape[0]
    for i in range(0, n // 2, step):
        j = min(i + step, n // 2)
        top = m[i:j].flip((0, 1))
        m[i:j] = m[n - j:n - i].flip((0, 1))
        m[n - j:n - i] = top
    if n % 2:
        m[n // 2] = m[n // 2].flip(0)
    return m


def asymmetric_update(cross: torch.Tensor, inverse: InverseHessian, alpha: float) -> torch.Tensor:
    """P = α·((ΔXXᵀ Uᵀ) ⊙ strict upper triangle) U, U the upper Cholesky factor of H⁻¹, in the solve's column order
    (GPTAQ's "Cholesky reformulation", arXiv:2504.02692 Sec. 4). Row p of P is α·ΔXXᵀ[p, F]·H_F⁻¹ over the columns F
    after p: once column p is fixed, the part of its target w_p·X̃_p that its own input X_p no longer carries,
    w_p·(X̃_p − X_p), is moved onto the columns still free, by least squares in their H. α: the authors' shrinkage
    of that move (their default 0.25), as ΔXXᵀ and H are estimated from the same finite calibration set."""
    d = cross.to(inverse.hinv)
    if inverse.perm is not None:
        d = d.index_select(0, inverse.perm).index_select(1, inverse.perm)
    threads = contextlib.nullcontext() if d.shape[0] >= THREADED_CHOLESKY_FROM else _one_cpu_thread(d.device)
    with threads:
        p = (d @ inverse.hinv.T).triu_(1)
        del d
        p = p @ inverse.hinv
    return p.mul_(alpha)


def quantize_weight(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                    desc_act: bool, damp: float, block_size: int = 128,
                    inverse: InverseHessian | None = None, search: str = "minmax",
                    asymmetry: torch.Tensor | None = None, static_groups: bool = False) -> GPTQResult:
    """GPTQ of `w` [out, in] given H [in, in]; neither input is modified. `inverse`: `inverse_hessian` of the same
    H, damp and desc_act when the caller already has it (linears that share an input share it).

    Columns go in order (or by decreasing diag H with `desc_act`, Sec. 4 "act-order"); each group's grid is
    found when its first column is reached (in that order; g_idx maps columns back to groups). Lazy batch
    updates (Sec. 3, Step 2): the error of a block of columns reaches later columns in one matmul. `search`:
    how each group's grid is found (`find_params`). `asymmetry`: `asymmetric_update` of the same inverse (GPTAQ):
    after each column is quantized, its value just before (w_p) moves the later columns by w_p·P[p, later].
    `static_groups`: every group's grid is found up front on the weights as given, over contiguous columns, before
    any column is quantized (GPTQ's `static_groups`); with act-order the columns are still solved in act order,
    but g_idx is the plain column // group_size, so kernels need no reordering (and compressed-tensors, which
    keeps no g_idx, can hold it)."""
    return quantize_weights([w], hessian, bits, group_size, sym, desc_act, damp, block_size, inverse, search,
                            asymmetry, static_groups)[0]


def quantize_weights(ws: list[torch.Tensor], hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                     desc_act: bool, damp: float, block_size: int = 128,
                     inverse: InverseHessian | None = None, search: str = "minmax",
                     asymmetry: torch.Tensor | None = None, static_groups: bool = False) -> list[GPTQResult]:
    """`quantize_weight` of several weights that read the same input (q/k/v; gate/up), solved as one: every step
    of Alg. 1 acts on each row alone given the shared H⁻¹, so stacking the rows gives each weight the result it
    gets alone, with one pass of the column loop instead of one per weight."""
    dtype = _math_dtype(ws[0])
    w = torch.cat([x.to(dtype) for x in ws]) if len(ws) > 1 else ws[0].to(dtype)  # copied below
    cols = w.shape[1]
    max_code(bits)  # validates bits before any work
    groups = group_count(cols, group_size)
    size = cols // groups
    inverse = inverse or inverse_hessian(hessian.to(w.device), damp, desc_act, dtype)
    perm, used = inverse.perm, inverse.damp
    g_idx = torch.arange(cols, dtype=torch.int32, device=w.device) // size  # of each column in solve order
    fixed = None
    if static_groups and groups > 1:
        grids = [find_params(w[:, g * size:(g + 1) * size], bits, sym, search) for g in range(groups)]
        fixed = torch.stack([s for s, _ in grids]), torch.stack([z for _, z in grids])
        if perm is not None:
            g_idx = (perm // size).to(torch.int32)
    # the solve works on Wᵀ (columns as rows, in solve order): each column it reads and writes is contiguous, where a
    # column of W is `rows` cache lines apart (same arithmetic, same bits; 2× faster on a 7B layer)
    wt = w.T.index_select(0, perm) if perm is not None else w.T.clone(memory_format=torch.contiguous_format)
    del w
    threads, step = torch.get_num_threads(), _block_size(block_size, size, groups)
    large = wt.shape[1] * step >= THREADED_COLUMNS_FROM
    with _threads(threads if large else 1, wt.device):
        wt, scales, zeros, losses = _solve(wt, inverse.hinv, bits, sym, size, step, threads, search, asymmetry,
                                           (*fixed, g_idx.tolist()) if fixed is not None else None,
                                           _sub_block(step, size) if large else step)
    if used != damp:
        log.warning("GPTQ: Hessian needed damp = %g (asked %g)", used, damp)
    if perm is not None:
        inverse = torch.argsort(perm)
        w, g_idx = wt.T.index_select(1, inverse), g_idx[inverse]
    else:
        w = wt.T.contiguous()
    del wt
    zeros = zeros.to(torch.int32)
    results, start = [], 0
    for x in ws:
        end = start + x.shape[0]
        results.append(GPTQResult(w[start:end], scales[:, start:end].contiguous(), zeros[:, start:end].contiguous(),
                                  g_idx, float(losses[start:end].sum())))
        start = end
    return results


def _sub_block(step: int, size: int) -> int:
    """Columns per sub-block of a large solve's blocks: divides the block, and every group starts a sub-block (a
    group's grid needs its columns updated by all earlier ones when its first column is reached)."""
    sub = math.gcd(step, size, SUB_BLOCK)
    return sub if sub >= 8 else step


def _solve(wt: torch.Tensor, hinv: torch.Tensor, bits: int, sym: bool, size: int, step: int,
           threads: int = 1, search: str = "minmax",
           asymmetry: torch.Tensor | None = None, fixed: tuple | None = None,
           sub: int | None = None) -> tuple[torch.Tensor, ...]:
    """Alg. 1 over the rows of `wt` = Wᵀ [cols, rows] (W's columns, possibly permuted, in solve order), with `hinv`
    the upper Cholesky factor of H⁻¹; returns the quantized Wᵀ (in place), scales, zeros and losses. Runs on the
    threads the caller set (one for small weights, see `_one_cpu_thread`); the lazy batch updates of large weights
    get `threads`. `sub`: within a block, a column's error reaches the rest of its sub-block of `sub` columns at
    once and the rest of the block in one matmul per sub-block (the lazy batch update again, one level down);
    `sub` = `step` is the plain algorithm. Same result up to float rounding in the order updates are summed.
    `asymmetry`: GPTAQ's P; column p's pre-quantization value w_p adds w_p·P[p, later] to the later columns, in the
    same lazy way, so the result does not depend on the block size (the authors' code feeds the later blocks the
    quantized values instead). `fixed`: (scales, zeros, group of each column in solve order), static groups' grids
    found up front."""
    cols, rows = wt.shape
    groups = cols // size
    sub = sub or step
    dtype = wt.dtype
    if fixed is not None:
        scales, zeros, group_of = fixed
    else:
        scales = torch.empty(groups, rows, dtype=dtype, device=wt.device)
        zeros = torch.empty(groups, rows, dtype=dtype, device=wt.device)
    losses = torch.zeros(rows, dtype=dtype, device=wt.device)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1, hinv1 = wt[i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        if asymmetry is not None:
            before1, p1 = torch.empty_like(w1), asymmetry[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if fixed is not None:
                    s, z = scales[group_of[col]], zeros[group_of[col]]
                else:
                    if col % size == 0:  # the group's grid, on its columns as updated so far
                        source = w1[i:i + size] if i + size <= i2 - i1 else wt[col:col + size]
                        scales[col // size], zeros[col // size] = find_params(source.T.contiguous(), bits, sym,
                                                                              search)
                    s, z = scales[col // size], zeros[col // size]
                q = fake_quantize(w1[i], s, z, bits)
                err = (w1[i] - q) / hinv1[i, i]
                if asymmetry is not None:
                    before1[i] = w1[i]
                    w1[i + 1:j2] += before1[i].unsqueeze(0) * p1[i, i + 1:j2].unsqueeze(1)
                w1[i:j2] -= err.unsqueeze(0) * hinv1[i, i:j2].unsqueeze(1)
                w1[i] = q
                err1[i] = err
            if j2 < i2 - i1:
                w1[j2:] -= hinv1[j1:j2, j2:].T @ err1[j1:j2]
                if asymmetry is not None:
                    w1[j2:] += p1[j1:j2, j2:].T @ before1[j1:j2]
        losses += err1.square().sum(dim=0) / 2  # (w − q)² / d² / 2 per column, summed once per block
        wt[i1:i2] = w1
        with _threads(threads if w1.shape[1] * (cols - i2) >= THREADED_UPDATE_FROM else 1, wt.device):
            wt[i2:] -= hinv[i1:i2, i2:].T @ err1
            if asymmetry is not None:
                wt[i2:] += asymmetry[i1:i2, i2:].T @ before1
    return wt, scales, zeros, losses


def errors_need_hessian(inputs: list[torch.Tensor] | None, columns: int) -> bool:
    """Whether `output_errors` reads H (else X): without inputs, or with as many tokens as input features."""
    tokens = sum(x.numel() // x.shape[-1] for x in inputs) if inputs else 0
    return not tokens or tokens >= columns


def output_errors(deltas: Iterable[torch.Tensor], hessian: torch.Tensor | None,
                  inputs: list[torch.Tensor] | None = None) -> list[float]:
    """`output_error` of each delta of one linear, taken one at a time (a generator of deltas keeps one alive). With
    the layer inputs X at hand and fewer tokens than input features, from X itself: ‖Δ Xᵀ‖² / n = tr(Δ H Δᵀ) / 2
    costs rows·in·tokens instead of rows·in² (a 7B layer calibrated on 1024 tokens: 11× less for down_proj's 11008
    inputs); `hessian` may then be None (`errors_need_hessian`)."""
    tokens = sum(x.numel() // x.shape[-1] for x in inputs) if inputs else 0
    if hessian is not None and errors_need_hessian(inputs, hessian.shape[0]):
        return [output_error(d, hessian) for d in deltas]
    if not tokens:
        raise ValueError("output_errors needs H or the inputs")
    sums = []
    for delta in deltas:
        delta = delta.to(GPTQ_PRECISION)
        total = torch.zeros((), dtype=torch.float64, device=delta.device)
        for x in inputs:
            total += (x.reshape(-1, x.shape[-1]).to(delta) @ delta.T).square().sum(dtype=torch.float64)
        sums.append(float(total) / tokens)
    return sums


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖ΔW X‖² / n from H = 2XXᵀ/n: tr(ΔW H ΔWᵀ) / 2 (no second pass over the activations). A reported
    figure, so the matmul runs in the inputs' precision (float32 in the stage) and only the sum in float64."""
    dtype = torch.promote_types(delta.dtype, hessian.dtype)
    delta = delta.to(dtype)
    return float((delta @ hessian.to(device=delta.device, dtype=dtype) * delta).sum(dtype=torch.float64) / 2)


def check_group_size(shapes: dict[str, tuple[int, ...]], names: list[str], group_size: int, bits: int,
                     where: Path) -> None:
    """Every quantized linear's in_features must split into whole groups and pack into int32 words."""
    ins = sorted({shapes[n][1] for n in names})
    outs = sorted({shapes[n][0] for n in names})
    if group_size != -1 and (group_size <= 0 or any(i % group_size for i in ins)):
        common = math.gcd(*ins)
        works = [g for g in (32, 64, 128, 256, 512, 1024) if common % g == 0]
        raise BadInputError(f"quantize.group_size = {group_size} does not divide the linears' in_features {ins}",
                            path=where, fix=f"use group_size {' or '.join(map(str, works)) or -1} "
                                            "(or -1: one group per output row)")
    per_word = 32 if bits == 3 else 32 // bits
    bad = [d for d in ins + outs if d % per_word]
    if bad:
        raise BadInputError(f"{bits}-bit GPTQ packing needs in/out features divisible by {per_word}; got {bad}",
                            path=where, fix="use 4 or 8 bits")
