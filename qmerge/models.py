"""Whole models for evaluation: the NF4 base as trained, the reference (base + unmerged adapters), and
checkpoints on disk. float32 compute throughout (DESIGN: the reference is the float32 model whose
quantized linears hold W_nf4, with PEFT applying the adapter unmerged — never bitsandbytes' CPU 4-bit
forward, which is off by ~0.5 %)."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch

from qmerge.io.base import MATH_DTYPE, BaseCheckpoint


def _from_config_dict(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(hf_config, dtype=MATH_DTYPE)


def base_model_as_trained(base: BaseCheckpoint, device: str = "cpu") -> torch.nn.Module:
    """float32 model whose weights are exactly what the trained model saw (W_nf4 for quantized linears)."""
    model = _from_config_dict(base.hf_config)
    state = {name: base.as_trained(name) for name in base.tensors}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(base.arch.tied)
    missing = [m for m in missing if m not in tied and "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"base state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(device).eval()


def reference_model(base: BaseCheckpoint, adapters: list[tuple[Path, float]], device: str = "cpu"):
    """The model as trained: base_model_as_trained + every adapter applied unmerged by PEFT, scaled by weight."""
    from peft import PeftModel

    model = base_model_as_trained(base, device)
    names = [f"a{i}" for i in range(len(adapters))]
    # PEFT's LoRA dispatch imports gptqmodel when it is installed, whose import prints a banner on stdout:
    # stdout is for qmerge's results, so anything printed while the adapters are attached goes to stderr.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
        for name, (path, _) in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(str(path), adapter_name=name)
    if len(names) > 1:
        peft_model.base_model.set_adapter(names)
    for name, (_, weight) in zip(names, adapters):
        if weight != 1.0:
            for module in peft_model.modules():
                if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling:
                    module.scaling[name] *= weight
    return peft_model.to(device).eval()


def checkpoint_model(folder: Path, device: str = "cpu") -> torch.nn.Module:
    """A merged (dense) checkpoint loaded in float32 for evaluation."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=MATH_DTYPE).to(device).eval()
