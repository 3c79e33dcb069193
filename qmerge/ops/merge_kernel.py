"""One pass per weight for the common merge: a 16/32-bit base linear, quantized to NF4 as transformers did
when the adapter was trained, plus a plain LoRA delta.

`nf4_merge` returns what the merge stage stores and its weight-space metrics:

    W_nf4  = cast_chain(code[#midpoints < w·(1/absmax)] · absmax)     (ops/nf4.py, bit for bit)
    merged = W_nf4 + BA·scale                                          (float32, as ops/lora.py then `+`)
    stored = cast(merged, storage)
    retention = ⟨stored − W_nf4, merged − W_nf4⟩ / ‖merged − W_nf4‖²,  ‖merged − W_nf4‖ / ‖W_nf4‖   (float64 sums)

On CPU these are ~12 full-tensor passes and as many temporaries when done op by op (the 7B-shaped benchmark:
3.6 s in float64 conversions alone); inductor fuses them into one loop that reads w and BA and writes
`stored`. Its slow twin, `nf4_merge_reference`, is that op-by-op composition of the functions the rest of
qmerge uses; tests hold the stored bits identical and the metrics equal to float64 rounding. Casts to a
narrower dtype are kept inside the kernel (`emulate_precision_casts`): without it inductor drops the bf16
rounding of the dequantized weight (measured on a bf16 chain: other stored bits, and retention 0.946 where the
op-by-op value is 0.516).
"""

from __future__ import annotations

import torch

from qmerge.numerics import MATH_DTYPE, cast_as_trained
from qmerge.ops.metrics import delta_metrics, metrics_from_sums
from qmerge.ops.nf4 import (NF4_CODE, CompiledKernel, _roundtrip_kernel, block_scales, dequantize_nf4,
                            quantize_nf4)

Metrics = tuple[float, float] | None  # (retention, relative ΔW norm), None when the float32 sum left W unchanged


def _merge_kernel(blocks: torch.Tensor, recip: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  ba: torch.Tensor, scale: torch.Tensor, chain: tuple[torch.dtype, ...], storage: torch.dtype):
    w = cast_as_trained(_roundtrip_kernel(blocks, recip, absmax, code), chain)
    merged = w + ba * scale
    stored = merged.to(storage)
    delta = (merged - w).double()
    base = w.double()
    return (stored, (delta * delta).sum(), ((stored.double() - base) * delta).sum(), (base * base).sum())


MERGE = CompiledKernel(_merge_kernel, emulate_precision_casts=True)


def nf4_merge(w: torch.Tensor, ba: torch.Tensor, scale: float, blocksize: int, double_quant: bool,
              chain: tuple[torch.dtype, ...], storage: torch.dtype) -> tuple[torch.Tensor, Metrics]:
    """(stored tensor, metrics) for W = `w` as loaded (the values the quantizer saw), ΔW = `ba`·`scale`
    (float32 B@A, [out, in]) and the casts `chain` applied to the dequantized weight; fused on CPU, else
    `nf4_merge_reference`."""
    scales = block_scales(w, blocksize, double_quant) if ba.device.type == "cpu" else None
    out = MERGE(scales.blocks, scales.recip, scales.absmax, NF4_CODE, ba.to(MATH_DTYPE).reshape(scales.blocks.shape),
                torch.tensor(scale, dtype=MATH_DTYPE), tuple(chain), storage) if scales is not None else None
    if out is None:
        return nf4_merge_reference(w, ba, scale, blocksize, double_quant, chain, storage)
    stored, dd, sd, bb = out
    return stored.reshape(w.shape), metrics_from_sums(float(dd), float(sd), float(bb))


def nf4_merge_reference(w: torch.Tensor, ba: torch.Tensor, scale: float, blocksize: int, double_quant: bool,
                        chain: tuple[torch.dtype, ...], storage: torch.dtype) -> tuple[torch.Tensor, Metrics]:
    """The slow twin, op by op: eager NF4 round trip and casts (as `BaseCheckpoint.as_trained`), `lora_delta`'s
    product, the float32 add, the storage cast, `delta_metrics`."""
    w_nf4 = cast_as_trained(dequantize_nf4(quantize_nf4(w, blocksize, double_quant), MATH_DTYPE), chain)
    merged = w_nf4 + ba.to(MATH_DTYPE) * scale
    stored = merged.to(storage)
    return stored, delta_metrics(stored, merged, w_nf4)
