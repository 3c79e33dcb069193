"""The compensation adapter on disk: a standard PEFT LoRA folder (`adapter_config.json` +
`adapter_model.safetensors`) inside the quantized artifact, in `compensation/`. Served as any LoRA on a GPTQ base
(`PeftModel.from_pretrained(gptq_model, "<release>/compensation")`, vLLM's LoRA support); r = lora_alpha, so
PEFT's scale is 1 and the stored factors are B and A as fitted (qmerge/ops/compensation.py).

`CompensatedSource` is the weight-space view of the same thing (W_served + B·A in float32): what weight-space
retention measures. Evaluate's logits go through PEFT itself (qmerge/models.py `PeftOverlay`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qmerge.io.atomic import write_json

FOLDER = "compensation"
PREFIX = "base_model.model."


def compensation_folder(artifact: Path) -> Path | None:
    """The artifact's compensation adapter folder, or None when it has none."""
    folder = Path(artifact) / FOLDER
    return folder if (folder / "adapter_config.json").is_file() else None


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """`factors`: module name (as in the checkpoint, e.g. model.layers.0.self_attn.q_proj) -> (A [rank, in],
    B [out, rank]), stored in their own dtype."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module in sorted(factors):
        a, b = factors[module]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(factors), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "base_model_name_or_path": None,
        "modules_to_save": None, "init_lora_weights": True,
    })


def read_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A, B) as stored."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("r") != config.get("lora_alpha") or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{folder}: not a compensation adapter written by qmerge (scale must be 1)")
    state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            out[module] = (tensor, state[f"{PREFIX}{module}.lora_B.weight"])
    return out


class CompensatedSource:
    """A tensor source (the quantized artifact's dequantized weights) plus the compensation: W + B·A in float32."""

    def __init__(self, source, folder: Path):
        self.source = source
        self.factors = {f"{m}.weight": ab for m, ab in read_factors(folder).items()}
        self.names = source.names

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        w = self.source.get(name, device)
        if name not in self.factors:
            return w
        a, b = self.factors[name]
        return (w.float() + b.to(device=device, dtype=torch.float32) @ a.to(device=device, dtype=torch.float32)
                ).to(w.dtype)
