"""The merged checkpoint behaves exactly like the model as trained, for every adapter variant.

Reference (docs/design.md, "Numerics rules"): the float32 model whose quantized linears hold W_nf4, with PEFT
applying the adapter unmerged; W_nf4 comes from transformers + bitsandbytes (`bnb_oracle`), never from
qmerge's own NF4 code. Tolerance 1e-5 relative (max |Δlogit| / max |logit|): a float32 merge
differs from the unmerged forward only by float32 re-association (x@(W+ΔW) vs x@W + (x@A)@B·s),
measured ~1e-7..1e-6 on these models; a lost or wrong delta moves logits by > 1e-3 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import logits, make_adapter, make_base, run_cli, write_config

TOL = 1e-5


def finished(work: Path, stage: str) -> Path:
    dirs = [d for d in (work / stage).iterdir() if (d / "done.json").is_file()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def bnb_oracle(base: Path, nf4: dict):
    """The base as training saw it, built by transformers + bitsandbytes themselves (not qmerge's NF4 code):
    quantized at load time in `load_dtype` (or read pre-quantized), dequantized by bitsandbytes, each
    quantized linear's weight cast to `compute_dtype` as Linear4bit's forward does, then float32."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if "quantization_config" in json.loads((base / "config.json").read_text()):
        model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtypes[nf4["compute_dtype"]])
        load = "auto" if nf4["load_dtype"] == "auto" else dtypes[nf4["load_dtype"]]
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=load, device_map="cpu")
    compute = {n: m.compute_dtype or model.dtype for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert compute, "bitsandbytes quantized nothing"
    model = model.dequantize()
    with torch.no_grad():
        for name, dtype in compute.items():
            w = model.get_submodule(name).weight
            w.data = w.data.to(dtype)
    return model.float().eval()


def compare(tmp_path: Path, base: Path, adapters: list[tuple[Path, float]], tokens, **config) -> dict:
    """Merges with qmerge (float32 storage) and compares with PEFT applying the adapters unmerged to
    `bnb_oracle`: equal within TOL, and clearly different from the oracle base alone."""
    from peft import PeftModel

    from qmerge.models import checkpoint_model

    cfg = write_config(tmp_path, base, adapters, **config)
    assert run_cli(cfg) == 0
    merged = finished(tmp_path / "work", "merge")
    nf4 = {"load_dtype": "auto", "compute_dtype": "float32", **config.get("nf4", {})}
    plain = logits(bnb_oracle(base, nf4), tokens)
    oracle = PeftModel.from_pretrained(bnb_oracle(base, nf4), str(adapters[0][0]), adapter_name="a0")
    for i, (path, _) in enumerate(adapters[1:], 1):
        oracle.load_adapter(str(path), adapter_name=f"a{i}")
    oracle.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    for i, (_, weight) in enumerate(adapters):  # [[adapters]] weight w scales that adapter's ΔW
        for module in oracle.modules():
            if isinstance(getattr(module, "scaling", None), dict) and f"a{i}" in module.scaling:
                module.scaling[f"a{i}"] *= weight
    ref = logits(oracle.eval(), tokens)
    out = logits(checkpoint_model(merged), tokens)
    scale = ref.abs().max()
    rel_err = float((out - ref).abs().max() / scale)
    rel_from_base = float((out - plain).abs().max() / scale)
    assert rel_err < TOL, f"merged differs from the reference by {rel_err:.2e} relative"
    assert rel_from_base > 1e-3, f"merged is indistinguishable from the base ({rel_from_base:.2e})"
    return json.loads((merged / "merge_report.json").read_text())


def test_plain_lora(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    report = compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)
    assert report["changed_tensors"] == 6
    assert all(abs(v["retention"] - 1) < 1e-6 for v in report["layers"].values())


def test_pickled_bin_adapter(tmp_path, tiny_llama, tokens):
    """An adapter_model.bin merges as its safetensors twin does (read memory-mapped, weights_only)."""
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)


def test_rslora(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a", use_rslora=True, r=4, lora_alpha=8)
    compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)


def test_rank_and_alpha_pattern(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a", rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                           alpha_pattern={"v_proj": 32, "down_proj": 3})
    compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path, tokens):
    base = make_base(tmp_path / "gpt2", arch="gpt2", dtype="float32")
    adapter = make_adapter(base, tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    compare(tmp_path, base, [(adapter, 1.0)], tokens)


def test_bias_all_and_lora_bias(tmp_path, tokens):
    base = make_base(tmp_path / "b", bias=True)
    a1 = make_adapter(base, tmp_path / "a1", bias="all")
    a2 = make_adapter(base, tmp_path / "a2", lora_bias=True, target_modules=["k_proj", "o_proj"], seed=3)
    for adapter in (a1, a2):
        sub = tmp_path / f"run-{adapter.name}"
        sub.mkdir()
        compare(sub, base, [(adapter, 1.0)], tokens)


def test_modules_to_save_unties_lm_head(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a", modules_to_save=["lm_head"])
    report = compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)
    assert report["untied"] == ["lm_head.weight"]


def test_dora(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a", use_dora=True)
    compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)


def test_embedding_lora_on_tied_model(tmp_path, tiny_llama, tokens):
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_llama, tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    report = compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)
    assert report["untied"] == ["lm_head.weight"]
    merged = load_file(finished(tmp_path / "work", "merge") / "model.safetensors")
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_two_adapters_summed(tmp_path, tiny_llama, tokens):
    a1 = make_adapter(tiny_llama, tmp_path / "a1", seed=1)
    a2 = make_adapter(tiny_llama, tmp_path / "a2", seed=2, target_modules=["q_proj", "o_proj", "up_proj"])
    compare(tmp_path, tiny_llama, [(a1, 0.7), (a2, 0.5)], tokens)


@pytest.mark.parametrize("stored,load,compute", [("bfloat16", "auto", "bfloat16"), ("float32", "float32", "float32"),
                                                 ("float32", "bfloat16", "float32")])
def test_base_dtypes(tmp_path, tokens, stored, load, compute):
    base = make_base(tmp_path / "b", dtype=stored)
    adapter = make_adapter(base, tmp_path / "a")
    compare(tmp_path, base, [(adapter, 1.0)], tokens, nf4={"load_dtype": load, "compute_dtype": compute})


def test_prequantized_bnb_base(tmp_path, tiny_llama, tokens):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=q, device_map="cpu")
    model.save_pretrained(tmp_path / "bnb")
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    compare(tmp_path, tmp_path / "bnb", [(adapter, 1.0)], tokens)


def test_lora_on_tied_lm_head(tmp_path, tiny_llama, tokens):
    adapter = make_adapter(tiny_llama, tmp_path / "a", target_modules=["lm_head", "q_proj"])
    report = compare(tmp_path, tiny_llama, [(adapter, 1.0)], tokens)
    assert report["untied"] == ["lm_head.weight"]
