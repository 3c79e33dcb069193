"""The models evaluation compares, two ways: whole float32 models (the NF4 base as trained, the reference = base +
unmerged adapters, checkpoints on disk), kept as the twins tests hold the streamed path to, and the layer-wise
reference evaluate runs (`BaseSource`, `PeftOverlay`, `streamed_base`). float32 compute throughout
(docs/design.md: the reference is the float32 model whose quantized linears hold W_nf4, with PEFT applying the
adapter unmerged — never bitsandbytes' CPU 4-bit forward, which is off by ~0.5 %)."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path

import torch

from qmerge.errors import BadInputError
from qmerge.io.base import BaseCheckpoint
from qmerge.numerics import MATH_DTYPE


def model_from_config(config: dict):
    """A whole float32 model of a config.json dict (weights uninitialised)."""
    from transformers import AutoModelForCausalLM

    from qmerge.io.architecture import hf_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(hf_config(config), dtype=MATH_DTYPE)


def base_model_as_trained(base: BaseCheckpoint, device: str = "cpu") -> torch.nn.Module:
    """float32 model whose weights are exactly what the trained model saw (W_nf4 for quantized linears)."""
    model = model_from_config(base.hf_config)
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



def load_dequantized(folder: Path | str) -> torch.nn.Module:
    """A float32 transformers model whose linears hold qmerge's dequantization of the stored GPTQ codes:
    the quantized candidate exactly as stored, scored without any GPTQ kernel."""
    from qmerge.io.gptq_checkpoint import dequantized_state

    folder = Path(folder)
    model = model_from_config(json.loads((folder / "config.json").read_text()))
    state = dequantized_state(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m.endswith("lm_head.weight")) and "rotary" not in m]
    if missing or unexpected:
        raise BadInputError(f"checkpoint does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}",
                            path=folder)
    model.tie_weights()
    return model.eval()


# --- The same models streamed layer by layer (qmerge/layerwise.py): what evaluate runs. The whole-model
# functions above are their twins in tests.

class BaseSource:
    """The base as the trained model saw it (W_nf4 for quantized linears), one tensor at a time. `nf4_device`: where
    the NF4 codes are made (CUDA builds may differ from CPU in rare codes): the merge's device, so that the
    reference holds exactly the W_nf4 the merge added ΔW to."""

    def __init__(self, base: BaseCheckpoint, nf4_device: str = "cpu"):
        self.base, self.nf4_device = base, nf4_device
        self.names = set(base.tensors)

    def get(self, name: str, device="cpu") -> torch.Tensor:
        return self.base.as_trained(name, self.nf4_device).to(device)


class PeftOverlay:
    """The adapters applied unmerged by PEFT's own LoRA layers (the reference), around a meta model.

    PEFT wraps the meta model once; each time a module is made real, the base weights come from the source
    (`base_layer.` / `original_module.` names map to the base's names) and PEFT's own state-dict loading fills
    the adapter's parameters, so the LoRA branch, DoRA, biases and `modules_to_save` are computed as PEFT computes
    them. Adapter i runs as adapter `a{i}`, its scaling multiplied by its weight."""

    def __init__(self, adapters: list[tuple[Path, float]]):
        from peft.utils import load_peft_weights

        self.adapters = adapters
        self.names = [f"a{i}" for i in range(len(adapters))]
        self.states = [load_peft_weights(str(path), device="cpu") for path, _ in adapters]
        self.peft_model = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import PeftConfig, PeftModel

        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            configs = [PeftConfig.from_pretrained(str(path)) for path, _ in self.adapters]
            for c in configs:
                c.inference_mode = True
            peft_model = PeftModel(model, configs[0], adapter_name=self.names[0], low_cpu_mem_usage=True)
            for name, c in zip(self.names[1:], configs[1:]):
                peft_model.add_adapter(name, c, low_cpu_mem_usage=True)
        if len(self.names) > 1:
            peft_model.base_model.set_adapter(self.names)
        for name, (_, weight) in zip(self.names, self.adapters):
            if weight != 1.0:
                for module in peft_model.modules():
                    if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling:
                        module.scaling[name] *= weight
        self.peft_model = peft_model.eval()
        self._owned = {n for n, _ in peft_model.named_parameters(remove_duplicate=False)
                       if any(f".{a}." in n or n.endswith(f".{a}") for a in self.names)}
        return self.peft_model

    def source_name(self, name: str) -> str | None:
        if name in self._owned:
            return None
        return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")

    def fill(self, model: torch.nn.Module, names: set[str]) -> None:
        from peft import set_peft_model_state_dict

        owned = names & self._owned
        loaded: set[str] = set()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, state in zip(self.names, self.states):
                result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
                if result.unexpected_keys:
                    raise RuntimeError(f"adapter {name}: PEFT did not place {result.unexpected_keys[:5]}")
                loaded |= names - set(result.missing_keys)
        if owned - loaded:
            raise RuntimeError(f"adapter parameters not loaded: {sorted(owned - loaded)[:5]}")

    def enabled(self, on: bool):
        return contextlib.nullcontext() if on else self.peft_model.disable_adapter()


def streamed_base(base: BaseCheckpoint, adapters: list[tuple[Path, float]], device: str = "cpu",
                  nf4_device: str = "cpu"):
    """The reference (adapters on) and the base (adapters off) as one layer-wise model."""
    from qmerge.layerwise import LayerwiseModel

    return LayerwiseModel(base.hf_config, BaseSource(base, nf4_device), device, overlay=PeftOverlay(adapters),
                          where=base.folder)
