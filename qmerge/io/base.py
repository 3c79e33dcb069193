"""The base checkpoint, tensor by tensor: its original weights and the weights the trained model saw.

A 16-bit/32-bit HF folder is re-quantized to NF4 exactly as transformers + bitsandbytes did at load
time; a pre-quantized bnb-4bit folder is dequantized from its stored state (the bit-exact route).
Only one tensor is materialised at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from qmerge.errors import BadInputError, QmergeError
from qmerge.io.architecture import Architecture, describe_architecture
from qmerge.io.safetensors_io import CheckpointReader, TensorInfo
from qmerge.numerics import DTYPES, MATH_DTYPE, cast_as_trained



@dataclass(frozen=True)
class NF4Recipe:
    """How the base was quantized and read during training (resolved, no "auto" left)."""

    blocksize: int
    double_quant: bool
    load_dtype: str | None  # None: the checkpoint's own dtype, tensor by tensor
    compute_dtype: str
    dequant_dtype: str | None  # None: what the forward did, cast(cast(code·absmax, load), compute)

    def seen_dtype_chain(self, stored: torch.dtype) -> list[torch.dtype]:
        """Casts applied to the float32 product code·absmax before the trained model used it."""
        if self.dequant_dtype is not None:
            return [DTYPES[self.dequant_dtype]]
        load = DTYPES[self.load_dtype] if self.load_dtype else stored
        return [load, DTYPES[self.compute_dtype]]


class HeadersOnly:
    """A tensor table without data."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        raise QmergeError(f"{name}: a header-only view has no tensor data (this is a bug: a dry run loaded a weight)")


class BaseCheckpoint:
    """Streams tensors of an HF folder or a pre-quantized bnb-4bit folder."""

    def __init__(self, folder: Path, recipe: NF4Recipe, skip_modules: tuple[str, ...] | None = None,
                 headers: dict[str, TensorInfo] | None = None):
        """`headers`: the tensors, when `folder` holds only config.json (a dry run's view of a GGUF not yet converted;
        loading a tensor is then an error)."""
        self.folder = folder
        self.recipe = recipe
        try:
            self.hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"cannot read config.json: {e}", path=folder / "config.json") from None
        if not isinstance(self.hf_config, dict):
            raise BadInputError("config.json is not a JSON object", path=folder / "config.json")
        qc = self.hf_config.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise BadInputError("quantization_config is not an object", path=folder / "config.json")
        if qc is not None and qc.get("quant_method") != "bitsandbytes":
            raise BadInputError(f"quantization_config.quant_method = {qc.get('quant_method')!r}; qmerge reads 16/32-bit "
                                "bases and bitsandbytes 4-bit bases", path=folder / "config.json")
        if qc is not None and not qc.get("load_in_4bit"):
            raise BadInputError("bitsandbytes 8-bit bases are not supported (the adapter must be trained on NF4)",
                                path=folder / "config.json")
        if qc is not None and qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise BadInputError(f"bnb_4bit_quant_type = {qc.get('bnb_4bit_quant_type', 'fp4')!r}: qmerge reproduces "
                                "NF4 bases (QLoRA's) only", path=folder / "config.json",
                                fix="use the full-precision base, or one quantized with bnb_4bit_quant_type = nf4")
        self.prequantized = qc is not None
        self.reader = CheckpointReader(folder) if headers is None else HeadersOnly(headers)
        self.arch: Architecture = describe_architecture(folder, skip_modules, qc)

    @cached_property
    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Logical tensor name -> (safetensors dtype, true shape), bnb state tensors folded into their weight."""
        out = {}
        for name, info in self.reader.tensors.items():
            if self.prequantized and self._is_bnb_state(name):
                continue
            if self.prequantized and self.is_quantized(name):
                out[name] = self._prequantized_meta(name[: -len(".weight")])
            else:
                out[name] = (info.dtype, tuple(info.shape))
        return out

    def _is_bnb_state(self, name: str) -> bool:
        head, sep, _ = name.partition(".weight.")
        return bool(sep) and head in self.arch.quantized

    def _prequantized_meta(self, module: str) -> tuple[str, tuple[int, ...]]:
        raw = self.reader.get(f"{module}.weight.quant_state.bitsandbytes__nf4")
        meta = json.loads(bytes(raw.tolist()).decode())
        dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[meta["dtype"]]
        shape = tuple(meta["shape"])
        return dtype, shape[::-1] if self.arch.layouts.get(module) == "conv1d" else shape

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.arch.quantized

    def original(self, name: str) -> torch.Tensor:
        """The stored weight upcast to float32 (for a pre-quantized base: its dequantized 4-bit weight)."""
        if self.prequantized and self.is_quantized(name):
            return self._prequantized_dequant(name, None)
        return self.reader.get(name).to(MATH_DTYPE)

    def as_trained(self, name: str, device: str = "cpu") -> torch.Tensor:
        """float32 of the value the trained model saw: W_nf4 for quantized linears, else cast(W, load_dtype)."""
        from qmerge.ops.nf4 import nf4_weight

        if self.prequantized and self.is_quantized(name):
            return self._prequantized_dequant(name, self.hf_config["quantization_config"].get("bnb_4bit_compute_dtype"))
        w = self.reader.get(name)
        if not w.is_floating_point():
            return w
        stored = w.dtype
        if self.prequantized:  # [base.nf4] describes how a full-precision base was loaded; not this one
            return w.to(MATH_DTYPE)
        loaded = w.to(DTYPES[self.recipe.load_dtype]) if self.recipe.load_dtype else w
        if not self.is_quantized(name):
            return loaded.to(MATH_DTYPE)
        chain = self.recipe.seen_dtype_chain(stored)
        conv1d = self.is_conv1d(name)
        # transformers quantizes a GPT-2 Conv1D weight transposed, as the [out, in] Linear4bit it becomes: the
        # NF4 blocks run along that layout, so quantize it that way and store it back as [in, out].
        out = cast_as_trained(nf4_weight(loaded.T.contiguous() if conv1d else loaded, blocksize=self.recipe.blocksize,
                                    double_quant=self.recipe.double_quant, dequant_dtype=chain[0], device=device),
                         chain[1:])
        return (out.T.contiguous() if conv1d else out).cpu()

    def nf4_input(self, name: str) -> tuple[torch.Tensor, tuple[torch.dtype, ...]] | None:
        """For a quantized [out, in] linear of a 16/32-bit base: the stored weight, which holds exactly the values
        the quantizer saw (loading only widened it), and the casts applied to code·absmax: `as_trained(name)` is
        `nf4_weight` of that plus those casts. None where the fused merge does not apply (pre-quantized, Conv1D,
        a load that rounds)."""
        if self.prequantized or not self.is_quantized(name) or self.is_conv1d(name):
            return None
        w = self.reader.get(name)
        load = DTYPES[self.recipe.load_dtype] if self.recipe.load_dtype else w.dtype
        if not w.is_floating_point() or (load != w.dtype and not _widens(w.dtype, load)):
            return None
        return w, tuple(self.recipe.seen_dtype_chain(w.dtype))

    def is_conv1d(self, name: str) -> bool:
        return name.endswith(".weight") and self.arch.layouts.get(name[: -len(".weight")]) == "conv1d"

    def _prequantized_dequant(self, name: str, compute_dtype: str | None) -> torch.Tensor:
        from qmerge.ops.nf4 import dequantize_nf4, nf4_state_from_serialized

        prefix = name[: -len(".weight")]
        tensors = {k: self.reader.get(k) for k in self.reader.tensors if k == name or k.startswith(name + ".")}
        state = nf4_state_from_serialized(tensors, prefix)
        w = dequantize_nf4(state)
        if compute_dtype:
            w = w.to(DTYPES[compute_dtype])
        return (w.T.contiguous() if self.is_conv1d(name) else w).to(MATH_DTYPE)  # stored [out, in]; Conv1D is [in, out]


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of `src` is exactly a value of `dst` (16-bit floats into float32/64, float32 into float64)."""
    return dst == torch.float64 and src in (torch.float32, torch.float16, torch.bfloat16) or \
        dst == torch.float32 and src in (torch.float16, torch.bfloat16)
