"""scripts/train_demo_adapter.py's guard against bitsandbytes' CPU inference packing.

On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight for its inference kernel on the first
eval-mode forward without grad and keeps it packed; the weight then no longer dequantizes to W_nf4, so a LoRA
backward through it is wrong. The script trains before any eval forward and refuses packed layers: this holds
bitsandbytes to the behaviour the guard is written for, and the guard to catching it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_adapter", REPO / "scripts" / "train_demo_adapter.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_an_eval_forward_repacks_nf4_weights_and_the_guard_refuses_them(tiny_llama, tokens):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    script = _script()
    model = script.load_nf4_base(tiny_llama)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers[0].support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    w_nf4 = F.dequantize_4bit(layers[0].weight.data, layers[0].weight.quant_state).clone()
    script.assert_trainable(model)  # freshly loaded: nothing packed
    with torch.no_grad():
        model.eval()(input_ids=tokens)
    packed = F.dequantize_4bit(layers[0].weight.data, layers[0].weight.quant_state)
    assert not torch.equal(packed, w_nf4)  # the stored bytes are no longer NF4: a backward through them is wrong
    with pytest.raises(RuntimeError, match="CPU inference packing"):
        script.assert_trainable(model)


def test_the_committed_training_records_hold_the_texts_the_script_records():
    """Each demo adapter's qmerge_training.json lists its training documents as the script records them now (the
    records of adapters trained before were completed by `--record-text-only`, from the same spec)."""
    import json

    script = _script()
    for name, recipe in script.RECIPES.items():
        record = json.loads((REPO / "adapters" / name / "qmerge_training.json").read_text())
        assert record["train_text"] == script.train_text_record(recipe.train_text), name
        assert len(record["train_text"]["document_sha256"]) > 100


def test_an_adapter_is_not_gated_on_its_own_training_text(tmp_path, capsys, monkeypatch):
    """demo-r8 was trained on lee documents 0:110: a gate.eval holding some of them is exit 2 naming the record."""
    from tests.conftest import run_cli, write_config, write_text_spec
    from tests.io.test_gguf import GGUF, trained_nf4

    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    adapter = REPO / "adapters" / "demo-r8"
    nf4 = trained_nf4(adapter)
    for documents, code in (("100:130", 2), ("265:300", 0)):
        spec = write_text_spec(tmp_path, f"eval{code}", documents)
        cfg = write_config(tmp_path, GGUF, [(adapter, 1.0)], nf4=nf4,
                           extra=f'[gate]\neval = "{spec}"\nwindows = 2\nseq_len = 64\n')
        assert run_cli(cfg, "--dry-run") == code, documents
    err = capsys.readouterr().err
    assert "gate.eval" in err and "holds 10 of the documents the adapter was trained on (calibration/news-train.toml" \
        in err and str(adapter / "qmerge_training.json") in err
