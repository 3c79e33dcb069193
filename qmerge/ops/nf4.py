"""NF4 4-bit quantization (Dettmers et al. 2023, QLoRA, arXiv:2305.14314), reproduced bit for bit.

The adapter was trained against dequant(NF4(W)) exactly as bitsandbytes made it when transformers
loaded the base: blockwise absmax scaling (blocksize 64), nearest NF4 code (bucketize on the 15
midpoints), two codes per byte (high nibble first), and with double quantization the absmax vector
itself 8-bit quantized (dynamic code, blocks of 256) after subtracting its mean.

`quantize_nf4` / `dequantize_nf4` are plain torch; `quantize_nf4_bnb` / `dequantize_nf4_bnb` call
bitsandbytes (also its CUDA kernels) and are the twins the tests compare against. `nf4_roundtrip_fused`
is the fast CPU route to W_nf4 (one fused `torch.compile` kernel instead of ~15 eager passes plus a binary
search per element); its slow twin is `dequantize_nf4(quantize_nf4(w))`, and tests hold them bit-identical.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from qmerge.errors import KernelCompileError
from qmerge.numerics import cast_as_trained

log = logging.getLogger(__name__)

# bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")): quantiles of N(0, 1), normalised to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class NF4State:
    """bitsandbytes' 4-bit state as plain tensors. `absmax` is float32, or uint8 codes when `nested`."""

    packed: torch.Tensor  # uint8 [(numel + 1) // 2, 1]
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype  # what dequantize returns: the dtype of the weight that was quantized
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def _to_bnb(state: NF4State):
    from bitsandbytes.functional import QuantState

    state2 = None
    if state.nested:
        state2 = QuantState(absmax=state.nested_absmax, code=state.nested_code, blocksize=state.nested_blocksize,
                            dtype=torch.float32)
    return QuantState(absmax=state.absmax, shape=torch.Size(state.shape), code=NF4_CODE.to(state.packed.device),
                      blocksize=state.blocksize, quant_type="nf4", dtype=state.dtype, offset=state.offset,
                      state2=state2)


def _from_bnb(packed: torch.Tensor, qs) -> NF4State:
    if qs.nested:
        return NF4State(packed, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize, qs.state2.absmax,
                        qs.state2.code, qs.offset, qs.state2.blocksize)
    return NF4State(packed, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize)


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of absmax − mean (bitsandbytes `quantize_blockwise`, dynamic code)."""
    from bitsandbytes.functional import quantize_blockwise

    offset = absmax.mean()
    q, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return q, state2.absmax, state2.code, offset


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """NF4 codes + absmax in plain torch: blockwise absmax, scale, nearest code by bucketize on midpoints."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    # Zero padding leaves a partial last block's absmax unchanged (bitsandbytes takes it over real elements).
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # bitsandbytes multiplies by the reciprocal (not a division): keep that rounding. Its CUDA kernel does so in
    # every block; its CPU code (0.50) divides in a partial last block (a weight whose size is not a multiple of
    # the blocksize), which can put an entry on the other side of a midpoint: there qmerge is the CUDA kernel's
    # W_nf4, what a QLoRA trained on a GPU saw. Full blocks (every linear of the usual models) agree with both.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)[:n]
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, NF4_MIDPOINTS.to(w.device), out_int32=True).to(torch.uint8)
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    if double_quant:
        q, nested_absmax, nested_code, offset = _double_quantize(absmax)
        return NF4State(packed, q, tuple(w.shape), w.dtype, blocksize, nested_absmax, nested_code, offset)
    return NF4State(packed, absmax, tuple(w.shape), w.dtype, blocksize)


def quantize_nf4_bnb(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """The same through bitsandbytes (`functional.quantize_4bit`); on CUDA tensors its CUDA kernel."""
    from bitsandbytes.functional import quantize_4bit

    packed, qs = quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return _from_bnb(packed, qs)


def _absmax_float(state: NF4State) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    from bitsandbytes.functional import dequantize_blockwise

    qs = _to_bnb(state)
    return (dequantize_blockwise(state.absmax, qs.state2) + state.offset).float()


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """cast(code · absmax, dtype) in float32 arithmetic, as bitsandbytes' dequantize_4bit computes it."""
    packed = state.packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    n = 1
    for s in state.shape:
        n *= s
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(packed.device)[codes]
    pad = (-n) % state.blocksize
    absmax = _absmax_float(state)
    out = (torch.nn.functional.pad(values, (0, pad)).view(-1, state.blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]
    return out.reshape(state.shape).to(dtype or state.dtype)


def dequantize_nf4_bnb(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    out = dequantize_4bit(state.packed, _to_bnb(state))
    return out if dtype is None else out.to(dtype)


# Graphs one kernel may build: each set of input dtypes and flags is its own. A multi-adapter merge needs a few, the
# test suite a few dozen; past dynamo's default of 8 the rest would run as plain Python, without a word.
RECOMPILE_LIMIT = 64


def compile_strict() -> bool:
    """`QMERGE_COMPILE_STRICT=1` (the test suite's setting): a kernel that cannot be compiled raises instead of
    handing over to its eager twin, so that a test of the fused path cannot pass by comparing the twin with itself."""
    return os.environ.get("QMERGE_COMPILE_STRICT", "") not in ("", "0")


def _missing_compiler() -> str:
    """The usual reason inductor fails on a fresh machine, said plainly (its CPU backend builds C++), or ""."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return ""
    except Exception:  # noqa: BLE001 - whatever the lookup raises, no compiler was found
        return "no C++ compiler found (inductor tries $CXX, else g++): install one, or set QMERGE_COMPILE_STRICT=0"


class CompiledKernel:
    """`fn` compiled by inductor (dynamic shapes) on its first call. Where that cannot work (no C++ compiler,
    or `QMERGE_NO_COMPILE=1`) a call returns None and the caller takes its eager twin, which gives the same
    bits; so does any later failure, after which the kernel stays off for this process. Under `compile_strict()`
    a failure raises instead. `fullgraph` turns what dynamo would otherwise run eagerly behind the caller's back
    (a graph break, too many graphs) into such a failure, so `ran`, the calls answered by compiled code, is exact."""

    def __init__(self, fn, **options):
        self.fn, self.options, self._compiled, self.failed, self.ran = fn, options, None, False, 0

    def __call__(self, *args):
        strict = compile_strict()
        if os.environ.get("QMERGE_NO_COMPILE") or (self.failed and not strict):
            return None
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True, options=self.options or None)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = self._compiled(*args)
        except Exception as e:  # any compiler failure: the eager twin, or under strict an error
            if strict:
                why = _missing_compiler() or "QMERGE_COMPILE_STRICT is set (0 takes the eager path)"
                detail = (str(e).strip().splitlines() or [""])[0]  # dynamo appends paragraphs of debugging hints
                raise KernelCompileError(f"torch.compile failed for {self.fn.__name__}: {why}; "
                                         f"{type(e).__name__}: {detail}") from e
            log.warning("torch.compile failed for %s (%s); using the eager path (same bits, slower)",
                        self.fn.__name__, e)
            self.failed = True
            return None
        self.ran += 1
        return out


_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # qmerge_nf4_merge's QM_F32, QM_F16, QM_BF16
NATIVE_CHUNK = 1 << 20  # entries per C call, in whole blocks; each call's sums are added in order


class NativeNF4:
    """The fused NF4 pass: ops/merge_kernel.py's merge (`ba` given: stored weight and retention sums) or the round
    trip dequantize_nf4(quantize_nf4(w)) as float32 (`ba` None), by ops/native.py `qmerge_nf4_merge` on chunks of
    blocks on torch's threads (the sums added chunk by chunk in order, whatever the thread count). Returns (out,
    (dd, sd, bb)) or None where it does not apply (no C helper, a dtype it does not know, a merged value that is not
    finite): the caller takes its op-by-op twin, which gives the same bits. `ran` counts the calls it answered."""

    def __init__(self):
        self.ran = 0

    def __call__(self, blocks: torch.Tensor, recip: torch.Tensor, absmax: torch.Tensor, ba: torch.Tensor | None,
                 scale: float, chain: tuple[torch.dtype, ...], storage: torch.dtype):
        import numpy as np

        from qmerge.ops import native  # imports this module
        from qmerge.runtime import map_on_threads

        lib = native._helper()
        if lib is None or any(d not in _KINDS for d in (blocks.dtype, storage, *chain)):
            return None
        n_blocks, bs = blocks.shape
        blocks = blocks.contiguous()
        recip, absmax = (t.reshape(-1).to(torch.float32).contiguous() for t in (recip, absmax))
        if ba is not None:
            ba = ba.to(torch.float32).reshape(n_blocks, bs).contiguous()
        out = torch.empty((n_blocks, bs), dtype=storage if ba is not None else torch.float32)
        kinds = np.array([_KINDS[d] for d in chain] or [0], dtype=np.int32)
        step = max(1, NATIVE_CHUNK // bs)
        starts = range(0, n_blocks, step)
        sums = np.zeros((len(starts), 3))

        def chunk(i: int) -> int:
            start = starts[i]
            count = min(step, n_blocks - start)
            return lib.qmerge_nf4_merge(
                blocks[start].data_ptr(), _KINDS[blocks.dtype], count, bs, recip[start:].data_ptr(),
                absmax[start:].data_ptr(), NF4_CODE.data_ptr(), NF4_MIDPOINTS.data_ptr(),
                ba[start].data_ptr() if ba is not None else None, scale, kinds.ctypes.data, len(chain),
                out[start].data_ptr(), _KINDS[out.dtype], sums[i].ctypes.data if ba is not None else None)

        if any(map_on_threads(chunk, range(len(starts)), "qmerge-nf4")):
            return None
        self.ran += 1
        return out, tuple(float(sum(sums[:, k].tolist())) for k in range(3))


ROUNDTRIP = NativeNF4()  # nf4_roundtrip_fused's; ops/merge_kernel.py has its own (`ran` apart)


@dataclass(frozen=True)
class BlockScales:
    """What the fused kernels need besides the weight: blocks [n/blocksize, blocksize] (a view of w),
    bitsandbytes' reciprocal 1/absmax per block and the absmax the dequantization multiplies by (after
    double quantization, when on)."""

    blocks: torch.Tensor
    recip: torch.Tensor  # [blocks, 1]
    absmax: torch.Tensor  # [blocks, 1], float32


def block_scales(w: torch.Tensor, blocksize: int, double_quant: bool) -> BlockScales | None:
    """The fused path's inputs, or None where it must not be taken (not a whole number of blocks, not on CPU,
    a non-finite absmax whose NaN semantics only bucketize keeps)."""
    n = w.numel()
    if n == 0 or n % blocksize or w.device.type != "cpu":
        return None
    blocks = w.reshape(-1, blocksize)
    # max|x| = max(max x, -min x): two reductions and no whole-tensor |w| temporary (which raised the merge's peak
    # by a weight); `.abs()` makes an all-zero block's absmax +0, as |x|'s maximum is. Eager: a compiled twin saved
    # ~1 s on 7B shapes but cost 3 s to build.
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg()).abs().float()
    if not bool(torch.isfinite(absmax).all()):
        return None
    recip = (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)  # as quantize_nf4 (bitsandbytes' reciprocal)
    if double_quant:
        q, nested_absmax, nested_code, offset = _double_quantize(absmax)
        state = NF4State(torch.empty(0, dtype=torch.uint8), q, tuple(w.shape), w.dtype, blocksize, nested_absmax,
                         nested_code, offset)
        absmax = _absmax_float(state)
    return BlockScales(blocks, recip, absmax.unsqueeze(1))


def nf4_roundtrip_fused(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> torch.Tensor:
    """float32 dequantize_nf4(quantize_nf4(w)) in one fused pass on CPU; falls back to exactly that when the
    size is not a whole number of blocks, an absmax is not finite, or the C helper is unavailable."""
    scales = block_scales(w, blocksize, double_quant)
    out = None if scales is None else ROUNDTRIP(scales.blocks, scales.recip, scales.absmax, None, 1.0, (),
                                                 torch.float32)
    if out is None:
        return dequantize_nf4(quantize_nf4(w, blocksize, double_quant), torch.float32)
    return out[0].reshape(w.shape)


def nf4_weight(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
               dequant_dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> torch.Tensor:
    """W_nf4 = float32(cast(code·absmax, dequant_dtype)): the weight the trained model saw (docs/design.md, "Numerics rules")."""
    if device == "cuda":
        product = dequantize_nf4_bnb(quantize_nf4_bnb(w.to("cuda"), blocksize, double_quant), torch.float32)
    else:
        product = nf4_roundtrip_fused(w, blocksize, double_quant)
    return cast_as_trained(product, (dequant_dtype,))


def nf4_state_from_serialized(tensors: dict[str, torch.Tensor], prefix: str) -> NF4State:
    """Parses a pre-quantized checkpoint's tensors for one linear (`{prefix}.weight`, `.weight.absmax`,
    `.weight.quant_map`, `.weight.nested_*`, `.weight.quant_state.bitsandbytes__nf4`)."""
    from bitsandbytes.functional import QuantState

    head = f"{prefix}.weight"
    qs_dict = {k[len(head) + 1:]: v for k, v in tensors.items() if k.startswith(head + ".")}
    qs = QuantState.from_dict(qs_dict, device=torch.device("cpu"))
    if qs.quant_type != "nf4":
        raise ValueError(f"{prefix}: quant_type {qs.quant_type!r}, expected nf4")
    return _from_bnb(tensors[head], qs)
