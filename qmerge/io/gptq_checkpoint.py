"""The GPTQ checkpoint format (AutoGPTQ "v1", `checkpoint_format = "gptq"`), which transformers loads
through optimum + gptqmodel, and qmerge's own reader of it (`DequantizedReader`, no gptqmodel needed).

Per quantized linear `m` with in features I, out features O, G groups:
  m.qweight int32 [I·bits/32, O]   codes, packed along I
  m.qzeros  int32 [G, O·bits/32]   zero − 1, packed along O (v1 convention: symmetric 4-bit is 0x77777777)
  m.scales  fp16  [G, O]
  m.g_idx   int32 [I]              group of each input column (act-order permutes it)
  m.bias    (if any) as merged
Packing is a little-endian bit stream: code k of a run occupies bits k·bits … k·bits + bits − 1, cut into
int32 words; for 2/4/8 bits that is 32/bits codes per word, for 3 bits AutoGPTQ's 32 codes in 3 words.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from qmerge.errors import BadInputError
from qmerge.io.paths import MODEL_FILES
from qmerge.io.safetensors_io import CheckpointReader
from qmerge.io.atomic import write_json

QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
FORMAT = "gptq"


def _run(bits: int) -> tuple[int, int]:
    """(codes, int32 words) of the shortest run that fills whole words."""
    codes = 32 // math.gcd(32, bits)
    return codes, codes * bits // 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs unsigned `bits`-bit integers [n, m] along n into int32 [n·bits/32, m], a band of columns at a time (the
    shifts work in int64: whole, a 7B gate_proj's would take 0.7 GB of temporaries)."""
    codes, words = _run(bits)
    n, m = values.shape
    if n % codes:
        raise ValueError(f"{n} rows cannot be packed at {bits} bits: need a multiple of {codes}")
    if values.numel() and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"values outside [0, {2**bits - 1}] cannot be packed at {bits} bits")
    out = torch.empty(n // codes * words, m, dtype=torch.int32)
    band = max(1, PACK_BAND // max(1, n))
    for j in range(0, m, band):
        out[:, j:j + band] = _pack_band(values[:, j:j + band], bits, codes, words)
    return out


PACK_BAND = 1 << 22  # values per band in `pack_rows`


def _pack_band(values: torch.Tensor, bits: int, codes: int, words: int) -> torch.Tensor:
    n, m = values.shape
    v = values.to(torch.int64).reshape(n // codes, codes, m)
    if words == 1:  # 2/4/8 bits: disjoint fields of one word, so shifting and summing is OR-ing
        shifts = (torch.arange(codes, dtype=torch.int64) * bits).view(1, codes, 1)
        out = (v << shifts).sum(dim=1, keepdim=True)
    else:
        out = _pack_straddling(v, bits, codes, words)
    out = torch.where(out >= 2**31, out - 2**32, out)  # reinterpret uint32 as int32
    return out.reshape(n // codes * words, m).to(torch.int32)


def _pack_straddling(v: torch.Tensor, bits: int, codes: int, words: int) -> torch.Tensor:
    """3 bits: code by code, a code that crosses a word boundary continuing in the next word."""
    out = torch.zeros(v.shape[0], words, v.shape[2], dtype=torch.int64)
    for k in range(codes):
        word, offset = divmod(k * bits, 32)
        out[:, word] |= (v[:, k] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            out[:, word + 1] |= v[:, k] >> (32 - offset)
    return out


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [n·bits/32, m] -> int32 [n, m]."""
    codes, words = _run(bits)
    rows, m = packed.shape
    u = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows // words, words, m)
    mask = 2**bits - 1
    if words == 1:
        shifts = (torch.arange(codes, dtype=torch.int64) * bits).view(1, codes, 1)
        return ((u >> shifts) & mask).reshape(rows * codes, m).to(torch.int32)
    out = torch.empty(rows // words, codes, m, dtype=torch.int64)
    for k in range(codes):
        word, offset = divmod(k * bits, 32)
        value = u[:, word] >> offset
        if offset + bits > 32:
            value = value | (u[:, word + 1] << (32 - offset))
        out[:, k] = value & mask
    return out.reshape(rows // words * codes, m).to(torch.int32)


def pack_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                bits: int) -> dict[str, torch.Tensor]:
    """codes [O, I], scales/zeros [G, O] (zeros in [1, 2^bits − 1]), g_idx [I] -> the four stored tensors.

    v1 stores zero − 1. Zero 0 (stored −1) borrows from its neighbour and zero 2^bits (stored 2^bits − 1) carries
    into it once GPTQModel adds 1 to every field word-wise, while vLLM's kernels and `unpack_linear` read field by
    field: outside [1, 2^bits − 1] the runtimes would serve different weights."""
    if zeros.min() < 1 or zeros.max() > 2**bits - 1:
        raise ValueError(f"v1 zero points must lie in [1, {2**bits - 1}], where every runtime reads them alike")
    scales16 = scales.to(torch.float16)
    if not torch.equal(scales16.to(scales.dtype), scales):
        raise ValueError("scales must be exactly representable in fp16 (the solver rounds them before use)")
    return {"qweight": pack_rows(codes.T.contiguous(), bits),
            "qzeros": pack_rows((zeros.to(torch.int64) - 1).T.contiguous(), bits).T.contiguous(),
            "scales": scales16.contiguous(), "g_idx": g_idx.to(torch.int32).contiguous()}


def unpack_linear(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, ...]:
    """The four stored tensors -> (codes [O, I], scales float32 [G, O], zeros [G, O], g_idx [I])."""
    codes = unpack_rows(tensors["qweight"], bits).T.contiguous()
    zeros = unpack_rows(tensors["qzeros"].T.contiguous(), bits).T + 1
    return codes, tensors["scales"].to(torch.float32), zeros.contiguous(), tensors["g_idx"].to(torch.int32)


def dequantize_linear(tensors: dict[str, torch.Tensor], bits: int, served: bool = False) -> torch.Tensor:
    """W [O, I] float32 = scales[g_idx] · (codes − zeros[g_idx]).

    served: the weight the serving kernels compute, in float16 (GPTQModel's torch/exllama/marlin kernels
    multiply the fp16 scale by (q − z) in fp16). The float32 product is exact (an 11-bit scale times an integer
    of at most 9 bits), so rounding it to float16 is bit for bit the fp16 product."""
    from qmerge.ops.gptq import dequantize_grouped

    codes, scales, zeros, g_idx = unpack_linear(tensors, bits)
    w = dequantize_grouped(codes, scales, zeros, g_idx)
    return w.to(torch.float16).to(torch.float32) if served else w


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, damp: float,
                        static_groups: bool = False) -> dict:
    """`quantization_config` for config.json and the body of quantize_config.json."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "damp_percent": damp, "static_groups": static_groups, "true_sequential": True, "checkpoint_format": FORMAT}


def write_model_files(merged: Path, out_dir: Path, qconfig: dict) -> None:
    """config.json with `quantization_config`, quantize_config.json, and every tokenizer/generation file."""
    config = json.loads((merged / "config.json").read_text())
    config["quantization_config"] = qconfig
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "quantize_config.json", qconfig)
    for name in MODEL_FILES:
        if (merged / name).is_file():
            shutil.copyfile(merged / name, out_dir / name)


def read_quantization_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        qc = json.loads(path.read_text())["quantization_config"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise BadInputError(f"not a GPTQ checkpoint ({type(e).__name__}: {e})", path=path,
                            fix="point at the output folder of the quantize stage") from None
    if qc.get("quant_method") != "gptq" or qc.get("checkpoint_format", FORMAT) != FORMAT:
        raise BadInputError(f"quantization_config {qc} is not GPTQ v1 (checkpoint_format \"gptq\")", path=path)
    return qc


class DequantizedReader:
    """A GPTQ v1 checkpoint seen as float32 tensors, one at a time: `<m>.weight` of a quantized linear is qmerge's
    dequantization of its stored codes, as the serving kernels compute it (fp16, `served`), and so is its bias (the
    kernels hold it in fp16 whatever the model's dtype); every other tensor is read as stored (floats widened to
    float32)."""

    def __init__(self, folder: Path, served: bool = True):
        self.served = served
        self.bits = int(read_quantization_config(folder)["bits"])
        self.reader = CheckpointReader(folder)
        self.quantized = {n.rpartition(".")[0] for n in self.reader.tensors if n.endswith(".qweight")}
        self.names = {n for n in self.reader.tensors if n.rpartition(".")[2] not in QUANTIZED_SUFFIXES}
        self.names |= {f"{m}.weight" for m in self.quantized}

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in self.quantized:
            parts = {s: self.reader.get(f"{module}.{s}") for s in QUANTIZED_SUFFIXES}
            return dequantize_linear(parts, self.bits, self.served).to(device)
        t = self.reader.get(name, device)
        if self.served and name.endswith(".bias") and module in self.quantized:
            t = t.to(torch.float16)
        return t.to(torch.float32) if t.is_floating_point() else t


def dequantized_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as float32 (the whole model: the test twin of `DequantizedReader`)."""
    reader = DequantizedReader(folder)
    return {name: reader.get(name) for name in sorted(reader.names)}
