"""The exact merge: W + Σ weightᵢ·ΔWᵢ in float32, cast once to the storage dtype, streamed tensor by tensor.

The base each delta lands on is either the weight the adapter was trained against (`into = "nf4"`:
dequant(NF4(W)) exactly as bitsandbytes made it) or the pre-quantization weight (`into = "original"`).
`run_merge` writes an HF folder (sharded safetensors + index + config + tokenizer) and returns the per-tensor
weight-space retention ⟨W_stored − W_base, ΔW⟩ / ‖ΔW‖²; `merged_tensors` yields the exact float32 result
tensor by tensor for whoever needs to compare against it (evaluate's weight-space retention).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qmerge.errors import BadInputError
from qmerge.io.adapter import Adapter, read_adapter
from qmerge.io.base import BaseCheckpoint, NF4Recipe
from qmerge.io.paths import MODEL_FILES, tokenizer_source
from qmerge.numerics import DTYPES, MATH_DTYPE
from qmerge.plan import Plan
from qmerge.io.safetensors_io import ShardWriter
from qmerge.ops.combine import SPARSIFY, TopK, combine, scaled_threshold
from qmerge.ops.lora import dora_weight, embedding_delta, lora_delta, lora_product
from qmerge.ops.merge_kernel import nf4_merge
from qmerge.ops.metrics import delta_metrics
from qmerge.io.atomic import write_json

@dataclass(frozen=True)
class Combination:
    """How several adapters' deltas combine per tensor (qmerge/ops/combine.py); `linear` is the plain sum."""

    method: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"
    seed: int = 0

    @classmethod
    def of(cls, settings) -> Combination:
        """From `[merge]` (config.MergeSettings)."""
        return cls(settings.method, settings.density, settings.majority_sign_method, settings.seed)


LINEAR = Combination()


@dataclass(frozen=True)
class MergeInputs:
    base: BaseCheckpoint
    adapters: tuple[tuple[Adapter, float], ...]
    into: str  # "nf4" | "original"
    device: str = "cpu"
    combination: Combination = LINEAR


def open_inputs(plan: Plan, into: str, device: str, combination: Combination = LINEAR) -> MergeInputs:
    recipe = NF4Recipe(**plan.nf4)
    # The resolved list replaces transformers' defaults exactly (an empty list means: nothing skipped).
    base = BaseCheckpoint(Path(plan.base.folder), recipe, plan.skipped_modules)
    adapters = tuple((read_adapter(path), weight) for path, weight in plan.adapter_weights)
    return MergeInputs(base, adapters, into, device, combination)


def untied(inputs: MergeInputs) -> dict[str, str]:
    """Tied pairs (target -> source) where the adapter changes at least one side: they must be stored apart."""
    changed = {f"{m}.weight" for a, _ in inputs.adapters for m in a.modules}
    changed |= {t for a, _ in inputs.adapters for t in a.replacements}
    return {t: s for t, s in inputs.base.arch.tied.items() if t in changed or s in changed}


def output_names(inputs: MergeInputs) -> list[str]:
    names = list(inputs.base.tensors)
    for target in untied(inputs):
        if target not in names:
            names.append(target)
    return names


class Scratch:
    """Whole-tensor float32 buffers for the adapters' ΔWᵢ that `run_merge` keeps from one tensor to the next.
    Allocated anew for every tensor, each is fresh memory the kernel must fault in again (on a VM that hands freed
    pages back to its host, from the host): on the 7B-shaped slice with three adapters that was ~2.5 s of the ~8 s
    TIES took over a single-adapter merge. A view taken from a slot is valid until the next `take` of that slot.

    Memory: what is held while the merge kernel runs must not outnumber what was alive there before: a linear sum
    uses two buffers (the first takes in each other delta as it is made); TIES/DARE one per adapter while they
    combine (the combination written over the first), then `drop` keeps two (7B slice, 3 adapters: TIES' peak
    1266 -> 1154 MB, a single merge's 1147). A buffer grows to the largest tensor that used its slot; before a
    larger tensor is merged without them (an untouched head or embedding), `make_room` lets them go."""

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}

    def make_room(self, numel: int) -> None:
        """Frees every buffer when a tensor of `numel` entries, larger than any of them, is next."""
        if any(numel > buffer.numel() for buffer in self._buffers.values()):
            self._buffers.clear()

    def drop(self, keep: int) -> None:
        """Frees the delta buffers past the first `keep` ("delta", k ≥ keep)."""
        for slot in [s for s in self._buffers if s[0] == "delta" and s[1] >= keep]:
            del self._buffers[slot]

    def take(self, slot: object, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        buffer = self._buffers.pop(slot, None)
        if buffer is None or buffer.numel() < n:
            buffer = None  # the smaller one is freed before the larger one is allocated
            buffer = torch.empty(n, dtype=MATH_DTYPE)
        self._buffers[slot] = buffer
        return buffer[:n].view(shape)


def _checked(adapter: Adapter, name: str) -> torch.Tensor:
    t = adapter.load(name)
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BadInputError(f"tensor {name} contains NaN or Inf", path=adapter.weights_file,
                            fix="the adapter is corrupt or training diverged; retrain or pick another checkpoint")
    return t


def _base_weight(inputs: MergeInputs, name: str, as_trained: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The weight ΔW is added to, float32: a replacement saved by the adapter, or the base as chosen."""
    for adapter, _ in inputs.adapters:
        if name in adapter.replacements:
            return _checked(adapter, adapter.replacements[name]).to(MATH_DTYPE)
    source = untied(inputs).get(name, name) if name not in inputs.base.tensors else name
    for adapter, _ in inputs.adapters:  # an untied lm_head keeps a resized embedding, not a modules_to_save copy
        if source != name and source in adapter.resized:
            return _checked(adapter, adapter.replacements[source]).to(MATH_DTYPE)
    if inputs.into == "nf4":
        return as_trained(source)
    return inputs.base.original(source)


def adapter_deltas(inputs: MergeInputs, name: str) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None]:
    """[(adapter index, ΔWᵢ = scaleᵢ·BᵢAᵢ, unweighted, float32 on CPU)] of the adapters that change `name`, and the
    DoRA magnitude if any."""
    deltas, magnitude = [], None
    for i, d, m, _, _ in _each_delta(inputs, name):
        deltas.append((i, d))
        magnitude = m if m is not None else magnitude
    return deltas, magnitude


def _each_delta(inputs: MergeInputs, name: str, scratch: Scratch | None = None, reuse: bool = False,
                unscaled: bool = False, density: float | None = None
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None, TopK | None, float | None]]:
    """(adapter index, ΔWᵢ, DoRA magnitude or None, top-k threshold or None, scale or None) for each adapter that
    changes `name`, one at a time. With `scratch`, a linear layer's ΔW on CPU is formed in slot ("delta", k) for the
    k-th one yielded; with `reuse`, every one after the first shares slot 1 (each valid only until the next is
    made: for a caller that folds them in as they come). With `unscaled` (a caller that gives `combine` the
    scales), a linear layer's weight on CPU comes as the product BᵢAᵢ with its scale (ΔWᵢ = scale·BᵢAᵢ, never
    written out); with `density` as well (TIES, magnitude_prune), with the top-k threshold of that ΔWᵢ
    (`scaled_threshold`)."""
    module, param = name.rsplit(".", 1)
    layout = inputs.base.arch.layouts.get(module, "linear")
    made = 0
    for i, (adapter, _) in enumerate(inputs.adapters):
        mod = adapter.modules.get(module)
        if mod is None:
            continue
        magnitude, threshold, scale = None, None, None
        if param == "bias" and mod.lora_b_bias:
            d = _checked(adapter, mod.lora_b_bias).to(MATH_DTYPE) * mod.scale
        elif param == "weight":
            a = _checked(adapter, mod.lora_a).to(inputs.device)
            b = _checked(adapter, mod.lora_b).to(inputs.device)
            if mod.kind == "embedding":
                d = embedding_delta(a, b, mod.scale)
            else:
                slot = ("delta", min(made, 1) if reuse else made)
                into = scratch.take(slot, (b.shape[0], a.shape[1])) \
                    if scratch is not None and inputs.device == "cpu" else None
                if unscaled and inputs.device == "cpu":
                    d, scale = lora_product(a, b, out=into), mod.scale
                    if density is not None:  # its counts hold for d.T too, not its blocks
                        threshold = scaled_threshold(d, scale, density)
                        threshold = threshold._replace(by_block=None) if threshold and layout == "conv1d" else threshold
                else:
                    d = lora_delta(a, b, mod.scale, out=into)
            d = d.T if layout == "conv1d" else d
            if mod.magnitude:
                magnitude = _checked(adapter, mod.magnitude).to(MATH_DTYPE).reshape(-1)
        else:
            continue
        made += 1
        yield i, d.cpu(), magnitude, threshold, scale


def _delta(inputs: MergeInputs, name: str, shape: torch.Size, scratch: Scratch | None = None
           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The combined delta for `name` (Σ weightᵢ·ΔWᵢ for `linear`; None when no adapter touches it), and the DoRA
    magnitude if any; in `scratch`'s buffers when given (valid until its next tensor)."""
    c = inputs.combination
    total, magnitude, deltas, thresholds, scales = None, None, [], {}, {}
    density = c.density if SPARSIFY[c.method] == "magnitude" and c.density < 1 else None
    # linear: Σ weightᵢ·ΔWᵢ, in adapter order (the bytes every earlier release wrote), in place into the first
    # as each is made (the deltas are this function's own), so that two whole-tensor deltas are alive at most.
    # Other methods: `combine` forms each ΔWᵢ from its product as it reads it
    linear = c.method == "linear"
    for i, d, m, threshold, scale in _each_delta(inputs, name, scratch, reuse=linear, unscaled=not linear,
                                                 density=density):
        magnitude = m if m is not None else magnitude
        if threshold is not None:
            thresholds[i] = threshold
        if scale is not None:
            scales[i] = scale
        if not linear:
            deltas.append((i, d))
            continue
        weight = inputs.adapters[i][1]
        d = d.mul_(weight) if weight != 1.0 else d
        total = d if total is None else total.add_(d)
    if deltas:  # adapters that do not touch `name` contribute a zero delta (they still count in TIES' election)
        full = dict(deltas)
        if len(full) < len(inputs.adapters):
            zeros = torch.zeros_like(deltas[0][1])
            full = {i: full.get(i, zeros) for i in range(len(inputs.adapters))}
        # the combination goes over the first delta, block by block after reading it: one whole tensor fewer
        into = deltas[0][1] if scratch is not None and deltas[0][1].is_contiguous() else None
        total = combine([full[i] for i in range(len(inputs.adapters))],
                        [w for _, w in inputs.adapters], c.method, c.density, c.majority_sign_method, c.seed, name,
                        out=into, thresholds=thresholds, scales=scales)
        if scratch is not None:  # no more buffers through the merge kernel than a linear sum holds (freed on return)
            scratch.drop(keep=2)
    if total is None:
        return None, magnitude
    if total.shape != shape:
        raise BadInputError(f"ΔW for {name} has shape {list(total.shape)} but the base has {list(shape)}")
    return total, magnitude


def _plain_lora(inputs: MergeInputs, name: str) -> list | None:
    """The (adapter, module, weight) that change `name` when it is an NF4-quantized linear weight changed by
    plain addition only (no DoRA, no replacement, not an untied copy) and the merge runs into the NF4 weight on
    CPU: the case `nf4_merge` fuses. None otherwise."""
    module, param = name.rsplit(".", 1)
    if inputs.into != "nf4" or inputs.device != "cpu" or param != "weight" or name not in inputs.base.tensors:
        return None
    if any(name in a.replacements for a, _ in inputs.adapters):
        return None
    touching = [(a, a.modules[module], weight) for a, weight in inputs.adapters if module in a.modules]
    if not touching or any(mod.magnitude or mod.kind == "embedding" for _, mod, _ in touching):
        return None
    return touching


def _fused_merge(inputs: MergeInputs, name: str, storage: torch.dtype, scratch: Scratch | None = None):
    """(stored, metrics) from one fused pass (`ops/merge_kernel.py`), or None where it does not apply. ΔW is formed
    in `scratch`'s buffers when given."""
    touching = _plain_lora(inputs, name)
    nf4 = inputs.base.nf4_input(name) if touching is not None else None
    if nf4 is None:
        return None
    w, chain = nf4
    if len(touching) == 1 and touching[0][2] == 1.0 and inputs.combination.density >= 1:
        # ΔW = (B@A)·scale: the kernel applies the scale
        adapter, mod, _ = touching[0]
        a, b = _checked(adapter, mod.lora_a).to(MATH_DTYPE), _checked(adapter, mod.lora_b).to(MATH_DTYPE)
        into = scratch.take(("delta", 0), (b.shape[0], a.shape[1])) if scratch is not None else None
        factor, scale = torch.matmul(b, a, out=into), mod.scale
    else:  # several adapters or a weight: their sum, exactly as the op-by-op path forms it
        factor, scale = _delta(inputs, name, w.shape, scratch)[0], 1.0
    if factor.shape != w.shape:
        raise BadInputError(f"ΔW for {name} has shape {list(factor.shape)} but the base has {list(w.shape)}")
    recipe = inputs.base.recipe
    return nf4_merge(w, factor, scale, recipe.blocksize, recipe.double_quant, chain, storage)


def merged_tensors(inputs: MergeInputs) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Yields (name, exact float32 merged tensor, W_base or None when unchanged), one at a time."""
    for name in output_names(inputs):
        yield name, *merge_one(inputs, name)


def merge_one(inputs: MergeInputs, name: str, w_nf4: Callable[[str], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(exact float32 merged tensor, W_base or None when unchanged) for `name`, op by op. `w_nf4`: where W_nf4 of
    a base tensor comes from when the caller already holds it (default: re-derived from the base shards)."""
    as_trained = w_nf4 or (lambda n: inputs.base.as_trained(n, inputs.device))
    w = _base_weight(inputs, name, as_trained)
    if not w.is_floating_point():
        return w, None
    delta, magnitude = _delta(inputs, name, w.shape)
    replaced = any(name in a.replacements for a, _ in inputs.adapters)
    if delta is None:
        return w, (as_trained(name) if replaced and name in inputs.base.tensors else None)
    return (dora_weight(w, delta, magnitude) if magnitude is not None else w + delta), w


def run_merge(inputs: MergeInputs, out_dir: Path, dtype: str, max_shard_size: int, quiet: bool = False) -> dict:
    storage = DTYPES[dtype]
    layers = {}
    names = output_names(inputs)
    scratch = Scratch()  # each tensor's ΔW buffers are consumed before the next tensor takes them again
    with ShardWriter(out_dir, max_shard_bytes=max_shard_size) as writer:
        for name in tqdm(names, desc=f"merge ({inputs.into})", disable=quiet, unit="tensor"):
            fused = _fused_merge(inputs, name, storage, scratch)
            if fused is not None:
                stored, metrics = fused
            else:
                scratch.make_room(math.prod(inputs.base.tensors[untied(inputs).get(name, name)][1]))
                merged, w_base = merge_one(inputs, name)
                stored = merged.to(storage) if merged.is_floating_point() else merged
                metrics = delta_metrics(stored, merged, w_base) if w_base is not None and \
                    w_base.shape == merged.shape else None
            if metrics is not None and not all(math.isfinite(v) for v in metrics):  # ‖ΔW‖² or its sums: inf/NaN
                _not_finite(inputs, name)
            if metrics is not None:
                layers[name] = {"retention": metrics[0], "relative_delta_norm": metrics[1], "delta_sq": metrics[2]}
            writer.add(name, stored.contiguous())
    write_model_files(inputs, out_dir, dtype)
    combination = {} if inputs.combination == LINEAR else {"combination": asdict(inputs.combination)}
    return {"into": inputs.into, "dtype": dtype, "tensors": len(names), "changed_tensors": len(layers),
            "untied": sorted(untied(inputs)), **combination, "layers": layers}


def _not_finite(inputs: MergeInputs, name: str) -> None:
    """A merged weight that is not finite, from finite factors (`_checked` refuses others): their product, scaled
    and weighted, overflows float32, or the merged value overflows the storage dtype (float16's ±65504). Nothing
    exact can be stored: exit 2 naming the tensor and the adapters."""
    module = name.rsplit(".", 1)[0]
    paths = [str(a.path) for a, _ in inputs.adapters if module in a.modules] or [str(inputs.base.folder)]
    raise BadInputError(f"merging {name} gives values that are not finite: W + ΔW (ΔW = scale·B@A, weighted) "
                        "overflows float32 or merge.dtype although every factor is finite", path=", ".join(paths),
                        fix="check the adapter's factors and its scale (lora_alpha / r) for values out of range, "
                            "or store in a dtype with a wider range")


def embedding_rows(inputs: MergeInputs) -> int | None:
    """Rows of an input embedding that an adapter replaces (None when none does)."""
    embeds = {f"{m}.weight" for m, layout in inputs.base.arch.layouts.items() if layout == "embedding"}
    for adapter, _ in inputs.adapters:
        for target in embeds & set(adapter.replacements):
            return adapter.shapes[adapter.replacements[target]][0]
    return None


def write_model_files(inputs: MergeInputs, out_dir: Path, dtype: str) -> None:
    """config.json without quantization_config (untied if needed), tokenizer from the adapter if it ships one."""
    config = dict(inputs.base.hf_config)
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    config.pop("dtype", None)
    if untied(inputs):
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    rows = embedding_rows(inputs)
    if rows is not None:  # a resized vocabulary (the adapter saved a larger embedding)
        for section in (config, config.get("text_config")):
            if isinstance(section, dict) and "vocab_size" in section:
                section["vocab_size"] = rows
    write_json(out_dir / "config.json", config)
    tokenizer_src = tokenizer_source([a.path for a, _ in inputs.adapters], inputs.base.folder)
    for fname in MODEL_FILES:
        src = (inputs.base.folder if fname == "generation_config.json" else tokenizer_src) / fname
        if src.is_file():
            shutil.copyfile(src, out_dir / fname)
