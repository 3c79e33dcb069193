"""quantize with `backend = "gptqmodel"`: GPTQModel 7.6.0 (extra `qmerge[gptq]`) on the merged folder, with the
same settings and calibration token ids as qmerge's own backend, saved in the same GPTQ v1 format.

Known traps (measured): on a 2-core machine it needs GPTQMODEL_CPU_WORKERS=2; it writes ./logs into
the working directory (so it runs in a temp cwd); it stores unquantized tensors as bf16; its own default
config may differ from ours (act_group_aware), so every setting is passed explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from qmerge.errors import BadInputError
from qmerge.io.gptq_checkpoint import quantization_config, write_model_files
from qmerge.io.atomic import write_json

CALIBRATION_BATCH = 8


@contextlib.contextmanager
def _scratch_cwd():
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="qmerge-gptqmodel-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def _import_gptqmodel():
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # below 2 it crashes on small machines ("Virtual pool")
    try:
        import gptqmodel  # noqa: F401
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as e:
        raise BadInputError(f'quantize.backend = "gptqmodel" but gptqmodel cannot be imported ({e})',
                            fix='pip install "qmerge[gptq]", or use backend = "qmerge"') from None
    return GPTQModel, QuantizeConfig


def run_gptqmodel(merged: Path, out: Path, ids: torch.Tensor, q) -> dict:
    GPTQModel, QuantizeConfig = _import_gptqmodel()
    config = QuantizeConfig(bits=q.bits, group_size=q.group_size, sym=q.sym, desc_act=q.desc_act,
                            act_group_aware=False, damp_percent=q.damp, static_groups=q.static_groups,
                            true_sequential=True, format="gptq")
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    with _scratch_cwd():
        model = GPTQModel.load(str(merged), config, device="cuda" if torch.cuda.is_available() else "cpu")
        model.quantize(calibration, batch_size=min(CALIBRATION_BATCH, len(calibration)), calibration_sort=None)
        model.save(str(out))
    _restamp(merged, out, quantization_config(q.bits, q.group_size, q.sym, q.desc_act, q.damp, q.static_groups))
    return {"gptqmodel_version": _version()}


def _restamp(merged: Path, out: Path, qconfig: dict) -> None:
    """Our quantization_config (checkpoint_format "gptq", no calibration data) over what GPTQModel wrote,
    and the merged folder's tokenizer files."""
    saved = json.loads((out / "config.json").read_text())
    theirs = saved.get("quantization_config", {})
    if theirs.get("checkpoint_format", theirs.get("format", "gptq")) not in ("gptq", None):
        raise RuntimeError(f"GPTQModel wrote checkpoint_format {theirs.get('checkpoint_format')!r}, expected gptq")
    dtype = saved.get("torch_dtype", saved.get("dtype"))
    write_model_files(merged, out, qconfig)
    if dtype is not None:  # the unquantized tensors are stored in GPTQModel's dtype, so say so
        config = json.loads((out / "config.json").read_text())
        config.pop("dtype", None)
        config["torch_dtype"] = dtype
        write_json(out / "config.json", config)


def _version() -> str:
    from importlib.metadata import version

    return version("gptqmodel")
