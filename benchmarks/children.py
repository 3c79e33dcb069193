"""The competing merge paths, one per child process (so each one's wall time, peak RSS and I/O are its own),
and the float64 reference that every output is compared against.

    python benchmarks/children.py peft-fp32 BASE ADAPTER OUT DTYPE DEVICE
    python benchmarks/children.py peft-4bit BASE ADAPTER OUT DTYPE DEVICE
    python benchmarks/children.py compare BASE ADAPTER RESULT.json NAME=FOLDER...

The PEFT paths are the script a user writes today (transformers + bitsandbytes + peft). Both load the base
with `dtype=float32`, NF4, double quant, compute dtype float32; bitsandbytes' default blocksize is 64 (this
transformers' `BitsAndBytesConfig` has no blocksize field). The float32 path dequantizes *before* wrapping
with PeftModel: PEFT's bnb LoRA layer cannot be merged once transformers has swapped its base layer.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def _load_4bit(base: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, quantization_config=_bnb_config(), dtype=torch.float32,
                                                device_map=device)


def peft_fp32(base: str, adapter: str, out: str, dtype: str, device: str) -> None:
    from peft import PeftModel

    model = _load_4bit(base, device)
    model = model.dequantize(dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.to(DTYPES[dtype]).save_pretrained(out)


def peft_4bit(base: str, adapter: str, out: str, dtype: str, device: str) -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_4bit(base, device), adapter)
    model.merge_and_unload().save_pretrained(out)  # re-quantized to NF4 by PEFT's Linear4bit.merge


def reference(base_reader, quantized: set[str], lora: dict, name: str) -> torch.Tensor:
    """float64 W_nf4 + scale·B@A: the NF4 round trip by bitsandbytes itself (not qmerge's torch twin)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = base_reader.get(name).to(torch.float32)
    module = name[: -len(".weight")]
    if module in quantized:
        packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        w = dequantize_4bit(packed, qs).to(torch.float32)
    w = w.to(torch.float64)
    if module in lora:
        a, b, scale = lora[module]
        w = w + scale * (b.to(torch.float64) @ a.to(torch.float64))
    return w


def _output_reader(folder: Path):
    """name -> float64 tensor loader for an output folder (a bnb 4-bit one is dequantized by bitsandbytes)."""
    from qmerge.io.safetensors_io import CheckpointReader
    from qmerge.ops.nf4 import dequantize_nf4_bnb, nf4_state_from_serialized

    reader = CheckpointReader(folder)
    names = set(reader.tensors)

    def load(name: str) -> torch.Tensor | None:
        if f"{name}.quant_state.bitsandbytes__nf4" in names:
            prefix = name[: -len(".weight")]
            ts = {k: reader.get(k) for k in names if k == name or k.startswith(name + ".")}
            return dequantize_nf4_bnb(nf4_state_from_serialized(ts, prefix)).to(torch.float64)
        return reader.get(name).to(torch.float64) if name in names else None

    return load


def compare(base: str, adapter: str, result: str, outputs: list[str]) -> None:
    """Streams the reference tensor by tensor; records max |out − ref| per output over every tensor, and over
    the merged (LoRA-touched) tensors, plus the share of tensors an output is missing."""
    from qmerge.io.adapter import read_adapter
    from qmerge.io.architecture import describe_architecture
    from qmerge.io.safetensors_io import CheckpointReader

    reader = CheckpointReader(Path(base))
    arch = describe_architecture(Path(base), None, None)
    ad = read_adapter(Path(adapter))
    lora = {m: (ad.load(mod.lora_a), ad.load(mod.lora_b), mod.scale) for m, mod in ad.modules.items()}
    loaders = {k: _output_reader(Path(v)) for k, v in (o.split("=", 1) for o in outputs)}
    stats = {k: {"max_abs_diff": 0.0, "max_abs_diff_merged": 0.0, "missing": []} for k in loaders}
    for name in reader.tensors:
        ref = reference(reader, set(arch.quantized), lora, name)
        for k, load in loaders.items():
            out = load(name)
            if out is None:
                stats[k]["missing"].append(name)
                continue
            d = float((out.reshape(ref.shape) - ref).abs().max())
            stats[k]["max_abs_diff"] = max(stats[k]["max_abs_diff"], d)
            if name[: -len(".weight")] in lora:
                stats[k]["max_abs_diff_merged"] = max(stats[k]["max_abs_diff_merged"], d)
    Path(result).write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    if what == "compare":
        compare(args[0], args[1], args[2], args[3:])
    else:
        {"peft-fp32": peft_fp32, "peft-4bit": peft_4bit}[what](*args)
