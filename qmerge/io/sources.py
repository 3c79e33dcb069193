"""One artifact folder -> its stored weights as float32 tensors by HF name, read back from the written files by a
reader that is not the writer: what evaluate scores and the layer-wise models run on.

- GPTQ v1 (`quantization_config.quant_method = "gptq"`): qmerge's dequantization, the fp16 product s·(q−z) the
  serving kernels compute (`DequantizedReader`).
- compressed-tensors: compressed-tensors' own decompression (`CTDequantizedReader`), the same fp16 product.
- a GGUF folder view (one `*.gguf` + config.json): the `gguf` package's reader and dequantizer with qmerge's
  inverse name map and Q/K un-permutation (`GGUFTensorSource`).
- anything else: the safetensors as stored (`CheckpointReader`).
"""

from __future__ import annotations

import json
from pathlib import Path


def quant_method(folder: Path) -> str | None:
    config = json.loads((Path(folder) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def tensor_source(folder: Path):
    folder = Path(folder)
    method = quant_method(folder)
    if method == "gptq":
        from qmerge.io.gptq_checkpoint import DequantizedReader

        return DequantizedReader(folder)
    if method == "compressed-tensors":
        from qmerge.io.ct_checkpoint import CTDequantizedReader

        return CTDequantizedReader(folder)
    from qmerge.io.gguf_reader import open_tensor_source

    return open_tensor_source(folder)
