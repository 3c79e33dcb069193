"""Combining several adapters' deltas into one, per tensor, on the exact float32 ΔWᵢ = scaleᵢ·BᵢAᵢ.

Methods, named and defined as PEFT's `peft.utils.merge_utils` defines them (the functions behind
`add_weighted_adapter`), but applied to the full-rank ΔWᵢ, never to the A/B factors and never SVD-truncated:

- `linear` (task arithmetic, Ilharco et al. 2023, arXiv:2212.04089): Σ wᵢ·ΔWᵢ. Negative weights negate a task.
- `magnitude_prune`: Σ wᵢ·top_k(ΔWᵢ), keeping the k = ⌊density·numel⌋ entries of largest |value| of each ΔWᵢ.
- `ties` (Yadav et al. 2023, arXiv:2306.01708): trim each ΔWᵢ to its top-k, elect a sign per entry (`total`:
  sign of Σ trimmedᵢ; `frequency`: sign of Σ sign(trimmedᵢ); a zero sum elects +), and average the weighted
  trimmed deltas that agree with the elected sign over how many agree (a disjoint mean; 0 where none does).
- `dare_linear` (Yu et al. 2023, arXiv:2311.03099): drop each entry of ΔWᵢ with probability 1−density, rescale
  the kept ones by 1/density, then the weighted sum.
- `dare_ties`: DARE's drop-and-rescale in place of TIES' trim, then TIES' election and disjoint mean.

Determinism. Top-k ties at the threshold magnitude are broken by the lower flat index (torch.topk leaves that
order unspecified). DARE's keep mask is counter-based: entry j of adapter i's delta of tensor `name` is kept when
h(j) < ⌈density·2³²⌉, h a 32-bit hash of j keyed by SHA-256 of (merge seed, i, name) (`keep_hash`: two rounds of a
32-bit integer mixer, computed in int64 lanes that never overflow). An entry's fate depends on nothing else: not
on the order tensors are merged in, the block it falls in, the device or any other tensor, so the same seed gives
the same bytes; and the mask is computed inside the compiled block loop, with no generator state to draw from
(a seeded CPU generator, as before, cost ~6 ms per 2^20 entries per adapter, most of DARE's extra time). The sums
run in adapter order.

Memory. The combination streams over those flat blocks: besides the adapters' ΔWᵢ of the tensor and the result, it
holds a few blocks and the magnitudes near each top-k threshold (a bracket found from a sample), not whole-tensor
masks, sums or |ΔWᵢ| copies.

Speed. A block's trim (or DARE's drop and rescale), election and disjoint mean (or weighted sum) run as one loop
instead of ~25 passes op by op: on CPU in qmerge's C helper (ops/native.py; blocks on all of torch's threads,
written in place, DARE's hash in unsigned 32-bit words), elsewhere compiled by inductor (`MAGNITUDE`, `DARE`,
`MASKED`). On an 11008×4096 tensor of 3 adapters (2 cores, AVX-512) TIES' and DARE-TIES' block loops took 0.19 and
0.33 s compiled by inductor, 0.13 and 0.09 s in C, and nothing to compile (inductor's first build of the DARE
loop: 35 s). Where neither can run, and in the one block where the top-k's threshold ties must be split by a
prefix sum, the op-by-op twin runs: the same bits every way (tested). The merge passes each adapter's product
BᵢAᵢ with its scale (`scales`): ΔWᵢ is formed entry by entry where it is read, by the threshold's counting pass
(`scaled_threshold`) and by the block loop, and never written out (TIES on an 11008×4096 tensor of three
adapters, as the merge runs it: 282-291 → 269-274 ms); where only some of the entries equal to a threshold are
kept, the counting pass also says how many each block holds, which `combine` otherwise counts block by block.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from qmerge.numerics import MATH_DTYPE
from qmerge.ops import native
from qmerge.ops.native import count_and_gather
from qmerge.ops.nf4 import CompiledKernel
from qmerge.runtime import map_on_threads

METHODS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SPARSIFY = {"linear": None, "magnitude_prune": "magnitude", "ties": "magnitude", "dare_linear": "random",
            "dare_ties": "random"}
ELECTS_SIGN = {"ties", "dare_ties"}


BLOCK = 1 << 20  # flat elements per block: the unit of DARE's masks and of the streamed combination


SAMPLE = 1 << 16  # entries of the strided sample that brackets a top-k threshold


class TopK(NamedTuple):
    """A delta's top-k threshold: the k-th largest |value|, how many entries equal to it are kept (the lowest
    flat indices first), how many there are, and, where the bracket pass found them, how many lie in each BLOCK
    of the flat delta (so that `combine` need not look for them block by block)."""

    value: float
    kept: int
    equal: int
    by_block: tuple[int, ...] | None = None


def scaled_threshold(product: torch.Tensor, scale: float, density: float) -> TopK | None:
    """The top-k threshold of ΔW = scale·`product` (the factors' product BA; ΔW rounded as `lora_delta`'s `mul_`
    rounds it), without forming ΔW: on a contiguous float32 CPU product each entry is scaled in a register by the
    threshold's pass (the C loop where it runs), and `combine` forms ΔW from the product again in its own loop
    (`scales`): no pass writes ΔW out, and none reads it a second time."""
    if not (product.device.type == "cpu" and product.dtype == torch.float32 and product.is_contiguous()):
        return _threshold(product * scale, density)
    return _threshold(product, density, scale=scale)


def _threshold(delta: torch.Tensor, density: float, scale: float | None = None) -> TopK | None:
    """`TopK` for k = ⌊density·numel⌋; None keeps all. `scale` (a contiguous float32 CPU tensor only): the
    threshold of scale·`delta`, each entry scaled as it is read (`delta` is not changed).

    Exact, and O(numel) without a whole-tensor |ΔW| copy: a strided sample of SAMPLE magnitudes brackets the
    threshold between two of its order statistics (a margin of 4 binomial standard deviations around rank k),
    one streamed pass counts the entries above the bracket and gathers those inside it, and the k-th value is
    selected among those few. Where the sample misjudged (the bracket does not hold rank k) the whole tensor's
    magnitudes are selected directly: the same value, only slower."""
    flat = delta.view(-1) if scale is not None else delta.reshape(-1)
    n = flat.numel()
    k = int(density * n)
    if k >= n:
        return None
    if k <= 0:
        return TopK(float("inf"), 0, 0)
    bracket = _bracket(flat, k, scale)
    # no bracket: the whole tensor is "inside"
    above, inside, lengths = bracket or (0, (flat * scale if scale is not None else flat).abs(), None)
    rank = k - above  # the threshold is the rank-th largest magnitude inside the bracket
    # every entry equal to the threshold lies inside the bracket: their count is the whole tensor's, and where only
    # some of them are kept, the bracket's blocks (in flat order) say which block holds how many
    if bracket is not None and inside.device.type == "cpu":  # no NaN inside a bracket (comparisons exclude it):
        at, values = inside.numel() - rank, inside.numpy()     # numpy's selection (~10x torch.kthvalue on CPU)
        threshold = float(np.partition(values, at)[at])        # and counts (~3x torch's on these sizes)
        greater, total = int(np.count_nonzero(values > threshold)), int(np.count_nonzero(values == threshold))
    else:
        threshold = float(torch.kthvalue(inside, inside.numel() - rank + 1).values)
        greater, total = int(torch.count_nonzero(inside > threshold)), int(torch.count_nonzero(inside == threshold))
    kept = rank - greater
    by_block = tuple(int(torch.count_nonzero(part)) for part in (inside == threshold).split(lengths)) \
        if lengths is not None and 0 < kept < total else None
    return TopK(threshold, kept, total, by_block)


def _bracket(flat: torch.Tensor, k: int, scale: float | None = None
             ) -> tuple[int, torch.Tensor, list[int]] | None:
    """(how many magnitudes lie above the bracket, the magnitudes inside it, how many of those each BLOCK of
    `flat` holds) for a bracket [lo, hi] that holds the k-th largest magnitude of `flat`; None when the tensor is
    small or the sample's bracket misses rank k. `scale`: the magnitudes of scale·`flat` (`flat` unchanged)."""
    n = flat.numel()
    if n <= 4 * SAMPLE:
        return None
    step = (n // SAMPLE) | 1  # odd: a power-of-two row length does not alias the sample onto a few columns
    sample = (flat[::step] * scale if scale is not None else flat[::step]).abs()  # the scaled entries' bits
    m = sample.numel()
    share = k / n
    margin = 4 * math.sqrt(m * share * (1 - share)) + 16
    top, bottom = int(share * m - margin), int(share * m + margin)
    on_cpu = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
    if on_cpu:  # the two order statistics by numpy's selection (a fifth of a sort's time); NaN ranks largest in both
        ascending = [m - 1 - i for i in (top, bottom) if 0 <= i < m]
        ordered = np.partition(sample.numpy(), ascending) if ascending else None

        def largest(i: int) -> float:
            return float(ordered[m - 1 - i])
    else:
        ordered = sample.sort(descending=True).values

        def largest(i: int) -> float:
            return float(ordered[i])
    hi = largest(top) if top >= 0 else math.inf
    lo = largest(bottom) if bottom < m else 0.0
    above, inside, lengths = _count_and_gather(flat.contiguous().numpy() if on_cpu else flat, lo, hi, scale)
    if not above < k <= above + inside.numel():
        return None
    return above, inside, lengths


def _count_and_gather(flat: torch.Tensor | np.ndarray, lo: float, hi: float, scale: float | None = None
                      ) -> tuple[int, torch.Tensor, list[int]]:
    """`_bracket`'s pass: how many |x| > hi, the |x| in [lo, hi] (in flat order), and how many of those each BLOCK
    holds. A numpy array (what `_bracket` passes on CPU) takes qmerge's C loop (ops/native.py), one call per thread
    over a whole run of blocks, else numpy's ops block by block, on as many threads as torch uses (both run on one
    and release the GIL); a tensor (any other device) torch's. The same exact comparisons every way, but on CPU
    numpy's take half the time of torch's per 2^20 entries (boolean indexing 0.95 vs 2.1 ms, counting 0.22 vs
    0.48 ms) and the C loop a half to a quarter of numpy's. One C call per 2^20-entry block, each handed to a
    thread with a fresh result array, took 20-24 ms per 45M-entry delta where one call per thread took 14-17 ms
    (10-12 reading ahead, ops/native.py): the pass is bound by memory, and the per-block calls added to it.
    `scale` (a numpy `flat` only): the magnitudes of scale·x, each entry scaled as it is read (in the C loop; else
    a scaled copy of each block, by torch's `mul`)."""
    numpy = isinstance(flat, np.ndarray)
    if numpy and len(flat):
        blocks = -(-len(flat) // BLOCK)
        share = -(-blocks // min(torch.get_num_threads(), blocks)) * BLOCK  # whole blocks per thread
        runs = map_on_threads(lambda start: count_and_gather(flat[start:start + share], lo, hi, scale=scale,
                                                             block=BLOCK),
                              range(0, len(flat), share), "qmerge-bracket")
        if all(run is not None for run in runs):  # else no helper (or not float32): numpy's ops below
            return (sum(above for above, _, _ in runs),
                    torch.from_numpy(np.concatenate([part for _, part, _ in runs])),
                    [n for _, _, lengths in runs for n in lengths])
    count = np.count_nonzero if numpy else torch.count_nonzero

    def block(start: int) -> tuple[int, np.ndarray | torch.Tensor]:
        part = flat[start:start + BLOCK]
        if scale is not None:
            part = torch.from_numpy(part).mul(scale).numpy()  # torch's scaling, as `lora_delta` scales
        magnitude = abs(part)
        return int(count(magnitude > hi)), magnitude[(magnitude >= lo) & (magnitude <= hi)]

    starts = range(0, len(flat), BLOCK)
    parts = map_on_threads(block, starts, "qmerge-bracket") if numpy else [block(start) for start in starts]
    above = sum(n for n, _ in parts)
    inside = [values for _, values in parts]
    lengths = [len(values) for values in inside]
    return above, torch.from_numpy(np.concatenate(inside)) if numpy else torch.cat(inside), lengths


def _kept(block: torch.Tensor, threshold: TopK | None, admitted: list[int],
          settled: bool | None = None) -> torch.Tensor:
    """The top-k mask of one flat block, given the tensor's threshold; `admitted[0]` counts the threshold-equal
    entries kept so far (lower flat index first), across blocks in order. `settled`: `_take_equal`'s answer for
    this block, when it was asked (it has counted those entries already)."""
    if threshold is None:
        return torch.ones_like(block, dtype=torch.bool)
    value, equal_kept = threshold.value, threshold.kept
    magnitude = block.abs()
    mask = magnitude > value
    if settled is not None:
        return mask | (magnitude == value) if settled else mask
    left = equal_kept - admitted[0]
    if left > 0:
        equal = magnitude == value
        found = int(torch.count_nonzero(equal))
        take = equal if found <= left else equal & (torch.cumsum(equal, 0) <= left)  # the prefix sum only
        admitted[0] += min(found, left)                                               # where some must wait
        mask |= take
    return mask


def top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = ⌊density·numel⌋ entries of largest |value| (ties at the k-th magnitude: lower
    flat index first)."""
    return _kept(delta.reshape(-1), _threshold(delta, density), [0]).reshape(delta.shape)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x·c) mod 2³² for int64 x in [0, 2³²) and a 32-bit constant c, as two 16-bit halves of c so that no int64
    product overflows (each stays under 2⁴⁸)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, constants from C. Wellons' hash-prospector, "lowbias32"):
    a bijection of [0, 2³²) whose output bits each depend on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def dare_key(seed: int, adapter: int, tensor: str) -> tuple[int, int]:
    """The two 32-bit words that key DARE's keep mask for one adapter's delta of one tensor."""
    digest = hashlib.sha256(f"dare\0{seed}\0{adapter}\0{tensor}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def keep_hash(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """h(j) in [0, 2³²) for flat indices `index` (int64, ≥ 0) under `key` (int64 [2] or two 0-d tensors)."""
    return _mix32(_mix32((index & _M32) ^ key[0]) ^ (index >> 32) ^ key[1])


def keep_threshold(density: float) -> int:
    """Entry j is kept when h(j) < this: u = h/2³² < density exactly, so each entry is kept with probability
    density (to within 2⁻³²)."""
    return min(math.ceil(density * 2**32), 2**32)


def dare_mask(shape: torch.Size, density: float, seed: int, adapter: int, tensor: str) -> torch.Tensor:
    """DARE's whole keep mask of one adapter's delta of `tensor` (`combine` computes it block by block in
    `_dare_kernel`, from the same `keep_hash`)."""
    index = torch.arange(math.prod(shape), dtype=torch.int64)
    return (keep_hash(index, torch.tensor(dare_key(seed, adapter, tensor))) < keep_threshold(density)).reshape(shape)


def combine(deltas: Sequence[torch.Tensor], weights: Sequence[float], method: str, density: float = 1.0,
            majority_sign_method: str = "total", seed: int = 0, tensor: str = "",
            out: torch.Tensor | None = None, thresholds: dict[int, TopK] | None = None,
            scales: dict[int, float] | None = None) -> torch.Tensor:
    """The combined delta of one tensor (float32). `deltas[i]` is adapter i's exact ΔWᵢ (float32, unweighted);
    `tensor` names it for DARE's keep masks; `out` (float32, the deltas' shape, contiguous) receives the result
    when given, and may be one of the deltas (each block is read whole before its result is written);
    `thresholds`: top-k thresholds already known (`scaled_threshold`), by adapter index; `scales`: for the adapters
    it names, `deltas[i]` is the product BᵢAᵢ and ΔWᵢ = scales[i]·deltas[i] (`lora_delta`'s bits), formed in the
    C loop as each block is read, else in place over `deltas[i]` first. Streamed over flat blocks of BLOCK
    elements: besides the deltas and the result, the working set is a few blocks and the magnitudes near each top-k
    threshold."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}")
    flats = [d.to(MATH_DTYPE).reshape(-1) for d in deltas]
    kind = SPARSIFY[method] if density < 1 else None
    out = torch.empty_like(flats[0]) if out is None else out.view(-1)
    in_c = _in_c(flats, out) and not (method == "linear" and kind is None)
    scales = dict(scales or {})
    if scales and not in_c:  # ΔWᵢ formed over the products, by torch's `mul_` as `lora_delta` forms it
        for i, scale in scales.items():
            flats[i].mul_(scale)
        scales = {}
    known = thresholds or {}
    thresholds = [known[i] if i in known else _threshold(f, density, scale=scales.get(i))
                  for i, f in enumerate(flats)] if kind == "magnitude" else None
    admitted = [[0] for _ in flats]
    if kind == "random":
        device = flats[0].device
        keys = torch.tensor([dare_key(seed, i, tensor) for i in range(len(flats))], dtype=torch.int64, device=device)
        threshold = torch.tensor(keep_threshold(density), dtype=torch.int64, device=device)
    weight_t = torch.tensor(list(weights), dtype=MATH_DTYPE)
    frequency, elect = majority_sign_method != "total", method in ELECTS_SIGN
    values = [t.value for t in thresholds] if kind == "magnitude" else None  # each adapter's threshold magnitude
    c_blocks = []  # (start, stop, C arguments): run on threads after the loop, each reading and writing its own block
    for start in range(0, out.numel(), BLOCK):
        stop = min(start + BLOCK, out.numel())
        raws = tuple(f[start:stop] for f in flats)
        if method == "linear" and kind is None:
            out[start:stop] = _weighted_sum(list(raws), weight_t)
            continue
        fused = None
        if kind == "magnitude":
            take_equal = [_take_equal(raw, thresholds[i], admitted[i], start // BLOCK, scales.get(i))
                          for i, raw in enumerate(raws)]
            if None not in take_equal:  # None: some threshold-equal entries wait for later blocks (a prefix sum)
                if in_c:
                    how = {"mode": "magnitude", "thresholds": values, "take_equal": take_equal}
                    c_blocks.append((start, stop, how))
                    continue
                fused = MAGNITUDE(raws, torch.tensor(values, dtype=MATH_DTYPE),
                                  torch.tensor(take_equal), weight_t, elect, frequency)
            if fused is None:  # (in C's stead: this block's ΔWᵢ formed as the C loop forms them)
                raws = tuple(raw * scales[i] if i in scales else raw for i, raw in enumerate(raws))
                parts = [raw * _kept(raw, thresholds[i], admitted[i], settled=take_equal[i])
                         for i, raw in enumerate(raws)]
        elif kind == "random":
            if in_c:
                c_blocks.append((start, stop, {"mode": "dare", "keys": keys.numpy(), "keep_below": int(threshold),
                                               "start": start, "density": density}))
                continue
            args = (raws, torch.tensor(start, device=device), keys, threshold, density, weight_t, elect, frequency)
            fused = DARE(*args)
            if fused is None:
                fused = _dare_kernel(*args)  # the same code, op by op
        else:
            if in_c:
                c_blocks.append((start, stop, {"mode": "keep_all"}))
                continue
            fused = MASKED(raws, None, 1.0, weight_t, elect, frequency)
            if fused is None:
                parts = list(raws)
        if fused is None:  # the op-by-op twin
            fused = _elect(parts, weight_t, frequency) if elect else _weighted_sum(parts, weight_t)
        out[start:stop] = fused
    if c_blocks:
        arrays, into, weight_a = [f.numpy() for f in flats], out.numpy(), weight_t.numpy()
        scale_a = np.array([scales.get(i, 1.0) for i in range(len(flats))], dtype=np.float32) if scales else None

        def run(block: tuple[int, int, dict]) -> None:
            start, stop, how = block
            native.combine_block([a[start:stop] for a in arrays], into[start:stop], weights=weight_a, elect=elect,
                                 frequency=frequency, scales=scale_a, **how)

        map_on_threads(run, c_blocks, "qmerge-combine")
    return out.reshape(deltas[0].shape)


def _in_c(flats: list[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether the fused blocks run in qmerge's C helper (ops/native.py: CPU, float32, contiguous, at most 16
    adapters), where they are written in place and spread over threads, with no compile. Elsewhere (CUDA, or no
    C compiler) the inductor-compiled kernels below, else their op-by-op twin: the same bits every way (tested)."""
    return (out.device.type == "cpu" and len(flats) <= native.MAX_ADAPTERS
            and all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in (*flats, out))
            and native.combine_available())


def _take_equal(raw: torch.Tensor, threshold: TopK, admitted: list[int], block: int, scale: float | None = None
                ) -> bool | None:
    """Whether block number `block` (`raw`) keeps the entries equal to the threshold magnitude: all of them (True;
    counted into `admitted`), none (False: the quota is spent), or only a prefix (None: `_kept`'s prefix sum
    decides). Where the tensor keeps all of its threshold-equal entries or none, every block's answer is known
    without counting; so it is where the bracket pass counted them block by block (`TopK.by_block`: ties at the
    threshold are common in products of bf16 factors, and counting them here took a pass over each block).
    `scale`: `raw` is a product, ΔW's block is scale·`raw`."""
    value, equal_kept, equal_total, by_block = threshold
    if equal_kept in (0, equal_total):
        return equal_kept > 0
    left = equal_kept - admitted[0]
    if left <= 0:
        return False
    if by_block is not None:
        found = by_block[block]
    else:
        found = int(torch.count_nonzero((raw * scale if scale is not None else raw).abs() == value))
    if found > left:
        return None
    admitted[0] += found
    return True


def _elect(parts: list[torch.Tensor], weights: torch.Tensor, frequency: bool) -> torch.Tensor:
    """TIES' election and disjoint mean, written once for the fused kernels and the op-by-op path alike. The sums
    start from their first term, not from zeros: inductor folds `0 + x` to `x`, which differs in the sign of a zero
    result, and the compiled and op-by-op paths must write the same bits."""
    votes = parts[0].sign() if frequency else parts[0]
    for part in parts[1:]:
        votes = votes + (part.sign() if frequency else part)
    sign = torch.where(votes >= 0, 1.0, -1.0).to(parts[0].dtype)  # a zero total elects +1
    total = count = None
    for i, part in enumerate(parts):
        agrees = (part.sign() == sign).to(part.dtype)  # a zero entry (trimmed or dropped) never agrees
        term = part * weights[i] * agrees
        total, count = (term, agrees) if total is None else (total + term, count + agrees)
    return total / count.clamp_min(1.0)


def _weighted_sum(parts: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    total = parts[0] * weights[0]
    for i, part in enumerate(parts[1:], 1):
        total = total + part * weights[i]
    return total


def _magnitude_kernel(raws: tuple[torch.Tensor, ...], thresholds: torch.Tensor, take_equal: torch.Tensor,
                      weights: torch.Tensor, elect: bool, frequency: bool) -> torch.Tensor:
    """One block of magnitude_prune / TIES: each adapter trimmed to |x| > tᵢ (and |x| = tᵢ where its ties are
    kept), then the weighted sum or the election."""
    parts = []
    for i, raw in enumerate(raws):
        magnitude = raw.abs()
        parts.append(raw * ((magnitude > thresholds[i]) | ((magnitude == thresholds[i]) & take_equal[i])))
    return _elect(parts, weights, frequency) if elect else _weighted_sum(parts, weights)


def _masked_kernel(raws: tuple[torch.Tensor, ...], keeps: tuple[torch.Tensor, ...] | None, density: float,
                   weights: torch.Tensor, elect: bool, frequency: bool) -> torch.Tensor:
    """One block of DARE given its keep masks (each adapter's kept entries rescaled by 1/density) or of TIES at
    density 1 (`keeps` None), then the weighted sum or the election."""
    parts = list(raws) if keeps is None else [raw * keep / density for raw, keep in zip(raws, keeps)]
    return _elect(parts, weights, frequency) if elect else _weighted_sum(parts, weights)


def _dare_kernel(raws: tuple[torch.Tensor, ...], start: torch.Tensor, keys: torch.Tensor, threshold: torch.Tensor,
                 density: float, weights: torch.Tensor, elect: bool, frequency: bool) -> torch.Tensor:
    """One block of DARE starting at flat index `start`: each adapter's keep mask hashed from the entries' flat
    indices (`keep_hash`, `keys[i]`), then `_masked_kernel`."""
    index = torch.arange(raws[0].numel(), dtype=torch.int64, device=raws[0].device) + start
    keeps = tuple(keep_hash(index, keys[i]) < threshold for i in range(len(raws)))
    return _masked_kernel(raws, keeps, density, weights, elect, frequency)


MAGNITUDE = CompiledKernel(_magnitude_kernel)
MASKED = CompiledKernel(_masked_kernel)
DARE = CompiledKernel(_dare_kernel)
