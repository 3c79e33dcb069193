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
    for name in [*manifest["files"], "manifest.json", "README.md"]:  # every file of the release is read-only
        assert not (latest / name).stat().st_mode & 0o222, name
    assert manifest["provenance"]["eval_token_ids_sha256"] == rep["eval"]["tokens"]["sha256"]
    assert manifest["provenance"]["adapters"][0]["sha256"]
    assert (latest / "README.md").read_text().count("| reference |") == 1
    # A second run with nothing new is a no-op that says so.
    capsys.readouterr()
    assert run_cli(honest / "qmerge.toml") == 0
    assert len([p for p in release.iterdir() if not p.name.startswith(".") and p.name != "latest"]) == 1


def test_report_figures_are_rederivable_from_its_per_window_values(honest):
    """Every gated ± comes from the per-window values the report keeps: all windows reproduce it exactly, and a
    subset gives different figures (the redraw the gate-stability benchmark uses)."""
    from dataclasses import asdict

    from qmerge.scores import EvalReport

    rep = EvalReport.from_json(report(honest / "work"))
    cand, windows = rep.final_scores, rep.eval.windows
    again = rep.on_windows(list(range(windows))).final_scores
    assert (again.ppl_ratio, again.retention) == (cand.ppl_ratio, cand.retention)
    assert again.kl["mean"].value == pytest.approx(cand.kl["mean"].value, rel=1e-12)
    assert again.kl["mean"].stderr == pytest.approx(cand.kl["mean"].stderr, rel=1e-9)
    assert rep.on_windows(list(range(windows // 2))).final_scores.ppl_ratio != cand.ppl_ratio
    assert EvalReport.from_json(rep.to_json()) == rep and asdict(rep) == rep.to_json()


def _replace_merge(work: Path, model) -> None:
    merged = stage_dir(work, "merge")
    for f in merged.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(merged)


def _judge(gated, tmp_path: Path, build, adapter: str = "fragile") -> dict:
    """Runs the honest pipeline on `adapter` up to merge, swaps in `build(adapter_dir)`'s model, reruns
    evaluate + gate: exit 3, nothing published; returns the gate's verdict."""
    cfg = gate_config(tmp_path, gated, adapter=gated[adapter])
    assert run_cli(cfg) == 0
    _replace_merge(tmp_path / "work", build(gated[adapter]))
    for d in (tmp_path / "releases").glob("*"):
        shutil.rmtree(d)
    assert run_cli(cfg, "--from", "evaluate") == 3
    assert not any((tmp_path / "releases").glob("*/*"))
    return report(tmp_path / "work")["gate"]


def _as_trained(gated):
    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from qmerge.models import base_model_as_trained

    return base_model_as_trained(BaseCheckpoint(gated["base"], NF4Recipe(64, True, "float32", "float32", None)))


def test_gate_rejects_peft_4bit_merge(gated, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def build(adapter):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(gated["base"], quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # W_nf4 + ΔW re-quantized to NF4
        return merged.dequantize()

    gate = _judge(gated, tmp_path, build)
    assert any("delta retention" in r for r in gate["reasons"]), gate
    assert any("weight-space retention" in r for r in gate["reasons"]), gate


def test_gate_rejects_bf16_addition(gated, tmp_path):
    from peft import PeftModel

    def build(adapter):
        # What a bf16 merge does: W_nf4 and ΔW cast to bf16, added in bf16, stored bf16.
        model = PeftModel.from_pretrained(_as_trained(gated), adapter)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_A") and "default" in module.lora_A:
                    w = module.base_layer.weight
                    delta = module.get_delta_weight("default")
                    w.copy_((w.bfloat16() + delta.bfloat16()).float())
        return model.unload().to(torch.bfloat16)

    gate = _judge(gated, tmp_path, build, adapter="sub_bf16")
    assert any("weight-space retention" in r for r in gate["reasons"]), gate


def test_gate_rejects_wrong_scale(gated, tmp_path):
    import math

    from peft import PeftModel

    def build(adapter):
        # The rslora adapter merged with alpha/r instead of alpha/sqrt(r): ΔW off by sqrt(r) = 2.
        model = PeftModel.from_pretrained(_as_trained(gated), adapter)
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                module.scaling["default"] /= math.sqrt(4)
        return model.merge_and_unload()

    gate = _judge(gated, tmp_path, build, adapter="rslora")
    # Half the delta: weight space sees exactly 0.5; the eval text sees a perplexity rise.
    assert any("weight-space retention 0.5000" in r for r in gate["reasons"]), gate
    assert any("ppl merged/reference" in r for r in gate["reasons"]), gate


def test_gate_rejects_dropped_delta(gated, tmp_path):
    gate = _judge(gated, tmp_path, lambda _: _as_trained(gated))
    assert any("delta retention" in r for r in gate["reasons"]), gate
    assert any("weight-space retention" in r for r in gate["reasons"]), gate
    # Asking for promote alone after that rejection must not publish the rejected candidate.
    assert run_cli(tmp_path / "qmerge.toml", "--only", "promote") == 3
    assert not any((tmp_path / "releases").glob("*/*"))


@pytest.mark.parametrize("outcomes,want", [
    (["pass", "pass"], "pass"), (["fail", "pass"], "partial"), (["inconclusive", "fail"], "reject"),
    (["inconclusive", "inconclusive"], "inconclusive"), (["fail", "inconclusive"], "reject")])
def test_the_release_verdict_when_artifacts_disagree(outcomes, want):
    """None passed: a rejected artifact makes the release a reject, whichever comes first (it read
    "inconclusive" when the first artifact was, as if more windows could save the release)."""
    from qmerge.stages.gate import Check, GateVerdict, overall

    verdicts = {f"a{i}": GateVerdict(f"a{i}", (Check("kl", 0.1, 0.05, o, ""),)) for i, o in enumerate(outcomes)}
    assert overall(verdicts) == want
