"""One artifact folder -> its stored weights as float32 tensors by HF name, read back from the written files by a
reader that is not the writer: what evaluate scores and the layer-wise models run on.

- GPTQ v1 (`quantization_config.quant_method = "gptq"`): qmerge's dequantization, the fp16 product s·(q−z) the
  serving kernels compute (`DequantizedReader`).
- compressed-tensors: compressed-tensors' own decompression (`CTDequantizedReader`), the same fp16 product.
- a GGUF folder view (one `*.gguf` + config.json): the `gguf` package's reader and dequantizer with qmerge's
  inverse name map and Q/K un-permutation (`GGUFTensorSource`).
- anything else: the safetensors as stored (`CheckpointReader`).

A quantized artifact may hold a compensation adapter in `compensation/` (qmerge/io/compensation.py): shipped
with it, counted in its bytes, and added to its weights unless `compensation=False` (the artifact "alone").
"""

from __future__ import annotations

import json
from pathlib import Path


# Stage bookkeeping written beside an artifact's model files: never shipped, never counted in its size.
NOT_SHIPPED = {"done.json", "merge_report.json", "quantize_report.json", "quantize_layers.json"}


def artifact_files(folder: Path, compensation: bool = True) -> list[Path]:
    """The files a release ships for the artifact in `folder`, in name order (the compensation adapter's last)."""
    from qmerge.io.compensation import compensation_folder

    folder = Path(folder)
    files = [f for f in sorted(folder.iterdir()) if f.is_file() and f.name not in NOT_SHIPPED]
    extra = compensation_folder(folder) if compensation else None
    return files + ([f for f in sorted(extra.iterdir()) if f.is_file()] if extra else [])


def artifact_bytes(folder: Path, compensation: bool = True) -> int:
    return sum(f.stat().st_size for f in artifact_files(folder, compensation))


def quant_method(folder: Path) -> str | None:
    config = json.loads((Path(folder) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def tensor_source(folder: Path, compensation: bool = True):
    from qmerge.io.compensation import CompensatedSource, compensation_folder

    folder = Path(folder)
    source = _stored(folder)
    extra = compensation_folder(folder) if compensation else None
    return CompensatedSource(source, extra) if extra else source


def _stored(folder: Path):
    method = quant_method(folder)
    if method == "gptq":
        from qmerge.io.gptq_checkpoint import DequantizedReader

        return DequantizedReader(folder)
    if method == "compressed-tensors":
        from qmerge.io.ct_checkpoint import CTDequantizedReader

        return CTDequantizedReader(folder)
    from qmerge.io.gguf_reader import open_tensor_source

    return open_tensor_source(folder)
