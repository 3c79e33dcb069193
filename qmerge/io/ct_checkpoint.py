"""compressed-tensors output: a qmerge GPTQ v1 checkpoint rewritten, without requantizing, as a compressed-tensors
`pack-quantized` checkpoint (the format llm-compressor writes and vLLM's WNA16 kernels and transformers'
CompressedTensorsHfQuantizer read), and a reader of it built on compressed-tensors' own decompression.

Per quantized linear `m` with in features I, out features O, G groups (G = 1: per output channel), b bits:
  m.weight_packed      int32 [O, I·b/32]   codes − 2^(b−1) as signed b-bit ints, stored + 2^(b−1) (that is: the
                                          GPTQ codes themselves), little-endian along I (= GPTQ qweight transposed)
  m.weight_scale       fp16  [O, G]       the GPTQ scales transposed
  m.weight_zero_point  int32 [O·b/32, G]  asymmetric only: zero − 2^(b−1), stored + 2^(b−1) (= the zero itself),
                                          packed along O; symmetric schemes store none (zero 2^(b−1) implied)
  m.weight_shape       int64 [2]          [O, I]
The dequantized weight is scale · (q − zp) in both formats with q − zp = code − zero, so the conversion is exact:
compressed-tensors computes it in the scale's dtype, fp16 here, which is bit for bit qmerge's served GPTQ product
(`dequantize_linear(served=True)`); with the scale widened to float32 (a float32 transformers load) it is the exact
float32 product (`served=False`). See docs/design.md, "compressed-tensors output".

Refused (BadInputError, exit 2): bits other than 4 and 8 (vLLM's WNA16 scheme takes only those), act-order groups
(compressed-tensors 0.20 removed g_idx, so only contiguous groups are stored), a zero point of 2^b (GPTQ v1 can
hold it, a signed b-bit zero point cannot), a symmetric checkpoint whose zeros are not 2^(b−1), and a quantized
module that is not an nn.Linear (compressed-tensors' "Linear" target would not match it).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qmerge.errors import BadInputError
from qmerge.io.atomic import atomic_dir, write_json
from qmerge.io.gptq_checkpoint import QUANTIZED_SUFFIXES, pack_rows, read_quantization_config, unpack_rows
from qmerge.io.paths import MODEL_FILES
from qmerge.io.safetensors_io import CheckpointReader, ShardWriter

CT_VERSION = "0.20.0"  # the compressed-tensors release this layout and config were checked against
FORMAT = "pack-quantized"
SUPPORTED_BITS = (4, 8)
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
DEFAULT_SHARD_BYTES = 5 * 2**30
FIX_ACT_ORDER = ("re-quantize with quantize.desc_act = false (or group_size = -1, where act-order needs no g_idx), "
                 "or ship the GPTQ checkpoint")


@dataclass(frozen=True)
class LinearPlan:
    """One quantized linear whose g_idx and zero points were checked convertible: its shape and group count."""

    module: str
    out_features: int
    in_features: int
    groups: int


def ct_quantization_config(bits: int, group_size: int, sym: bool, ignore: list[str]) -> dict:
    """The `quantization_config` compressed-tensors writes for one W{bits}A16 int scheme over every nn.Linear
    (what `ModelCompressor.update_config` dumps for the same QuantizationConfig; checked in the tests)."""
    channel = group_size == -1
    weights = {"dynamic": False, "group_size": None if channel else group_size, "num_bits": bits,
               "strategy": "channel" if channel else "group", "symmetric": sym, "type": "int"}
    scheme = {"format": None, "input_activations": None, "output_activations": None, "targets": ["Linear"],
              "weights": weights}
    return {"config_groups": {"group_0": scheme}, "format": FORMAT, "global_compression_ratio": None,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


def _refuse(message: str, path: Path, fix: str) -> BadInputError:
    return BadInputError(f"cannot be written as compressed-tensors exactly: {message}", path=path, fix=fix)


def _zeros(reader: CheckpointReader, module: str, bits: int) -> torch.Tensor:
    """The module's GPTQ zero points [G, O] (v1 stores zero − 1)."""
    return unpack_rows(reader.get(f"{module}.qzeros").T.contiguous(), bits).T + 1


def _plan_linear(reader: CheckpointReader, module: str, bits: int, group_size: int, sym: bool,
                 folder: Path) -> LinearPlan:
    """Shapes, g_idx and zero points of one GPTQ linear checked against what compressed-tensors can hold."""
    t = reader.tensors
    missing = [s for s in QUANTIZED_SUFFIXES if f"{module}.{s}" not in t]
    if missing:
        raise BadInputError(f"GPTQ linear {module} lacks {missing}", path=folder,
                            fix="the checkpoint is incomplete: rebuild it with the quantize stage")
    rows, out_features = t[f"{module}.qweight"].shape
    in_features = rows * 32 // bits
    groups = t[f"{module}.scales"].shape[0]
    want_groups = 1 if group_size == -1 else in_features // group_size
    if t[f"{module}.g_idx"].shape != (in_features,) or t[f"{module}.scales"].shape != (want_groups, out_features) \
            or (group_size != -1 and in_features % group_size):
        raise BadInputError(f"GPTQ linear {module}: qweight {list(t[f'{module}.qweight'].shape)}, scales "
                            f"{list(t[f'{module}.scales'].shape)}, g_idx {list(t[f'{module}.g_idx'].shape)} do not fit "
                            f"{bits} bits and group_size {group_size}", path=folder,
                            fix="the checkpoint is damaged or its config.json does not describe it")
    g_idx = reader.get(f"{module}.g_idx").to(torch.int64)
    contiguous = torch.arange(in_features) // (in_features if group_size == -1 else group_size)
    if not torch.equal(g_idx, contiguous):
        raise _refuse(f"{module}.g_idx maps input columns to groups out of order (act-order with groups); "
                      "compressed-tensors 0.20 stores only contiguous groups (its g_idx, actorder \"group\", "
                      "was removed)", folder, FIX_ACT_ORDER)
    zeros = _zeros(reader, module, bits)
    mid = 2 ** (bits - 1)
    if sym and not bool((zeros == mid).all()):
        raise _refuse(f"config.json says sym = true but {module}.qzeros holds zero points other than {mid}",
                      folder, "fix the checkpoint's quantization_config (sym = false) or rebuild it")
    if not sym and int(zeros.max()) > 2**bits - 1:
        raise _refuse(f"{module}.qzeros holds a zero point of {int(zeros.max())}; a signed {bits}-bit zero point "
                      f"reaches {2**bits - 1} at most", folder,
                      "re-quantize with qmerge's quantize stage (its zero points stay within range)")
    return LinearPlan(module, out_features, in_features, groups)


def _linear_modules(config: dict) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """({name: (out, in)} of every exact nn.Linear, names of every other module) of the model, on the meta device."""
    from qmerge.io.architecture import hf_config, meta_model

    model = meta_model(hf_config(config))
    linears = {n: tuple(m.weight.shape) for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    return linears, {n for n, _ in model.named_modules()} - set(linears)


def plan_conversion(gptq_folder: Path) -> tuple[dict, list[LinearPlan], dict]:
    """Everything checked before a byte is written: (GPTQ quantization_config, the linears, the CT config)."""
    qc = read_quantization_config(gptq_folder)
    bits, group_size, sym = int(qc["bits"]), int(qc["group_size"]), bool(qc["sym"])
    path = gptq_folder / "config.json"
    if bits not in SUPPORTED_BITS:
        raise _refuse(f"bits = {bits}; compressed-tensors' int weight schemes are served (vLLM WNA16) at "
                      f"{' and '.join(map(str, SUPPORTED_BITS))} bits only", path,
                      "re-quantize with quantize.bits = 4 or 8, or ship the GPTQ checkpoint")
    reader = CheckpointReader(gptq_folder)
    modules = sorted(n[: -len(".qweight")] for n in reader.tensors if n.endswith(".qweight"))
    if not modules:
        raise BadInputError("config.json says GPTQ but no tensor ends in .qweight", path=gptq_folder,
                            fix="point at the output folder of the quantize stage")
    plans = [_plan_linear(reader, m, bits, group_size, sym, gptq_folder) for m in modules]
    config = json.loads(path.read_text())
    linears, others = _linear_modules(config)
    foreign = [m for m in modules if m not in linears]
    if foreign:
        kind = "not an exact nn.Linear" if foreign[0] in others else "not a module of this architecture"
        raise _refuse(f"quantized module {foreign[0]} is {kind}; compressed-tensors' \"Linear\" target would "
                      "not quantize it", path, "ship the GPTQ checkpoint")
    for p in plans:
        if linears[p.module] != (p.out_features, p.in_features):
            raise BadInputError(f"GPTQ linear {p.module} is {p.out_features}×{p.in_features}, the model's "
                                f"{linears[p.module][0]}×{linears[p.module][1]}", path=gptq_folder,
                                fix="the checkpoint does not belong to its config.json")
    ignore = sorted(set(linears) - set(modules))
    return qc, plans, ct_quantization_config(bits, group_size, sym, ignore)


def _ct_tensors(reader: CheckpointReader, plan: LinearPlan, bits: int, sym: bool) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors, from its GPTQ tensors: a transpose for codes and scales, the zero
    points unpacked (GPTQ's zero − 1) and packed again along the output dimension as the zeros themselves."""
    m = plan.module
    out = {"weight_packed": reader.get(f"{m}.qweight").T.contiguous(),
           "weight_scale": reader.get(f"{m}.scales").T.contiguous()}
    if not sym:
        out["weight_zero_point"] = pack_rows(_zeros(reader, m, bits).T.contiguous(), bits)
    out["weight_shape"] = torch.tensor([plan.out_features, plan.in_features], dtype=torch.int64)
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_compressed_tensors(gptq_folder: Path, out_dir: Path, quiet: bool = True,
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Converts the GPTQ v1 checkpoint in `gptq_folder` into a compressed-tensors pack-quantized checkpoint at
    `out_dir` (published atomically; an existing `out_dir` is refused). Tensor by tensor, in the source's order:
    memory stays at one tensor. Same input → same bytes. Returns a report."""
    start = time.monotonic()
    gptq_folder, out_dir = Path(gptq_folder), Path(out_dir)
    qc, plans, ct_config = plan_conversion(gptq_folder)
    bits, sym = int(qc["bits"]), bool(qc["sym"])
    by_module = {p.module: p for p in plans}
    reader = CheckpointReader(gptq_folder)
    count = 0
    with atomic_dir(out_dir) as tmp:
        with ShardWriter(tmp, max_shard_bytes=max_shard_bytes) as writer:
            for name in tqdm(list(reader.tensors), desc="compressed-tensors", disable=quiet, unit="tensor"):
                module, _, suffix = name.rpartition(".")
                if module in by_module and suffix in QUANTIZED_SUFFIXES:
                    if suffix != "qweight":
                        continue  # written with the module's qweight
                    for ct_suffix, tensor in _ct_tensors(reader, by_module[module], bits, sym).items():
                        writer.add(f"{module}.{ct_suffix}", tensor)
                        count += 1
                else:
                    writer.add(name, reader.get(name))  # embeddings, norms, lm_head, biases: as stored
                    count += 1
        config = json.loads((gptq_folder / "config.json").read_text())
        config["quantization_config"] = ct_config
        write_json(tmp / "config.json", config)
        for file in MODEL_FILES:
            if (gptq_folder / file).is_file():
                shutil.copyfile(gptq_folder / file, tmp / file)
        size = _folder_bytes(tmp)
    return {"format": FORMAT, "source": str(gptq_folder), "linears": len(plans), "tensors": count, "bytes": size,
            "seconds": round(time.monotonic() - start, 3), "quantization_config": ct_config}


class CTDequantizedReader:
    """A compressed-tensors pack-quantized checkpoint seen as float32 tensors, one at a time, through
    compressed-tensors' own code: its QuantizationConfig parses the config, its compressor registry picks the
    format's compressor, and `decompress` (unpack_from_int32 + dequantize) makes `<m>.weight`. Nothing of
    qmerge's GPTQ or writer code is used, so the readback checks the writer instead of repeating it.

    served=True (default): the scale as stored (fp16), so compressed-tensors computes scale·(q − zp) in fp16 —
    the product fp16 serving computes, and bit for bit what `DequantizedReader(served=True)` gives for the GPTQ
    source. served=False: the scale widened to float32 first, the exact product (a float32 transformers load).
    Every other tensor is read as stored (floats widened to float32). Same interface as `DequantizedReader`."""

    def __init__(self, folder: Path, served: bool = True):
        self.folder, self.served = Path(folder), served
        try:
            from compressed_tensors.compressors import BaseCompressor
            from compressed_tensors.quantization import QuantizationConfig
        except ImportError as e:
            raise BadInputError(f"reading a compressed-tensors checkpoint needs compressed-tensors ({e})",
                                path=self.folder, fix="pip install 'qmerge[ct]' (compressed-tensors==0.20.0)") from None
        path = self.folder / "config.json"
        try:
            raw = json.loads(path.read_text())["quantization_config"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
            raise BadInputError(f"not a compressed-tensors checkpoint ({type(e).__name__}: {e})", path=path,
                                fix="point at a folder written by write_compressed_tensors") from None
        if raw.get("quant_method") != "compressed-tensors":
            raise BadInputError(f"quant_method is {raw.get('quant_method')!r}, not compressed-tensors", path=path)
        qconfig = QuantizationConfig.model_validate(
            {k: v for k, v in raw.items() if k in QuantizationConfig.model_fields})
        if len(qconfig.config_groups) != 1 or qconfig.quantization_status != "compressed":
            raise BadInputError(f"{len(qconfig.config_groups)} config groups, status {qconfig.quantization_status}: "
                                "this reader takes one compressed scheme", path=path)
        (self.scheme,) = qconfig.config_groups.values()
        self.compressor = BaseCompressor.get_value_from_registry(self.scheme.format or qconfig.format)
        self.reader = CheckpointReader(self.folder)
        self.quantized = {n.rpartition(".")[0] for n in self.reader.tensors if n.endswith(".weight_packed")}
        self.names = {n for n in self.reader.tensors if n.rpartition(".")[2] not in CT_SUFFIXES}
        self.names |= {f"{m}.weight" for m in self.quantized}

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in self.quantized:
            state = {s: self.reader.get(f"{module}.{s}") for s in CT_SUFFIXES if f"{module}.{s}" in self.reader.tensors}
            if not self.served:
                state["weight_scale"] = state["weight_scale"].to(torch.float32)
            return self.compressor.decompress(state, self.scheme)["weight"].to(device=device, dtype=torch.float32)
        t = self.reader.get(name, device)
        return t.to(torch.float32) if t.is_floating_point() else t
