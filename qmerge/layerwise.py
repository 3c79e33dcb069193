"""Running a checkpoint one decoder layer at a time: memory is one layer plus the activations, never the
model (DESIGN "Scale").

The model is built on the meta device; only the embedding (and the rotary tables, which are computed, not
stored) become real. A catcher in place of layer 0 records what the decoder stack feeds its first layer
(hidden states and keyword arguments: position embeddings, masks), then each layer is materialised from
the shards in float32, run over the recorded batches, and freed.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.errors import BadInputError
from qmerge.io.safetensors_io import CheckpointReader

MATH_DTYPE = torch.float32


@dataclass
class LayerBatch:
    """What one decoder layer receives for one batch of windows."""

    hidden: torch.Tensor
    kwargs: dict


class _Caught(Exception):
    pass


class _Catcher(torch.nn.Module):
    """Stands in for layer 0: records its inputs and stops the forward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer
        self.seen: list[LayerBatch] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the stack may read attributes of its layers (e.g. attention_type)
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.seen.append(LayerBatch(hidden, kwargs))
        raise _Caught


def _module_path(root: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


class LayerwiseModel:
    """A checkpoint folder seen as embedding + a list of decoder layers loadable one at a time."""

    def __init__(self, folder: Path, device: str = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.device = Path(folder), torch.device(device)
        config = json.loads((self.folder / "config.json").read_text())
        config.pop("quantization_config", None)
        self.config = AutoConfig.for_model(**config)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=MATH_DTYPE)
        self.reader = CheckpointReader(self.folder)
        self.decoder = self.model.get_decoder()
        self.layers = self._find_layers()
        self.layers_prefix = _module_path(self.model, self.layers)
        self.decoder_prefix = _module_path(self.model, self.decoder)

    def _find_layers(self) -> torch.nn.ModuleList:
        count = getattr(self.config.get_text_config(), "num_hidden_layers", None)
        for module in self.decoder.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == count:
                return module
        raise BadInputError(f"no list of {count} decoder layers in {type(self.model).__name__}",
                            path=self.folder / "config.json", fix="this architecture is not supported layer-wise")

    def _materialize(self, module: torch.nn.Module, prefix: str) -> None:
        """Makes `module` real on the device with its tensors from the shards, in float32."""
        module.to_empty(device=self.device)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            key = f"{prefix}.{name}"
            if key not in self.reader.tensors:
                raise BadInputError(f"{key} is not in the checkpoint", path=self.folder,
                                    fix="the checkpoint does not match its config.json")
            value = self.reader.get(key, self.device)
            with torch.no_grad():
                tensor.copy_(value.to(tensor.dtype) if value.is_floating_point() else value)

    def _prepare_stack(self) -> None:
        """Makes every module of the decoder stack outside the layers real (embedding, rotary tables)."""
        for name, child in self.decoder.named_children():
            if child is self.layers:
                continue
            prefix = f"{self.decoder_prefix}.{name}"
            if "rotary" in name:  # computed from the config, not stored: rebuild it for real
                with torch.device(self.device):
                    setattr(self.decoder, name, type(child)(config=self.config.get_text_config()))
            elif any(True for _ in child.parameters()) and "norm" not in name:
                self._materialize(child, prefix)

    def layer_inputs(self, ids: torch.Tensor, batch_size: int) -> list[LayerBatch]:
        """Hidden states and keyword arguments that layer 0 receives, batch by batch."""
        self._prepare_stack()
        catcher = _Catcher(self.layers[0])
        self.layers[0] = catcher
        try:
            for batch in torch.split(ids, batch_size):
                try:
                    with torch.no_grad():
                        self.decoder(input_ids=batch.to(self.device), use_cache=False)
                except _Caught:
                    pass
        finally:
            self.layers[0] = catcher.layer
        for name, child in self.decoder.named_children():  # the embedding is not needed any more
            if child is not self.layers:
                child.to_empty(device="meta")
        return catcher.seen

    def load_layer(self, index: int) -> torch.nn.Module:
        layer = self.layers[index]
        self._materialize(layer, f"{self.layers_prefix}.{index}")
        return layer.eval()

    def free_layer(self, index: int) -> None:
        self.layers[index].to_empty(device="meta")

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"


def run_layer(layer: torch.nn.Module, batch: LayerBatch) -> torch.Tensor:
    with torch.no_grad():
        out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out
