"""One pass per weight for the common merge: a 16/32-bit base linear, quantized to NF4 as transformers did
when the adapter was trained, plus a plain LoRA delta.

`nf4_merge` returns what the merge stage stores and its weight-space metrics:

    W_nf4  = cast_chain(code[#midpoints < w·(1/absmax)] · absmax)     (ops/nf4.py, bit for bit)
    merged = W_nf4 + BA·scale                                          (float32, as ops/lora.py then `+`)
    stored = cast(merged, storage)
    retention = ⟨stored − W_nf4, merged − W_nf4⟩ / ‖merged − W_nf4‖²,  ‖merged − W_nf4‖ / ‖W_nf4‖   (float64 sums)

On CPU these are ~12 full-tensor passes and as many temporaries when done op by op (the 7B-shaped benchmark:
3.6 s in float64 conversions alone); one C loop (ops/native.py `qmerge_nf4_merge`, through ops/nf4.py `NativeNF4`)
reads w and BA and writes `stored`, each float32 operation rounded on its own as the op-by-op code rounds it. Its
slow twin, `nf4_merge_reference`, is that op-by-op composition of the functions the rest of qmerge uses; tests hold
the stored bits identical and the metrics equal to float64 rounding. Until 2026-12-06 the loop was an inductor
kernel: the same time per weight, but 4-8 s of dynamo start-up in every process that merged (13 s cold).
"""

from __future__ import annotations

import torch

from qmerge.numerics import MATH_DTYPE, cast_as_trained
from qmerge.ops.metrics import delta_metrics, metrics_from_sums
from qmerge.ops.nf4 import NativeNF4, block_scales, dequantize_nf4, quantize_nf4

Metrics = tuple[float, float] | None  # (retention, relative ΔW norm), None when the float32 sum left W unchanged

MERGE = NativeNF4()


def nf4_merge(w: torch.Tensor, ba: torch.Tensor, scale: float, blocksize: int, double_quant: bool,
              chain: tuple[torch.dtype, ...], storage: torch.dtype) -> tuple[torch.Tensor, Metrics]:
    """(stored tensor, metrics) for W = `w` as loaded (the values the quantizer saw), ΔW = `ba`·`scale`
    (float32 B@A, [out, in]) and the casts `chain` applied to the dequantized weight; fused on CPU, else
    `nf4_merge_reference`."""
    scales = block_scales(w, blocksize, double_quant) if ba.device.type == "cpu" else None
    out = None if scales is None else MERGE(scales.blocks, scales.recip, scales.absmax, ba, scale, tuple(chain),
                                             storage)
    if out is None:
        return nf4_merge_reference(w, ba, scale, blocksize, double_quant, chain, storage)
    stored, (dd, sd, bb) = out
    return stored.reshape(w.shape), metrics_from_sums(dd, sd, bb)


def nf4_merge_reference(w: torch.Tensor, ba: torch.Tensor, scale: float, blocksize: int, double_quant: bool,
                        chain: tuple[torch.dtype, ...], storage: torch.dtype) -> tuple[torch.Tensor, Metrics]:
    """The slow twin, op by op: eager NF4 round trip and casts (as `BaseCheckpoint.as_trained`), `lora_delta`'s
    product, the float32 add, the storage cast, `delta_metrics`."""
    w_nf4 = cast_as_trained(dequantize_nf4(quantize_nf4(w, blocksize, double_quant), MATH_DTYPE), chain)
    merged = w_nf4 + ba.to(MATH_DTYPE) * scale
    stored = merged.to(storage)
    return stored, delta_metrics(stored, merged, w_nf4)
