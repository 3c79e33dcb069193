"""Per-stage peak memory and disk, estimated from headers and the config alone (what `--dry-run` prints).

Each stage holds a bounded working set, so its peak is a sum of named terms (docs/design.md, "Scale"):
- the libraries every stage imports (torch, transformers, peft, bitsandbytes): `IMPORTS`;
- merge: the largest tensor in flight (stored, float32 base, W_nf4, ΔW, merged, cast) and the write-behind buffer;
  a TIES/DARE combination's two ΔW buffers; for `into = "auto"`, the selection pass scored as evaluate is;
- quantize: one decoder layer in float32, the calibration windows' hidden states (layer inputs and outputs), the
  largest linear's Hessian and the solver's copies of its weight, one batch's activations (or, for calibration
  sets small enough for lockstep passes, what every paused batch holds);
- evaluate: one decoder layer per model in float32, every view's hidden states for every window, one batch's
  activations, the output heads and one batch of logits per model;
- promote: nothing beyond the imports; disk only for files that cannot be hardlinked.
The constants were measured on the 7B-shaped benchmark (benchmarks/scale.py; its table shows estimate against
measurement for every stage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qmerge.io.safetensors_io import DTYPE_BITS
from qmerge.layerwise import LOCKSTEP_BUDGET, lockstep_bytes
from qmerge.ops.gptq import THREADED_CHOLESKY_FROM

IMPORTS = int(0.55 * 2**30)  # anonymous RSS of python + torch + transformers + peft + bitsandbytes, before any work
LIGHT_IMPORTS = int(0.36 * 2**30)  # gate and promote: python + torch, no model libraries (measured 0.36 GiB)
F32 = 4
MERGE_BYTES_PER_ELEMENT = 6  # largest tensor: float32 widened copy + stored copy in flight (the fused kernel)
SOLVER_COPIES = 4  # GPTQ: W, its quantized copy, the error block and round-to-nearest's copy, float32
LAYER0 = re.compile(r"^(.*\.)?(layers|h|blocks|layer)\.0\.")


@dataclass(frozen=True)
class Shape:
    """What the estimates need to know of the model, from its config and headers."""

    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    layer_elements: int  # parameters of one decoder layer
    largest_elements: int  # the largest tensor
    largest_linear: tuple[int, int]  # (out, in) of the largest quantized linear
    max_in_features: int
    output_bytes: int  # the merged checkpoint in merge.dtype
    linear_widths: int = 0  # Σ (out + in) over one decoder layer's quantized linears (a rank-1 LoRA's elements)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_shape(hf_config: dict, tensors: dict[str, tuple[str, tuple[int, ...]]], quantized: set[str],
                out_itemsize: int) -> Shape:
    text = hf_config.get("text_config") or hf_config
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    linears = [shape for name, (_, shape) in tensors.items() if name.endswith(".weight") and name[:-7] in quantized]
    largest_linear = max(linears, key=_numel, default=(hidden, hidden))
    output = sum(_numel(s) * (out_itemsize if d in ("F32", "F16", "BF16") else DTYPE_BITS.get(d, 32) // 8)
                 for d, s in tensors.values())
    return Shape(hidden=hidden, intermediate=int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
                 vocab=int(text.get("vocab_size") or 0),
                 layers=int(text.get("num_hidden_layers") or text.get("n_layer") or 0),
                 heads=int(text.get("num_attention_heads") or text.get("n_head") or 1),
                 layer_elements=sum(_numel(s) for n, (_, s) in tensors.items() if LAYER0.match(n)),
                 largest_elements=max((_numel(s) for _, s in tensors.values()), default=0),
                 largest_linear=tuple(largest_linear), max_in_features=max((s[1] for s in linears), default=hidden),
                 output_bytes=output,
                 linear_widths=sum(s[0] + s[1] for n, (_, s) in tensors.items()
                                   if n.endswith(".weight") and n[:-7] in quantized and LAYER0.match(n)))


def _batch_activations(shape: Shape, windows: int, seq_len: int) -> int:
    """float32 activations of one layer forward over `windows` windows (MLP intermediates, attention scores)."""
    return windows * seq_len * (3 * shape.intermediate + shape.heads * seq_len + 6 * shape.hidden) * F32


def merge_peak(shape: Shape) -> int:
    return IMPORTS + MERGE_BYTES_PER_ELEMENT * shape.largest_elements


def quantize_peak(shape: Shape, samples: int, seq_len: int, batch: int) -> int:
    out_f, in_f = shape.largest_linear
    hidden_states = 2 * samples * seq_len * shape.hidden * F32  # one layer's inputs and outputs, all windows
    n = shape.max_in_features
    # H and its inverse being made: 1.5 n² beside H on the large path, 3.6 n² on the small one (measured, gptq.py)
    hessian = int((2.5 if n >= THREADED_CHOLESKY_FROM else 4.6) * n ** 2 * F32)
    paused = lockstep_bytes(samples * seq_len, shape.hidden, max(out_f, in_f))  # lockstep passes, when they fit
    return (IMPORTS + shape.layer_elements * F32 + hidden_states + hessian + SOLVER_COPIES * out_f * in_f * F32
            + (paused if paused <= LOCKSTEP_BUDGET else _batch_activations(shape, batch, seq_len)))


def evaluate_peak(shape: Shape, models: int, views: int, windows: int, seq_len: int, batch: int) -> int:
    """`models` distinct layer-wise models (reference/base share one), `views` scored models."""
    layers = models * shape.layer_elements * F32
    nf4_transient = 3 * _numel(shape.largest_linear) * F32  # W as stored widened, blocks, W_nf4
    hidden_states = views * windows * seq_len * shape.hidden * F32
    head = models * shape.vocab * shape.hidden * F32 + views * batch * seq_len * shape.vocab * F32 + \
        3 * batch * seq_len * shape.vocab * F32  # heads, each view's logits, log-softmax and KL temporaries
    return IMPORTS + max(layers + nf4_transient + _batch_activations(shape, batch, seq_len), head) + hidden_states


def gguf_bytes_per_weight(qtype: str) -> float:
    """A GGUF type's bytes per weight: its block's bytes over the block's weights (the `gguf` package's table)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return size / block


def stage_estimates(cfg, shape: Shape, same_filesystem: bool = True) -> dict[str, dict[str, int]]:
    """{stage: {"peak_bytes": anonymous RSS, "disk_bytes": written}} for the stages this config runs."""
    merge = merge_peak(shape)
    if cfg.merge.method != "linear":  # TIES/DARE keep two ΔW buffers of the largest adapted linear beside the merge
        merge += 2 * _numel(shape.largest_linear) * F32
    if cfg.merge.into == "auto":  # then both candidates and the reference are scored on the selection windows
        seq_len, batch = cfg.select_window_shape
        merge = max(merge, evaluate_peak(shape, 3, 3, cfg.merge.select_windows, seq_len, batch))
    out = {"merge": {"peak_bytes": merge, "disk_bytes": shape.output_bytes * (2 if cfg.merge.into == "auto" else 1)}}
    final_bytes = shape.output_bytes
    if cfg.quantize is not None:
        q = cfg.quantize
        linear_fraction = shape.layers * shape.layer_elements / max(1, sum([shape.layers * shape.layer_elements,
                                                                            2 * shape.vocab * shape.hidden]))
        final_bytes = int(shape.output_bytes * (1 - linear_fraction) +
                          shape.layers * shape.layer_elements * (q.bits / 8 + 4 / max(q.group_size, 32)))
        peak = quantize_peak(shape, q.samples, q.seq_len, max(1, 4096 // q.seq_len))
        if q.gptaq is not None:
            # the unquantized stream (inputs and outputs); ΔXXᵀ beside H and, while P is made, its permuted copy,
            # their product and P; and either every group's X̃ (when they fit the budget) or a copy of the layer
            tokens = q.samples * q.seq_len
            peak += 2 * tokens * shape.hidden * F32 + 4 * shape.max_in_features ** 2 * F32
            peak += max(LOCKSTEP_BUDGET, shape.layer_elements * F32)
        if q.compensate is not None:
            # the Hessian's root, the residual and its SVD (≤ 3 weight-sized copies), every factor held to the end
            out_f, in_f = shape.largest_linear
            peak += shape.max_in_features ** 2 * F32 + 3 * out_f * in_f * F32
            factors = q.compensate.rank * shape.layers * shape.linear_widths * (2 if q.compensate.dtype != "float32"
                                                                              else 4)
            peak += factors
            final_bytes += factors
            if q.compensate.train is not None:
                # the unquantized stream where GPTAQ does not keep it already; the layer's weights as served beside
                # the ones it runs with; the saved activations of a step's backward (its windows, ~3 forwards' worth)
                if q.gptaq is None:
                    peak += 2 * q.samples * q.seq_len * shape.hidden * F32
                peak += shape.layer_elements * F32 + 3 * _batch_activations(shape, q.compensate.train.windows,
                                                                            q.seq_len)
        out["quantize"] = {"peak_bytes": peak, "disk_bytes": final_bytes}
    if cfg.quantize is not None:  # the token ids, written once
        out["calibrate"] = {"peak_bytes": LIGHT_IMPORTS, "disk_bytes": cfg.quantize.samples * cfg.quantize.seq_len * 8}
    if cfg.exports:  # tensor by tensor: the largest in float32, its cast and its quantized copy
        params = shape.layers * shape.layer_elements + shape.vocab * shape.hidden
        files = sum(int(params * gguf_bytes_per_weight(a[5:])) if a.startswith("gguf-") else final_bytes
                    for a in cfg.exports)  # compressed-tensors: the GPTQ weights again
        out["export"] = {"peak_bytes": LIGHT_IMPORTS + 3 * shape.largest_elements * F32, "disk_bytes": files}
    if cfg.gate is not None:
        g = cfg.gate
        # every exported artifact is one more layer-wise model and one more scored view
        models = 2 + (cfg.quantize is not None) + len(cfg.exports)
        texts = max((g.eval is not None) + len(g.extra_eval), 1)  # one pass per reference; a task's has one text
        views = models + 1 + (cfg.quantize is not None and cfg.quantize.compensate is not None)
        out["evaluate"] = {"peak_bytes": evaluate_peak(shape, models, views, g.windows * texts,
                                                       g.seq_len, g.batch_size), "disk_bytes": 0}
        out["gate"] = {"peak_bytes": LIGHT_IMPORTS, "disk_bytes": 0}
        shipped = final_bytes + (shape.output_bytes if cfg.quantize is not None and cfg.output.keep_dense else 0)
        out["promote"] = {"peak_bytes": LIGHT_IMPORTS, "disk_bytes": 0 if same_filesystem else shipped}
    return out
