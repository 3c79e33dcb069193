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
