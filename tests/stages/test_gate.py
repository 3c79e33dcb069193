"""evaluate + gate + promote on a tiny model whose adapter measurably helps on held-out lee text.

Lossy candidates are built the ways people really lose deltas and put in place of the merge
artifact; `--from evaluate` then judges them: the gate must reject each with the right reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import gate_config, run_cli


def stage_dir(work: Path, stage: str) -> Path:
    (d,) = [d for d in (work / stage).iterdir() if (d / "done.json").is_file()]
    return d


def report(work: Path) -> dict:
    return json.loads((stage_dir(work, "gate") / "report.json").read_text())


@pytest.fixture(scope="module")
def honest(gated, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("honest")
    assert run_cli(gate_config(folder, gated)) == 0
    return folder


def test_honest_float32_merge_passes_and_promotes(honest, capsys):
    rep = report(honest / "work")
    cand = rep["eval"]["candidates"]["merged"]
    assert rep["gate"]["verdict"] == "pass", rep["gate"]["reasons"]
    assert cand["retention"]["defined"], cand["retention"]
    assert abs(cand["retention"]["value"] - 1) < 0.01
    assert cand["kl"]["mean"]["value"] < 1e-6
    ppl = rep["eval"]["ppl"]
    assert ppl["reference"]["value"] < ppl["base"]["value"] * 0.97  # the adapter really helps here
    release = honest / "releases" / "tiny"
    latest = release / "latest"
    manifest = json.loads((latest / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((latest / name).read_bytes()).hexdigest() == digest
    assert manifest["provenance"]["eval_token_ids_sha256"] == rep["eval"]["tokens"]["sha256"]
    assert manifest["provenance"]["adapters"][0]["sha256"]
    assert (latest / "README.md").read_text().count("| reference |") == 1
    # A second run with nothing new is a no-op that says so.
    capsys.readouterr()
    assert run_cli(honest / "qmerge.toml") == 0
    assert len([p for p in release.iterdir() if not p.name.startswith(".") and p.name != "latest"]) == 1


def _replace_merge(work: Path, model) -> None:
    merged = stage_dir(work, "merge")
    for f in merged.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(merged)


def _judge(gated, tmp_path: Path, build) -> dict:
    """Runs the honest pipeline up to merge, swaps in `build(merged_dir)`'s model, reruns evaluate+gate."""
    cfg = gate_config(tmp_path, gated)
    assert run_cli(cfg) == 0
    _replace_merge(tmp_path / "work", build(stage_dir(tmp_path / "work", "merge")))
    for d in (tmp_path / "releases").glob("*"):
        shutil.rmtree(d)
    assert run_cli(cfg, "--from", "evaluate") == 3
    assert not any((tmp_path / "releases").glob("*/*"))
    return report(tmp_path / "work")["gate"]


def _dense(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def test_gate_rejects_peft_4bit_merge(gated, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def build(_):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(gated["base"], quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, gated["adapter"]).merge_and_unload()  # re-quantized to NF4
        return merged.dequantize()

    gate = _judge(gated, tmp_path, build)
    assert any("delta retention" in r or "KL" in r for r in gate["reasons"]), gate


def test_gate_rejects_bf16_addition(gated, tmp_path):
    from safetensors.torch import load_file

    def build(merged_dir):
        model = _dense(merged_dir)
        # What a bf16 merge does: W_nf4 and ΔW in bf16, added in bf16, stored bf16.
        exact = load_file(merged_dir / "model.safetensors")
        ref = model.state_dict()
        from qmerge.models import base_model_as_trained
        from qmerge.io.base import BaseCheckpoint, NF4Recipe

        base = base_model_as_trained(BaseCheckpoint(gated["base"], NF4Recipe(64, True, "float32", "float32", None)))
        with torch.no_grad():
            for name, w in base.state_dict().items():
                if name in exact and not torch.equal(exact[name], w):
                    ref[name].copy_((w.bfloat16() + (exact[name] - w).bfloat16()).float())
        return model.to(torch.bfloat16)

    gate = _judge(gated, tmp_path, build)
    assert any("weight-space retention" in r for r in gate["reasons"]), gate


def test_gate_rejects_wrong_scale(gated, tmp_path):
    import math

    def build(merged_dir):
        # The rslora adapter merged with alpha/r instead of alpha/sqrt(r): ΔW off by sqrt(r) = 2.
        from qmerge.io.base import BaseCheckpoint, NF4Recipe
        from qmerge.models import base_model_as_trained
        from peft import PeftModel

        base = base_model_as_trained(BaseCheckpoint(gated["base"], NF4Recipe(64, True, "float32", "float32", None)))
        model = PeftModel.from_pretrained(base, gated["rslora"])
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                module.scaling["default"] /= math.sqrt(4)
        return model.merge_and_unload()

    cfg_adapter = gated["rslora"]
    cfg = gate_config(tmp_path, gated, adapter=cfg_adapter)
    assert run_cli(cfg) == 0
    _replace_merge(tmp_path / "work", build(stage_dir(tmp_path / "work", "merge")))
    assert run_cli(cfg, "--from", "evaluate") == 3
    gate = report(tmp_path / "work")["gate"]
    assert any("delta retention" in r for r in gate["reasons"]), gate


def test_gate_rejects_dropped_delta(gated, tmp_path):
    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from qmerge.models import base_model_as_trained

    gate = _judge(gated, tmp_path, lambda _: base_model_as_trained(
        BaseCheckpoint(gated["base"], NF4Recipe(64, True, "float32", "float32", None))))
    assert any("delta retention" in r for r in gate["reasons"]), gate
    assert any("weight-space retention" in r for r in gate["reasons"]), gate
