"""Running a model one decoder layer at a time: memory is one layer per model plus the activations, never the
model (docs/design.md, "Scale"). GPTQ and evaluation share this runner.

The model is built on the meta device; only what a step needs becomes real. A catcher in place of layer 0
records what the decoder stack feeds its first layer (hidden states and keyword arguments: position
embeddings, masks); then each layer is materialised in float32 from a `TensorSource`, run over the recorded
batches, and freed; at the end the final norm and the output head turn the last hidden states into logits.

Where the weights come from is the source's business: a dense checkpoint (`CheckpointReader`), a GPTQ checkpoint
dequantized tensor by tensor (`qmerge.io.gptq_checkpoint.DequantizedReader`), or the NF4 base as trained
(`qmerge.models.BaseSource`). An `Overlay` may wrap the meta model (PEFT's LoRA layers for the reference) and
fill the parameters it owns after the source has filled the rest.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import re
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from qmerge.errors import BadInputError
from qmerge.io.architecture import hf_config, meta_model


class TensorSource(Protocol):
    names: Collection[str]  # logical tensor names, as in an HF checkpoint of the unwrapped model

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor: ...


class Overlay(Protocol):
    """Extra modules wrapped around the meta model (e.g. PEFT LoRA layers) and the weights only it knows."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def source_name(self, name: str) -> str | None:
        """The source tensor behind parameter `name` of the wrapped model, None where the overlay fills it."""

    def fill(self, model: torch.nn.Module, names: set[str]) -> None:
        """Loads the overlay's own parameters among `names` (they are real, on the device, uninitialised)."""

    def enabled(self, on: bool) -> contextlib.AbstractContextManager: ...


LAYER_KIND = "_qmerge_layer_kind"  # set on each decoder layer: its entry of config.layer_types, where they differ


@dataclass
class LayerBatch:
    """What one decoder layer receives for one batch of windows: the hidden states, and the keyword arguments
    (masks, position embeddings) layer 0 gets; `by_kind`, where the model's layers are of several kinds
    (`config.layer_types`: sliding-window and full attention, local and global rope), those of each other kind."""

    hidden: torch.Tensor
    kwargs: dict
    by_kind: dict[str, dict] = field(default_factory=dict)

    def kwargs_for(self, layer: torch.nn.Module) -> dict:
        """The keyword arguments `layer` gets in the model's own forward."""
        return self.by_kind.get(getattr(layer, LAYER_KIND, None), self.kwargs)

    def with_hidden(self, hidden: torch.Tensor) -> LayerBatch:
        return LayerBatch(hidden, self.kwargs, self.by_kind)


class _Caught(Exception):
    pass


class _StandIn(torch.nn.Module):
    """Stands in for a decoder layer during a catch, answering for it any attribute the stack reads of its layers
    (e.g. attention_type)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


class _Catcher(_StandIn):
    """Records the layer's inputs and stops the forward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__(layer)
        self.seen: list[LayerBatch] = []

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.seen.append(LayerBatch(hidden, kwargs))
        raise _Caught


class _PassOn(_StandIn):
    """Stands in for a layer before a catcher: hands its hidden states on untouched (what the catcher records
    of them is not used; the masks and position embeddings are computed before the first layer)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]


class _Recorder(torch.nn.Module):
    """Stands in for a child of the decoder while `_stack_order` traces the decoder's forward: notes that it was
    called and hands its first input on (an embedding: zeros of its width, as no weights are real)."""

    def __init__(self, name: str, calls: list[str], width: int | None = None):
        super().__init__()
        self.name, self.calls, self.width = name, calls, width

    def forward(self, *args, **kwargs):
        self.calls.append(self.name)
        x = args[0] if args else next(iter(kwargs.values()))
        return torch.zeros(*x.shape, self.width, device=x.device) if self.width is not None else x


class _LayerRecorder(_PassOn):
    """A layer's recorder: notes the call and hands its hidden states on as a tensor, or as `(hidden,)` for decoders
    that take `outputs[0]` of each layer (Falcon, Bloom)."""

    def __init__(self, layer: torch.nn.Module, calls: list[str], as_tuple: bool):
        super().__init__(layer)
        self.calls, self.as_tuple = calls, as_tuple

    def forward(self, *args, **kwargs):
        self.calls.append("")
        hidden = super().forward(*args, **kwargs)
        return (hidden,) if self.as_tuple else hidden


# How a causal LM's forward turns its head's output into logits: each line of transformers' forwards that assigns
# the logits (comments, dtype casts and the `slice_indices` cut removed), and what it does. The final soft-capping
# (Gemma 2/3) is applied from the config; a forward with any other line is refused rather than scored wrongly.
_HEAD = "logits = self.lm_head(hidden_states)"
_LOGIT_LINES: dict[str, tuple[str, str] | None] = {
    _HEAD: None,
    "logits = logits / self.config.final_logit_softcapping": None,
    "logits = torch.tanh(logits)": None,
    "logits = logits * self.config.final_logit_softcapping": None,
    "logits = logits / self.config.logits_scaling": ("div", "logits_scaling"),  # Granite
    "logits = logits * self.logit_scale": ("mul", "logit_scale"),  # Cohere
    "logits = self.lm_head(hidden_states) * self.model.lm_head_multiplier": ("mul", "lm_head_multiplier"),  # Falcon-H1
    "logits = self.lm_head(hidden_states) * self.config.logits_scaling": ("mul", "logits_scaling"),  # HyperCLOVA X
}


def _logit_lines(forward) -> list[str] | None:
    """The statements of `forward` that assign its logits, normalised as `_LOGIT_LINES` writes them (None: no
    source to read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    lines = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        if any(isinstance(t, ast.Name) and t.id in ("logits", "lm_logits") for t in targets):
            line = ast.unparse(node)
            line = re.sub(r"\bhidden_states(\[:, slice_indices, :\]|\.to\([^()]*\))", "hidden_states", line)
            line = re.sub(r"\.(float|contiguous)\(\)", "", line)
            lines.append(re.sub(r"^lm_logits\b", "logits", line))
    return lines


def logit_steps(model_class: type, config, head: str = "lm_head") -> list[tuple[str, float]]:
    """What `model_class.forward` does to its head's output besides soft-capping: [("mul" | "div", value)], in order.
    `head`: the head's attribute name (BioGPT's `output_projection`, GPT-NeoX-Japanese's `embed_out`). Refuses a
    forward that assigns its logits in a line `_LOGIT_LINES` does not know."""
    lines = _logit_lines(model_class.forward)
    lines = lines and [t.replace(f"self.{head}(", "self.lm_head(", 1) for t in lines]
    unknown = [t for t in lines or () if t not in _LOGIT_LINES]
    if not lines or unknown or not any(t.startswith(_HEAD) for t in lines):
        what = f"computes its logits with `{unknown[0]}`" if unknown else "has a head qmerge does not recognise"
        raise BadInputError(f"{model_class.__name__} {what}, which the layer-wise runner does not rebuild",
                            fix="this architecture is not supported layer-wise")
    text = config.get_text_config()
    return [(step[0], float(getattr(text, step[1]))) for t in lines if (step := _LOGIT_LINES[t]) is not None]


def _module_path(root: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


def _is_embedding(module: torch.nn.Module) -> bool:
    inner = getattr(module, "base_layer", None) or getattr(module, "original_module", None)
    return isinstance(module, torch.nn.Embedding) or isinstance(inner, torch.nn.Embedding)


class LayerwiseModel:
    """A model seen as input stack + a list of decoder layers + output head, each loadable on its own.

    `max_layers_alive` counts how many decoder layers were real at once (the streaming bound tests assert)."""

    def __init__(self, config: dict, source: TensorSource, device: str = "cpu", overlay: Overlay | None = None,
                 where: Path | None = None):
        self.source, self.device, self.overlay, self.where = source, torch.device(device), overlay, where
        self.config = hf_config(config)
        inner = meta_model(self.config)
        self._model_class = type(inner)
        # eval(): from_config builds a model in training mode, whose dropout (GPT-2's embedding dropout) would
        # perturb every forward.
        self.model = (overlay.wrap(inner) if overlay else inner).eval()
        inner_prefix = _module_path(self.model, inner)
        self._strip = f"{inner_prefix}." if inner_prefix else ""
        self._init_weights = inner._init_weights  # how the model computes its non-persistent buffers
        self.decoder = inner.get_decoder()
        self.layers = self._find_layers()
        self.layers_prefix = _module_path(self.model, self.layers)
        self.decoder_prefix = _module_path(self.model, self.decoder)
        self.head = self.model.get_output_embeddings()
        # Parameters shared under several names (tied embeddings): name -> the first name it appears under.
        first: dict[int, str] = {}
        self.aliases = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            self.aliases[name] = first.setdefault(id(p), name)
        self.alive: set[int] = set()
        self.max_layers_alive = 0
        # the kind of each layer where they differ: the decoder picks each layer's mask and rope by it
        kinds = list(getattr(self.config.get_text_config(), "layer_types", None) or [])
        self.kinds = kinds if len(kinds) == len(self.layers) and len(set(kinds)) > 1 else []
        for layer, kind in zip(self.layers, self.kinds):
            setattr(layer, LAYER_KIND, kind)

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu") -> LayerwiseModel:
        """A checkpoint on disk, its weights read back by `qmerge.io.sources.tensor_source`: dense safetensors, GPTQ
        v1 or compressed-tensors dequantized tensor by tensor, or a GGUF folder view dequantized the same way. A
        compensation adapter in it runs as served, through PEFT's LoRA layers (`adapters(False)`: without it)."""
        from qmerge.io.compensation import compensation_folder
        from qmerge.io.sources import tensor_source
        from qmerge.models import PeftOverlay

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        source = tensor_source(folder, compensation=False)
        extra = compensation_folder(folder)
        overlay = PeftOverlay([(extra, 1.0)]) if extra else None
        return cls(config, source, device, overlay=overlay, where=folder)

    def _find_layers(self) -> torch.nn.ModuleList:
        count = getattr(self.config.get_text_config(), "num_hidden_layers", None)
        for module in self.decoder.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == count:
                return module
        raise BadInputError(f"no list of {count} decoder layers in {type(self.decoder).__name__}",
                            path=self.where, fix="this architecture is not supported layer-wise")

    def source_name(self, name: str) -> str | None:
        """The source tensor behind parameter `name` of this model; None where the overlay fills it."""
        if self.overlay is not None:
            return self.overlay.source_name(name)
        return name.removeprefix(self._strip)

    def _value(self, name: str) -> torch.Tensor | None:
        """The tensor for parameter/buffer `name` from the source; None where the overlay or a tie provides it."""
        key = self.source_name(name)
        if key is None:
            return None
        if key in self.source.names:
            return self.source.get(key, self.device)
        if self.aliases.get(name, name) != name:
            return None  # tied: copied from its first name below
        raise BadInputError(f"{key} is not in the checkpoint", path=self.where,
                            fix="the checkpoint does not match its config.json")

    def _materialize(self, module: torch.nn.Module, prefix: str) -> None:
        """Makes `module` real on the device with its tensors from the source (and overlay), in float32."""
        module.to_empty(device=self.device)
        computed = self._compute_buffers(module)
        tensors = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers()])
        full = {f"{prefix}.{n}" if prefix else n: t for n, t in tensors.items() if n not in computed}
        tied = []
        with torch.no_grad():
            for name, tensor in full.items():
                value = self._value(name)
                if value is not None:
                    tensor.copy_(value.to(tensor.dtype) if value.is_floating_point() else value)
                elif self.source_name(name) is not None:
                    tied.append(name)
            if self.overlay is not None:
                self.overlay.fill(self.model, set(full))
            for name in tied:
                full[name].copy_(self._tied_value(self.aliases[name]))

    def _compute_buffers(self, module: torch.nn.Module) -> set[str]:
        """Computes `module`'s non-persistent buffers (never stored, e.g. Gemma's embedding scale) as transformers
        does when it loads a model: the model's `_init_weights` on the modules holding them, every other tensor
        marked as initialised so that it is left alone (the source fills those). Returns their names (relative to
        `module`); one the model's init leaves unset is refused."""
        computed = set()
        for sub_name, sub in module.named_modules():
            kept = [n for n in getattr(sub, "_non_persistent_buffers_set", ()) if getattr(sub, n, None) is not None]
            if not kept:
                continue
            for name, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                t._is_hf_initialized = name not in kept
            with torch.no_grad():
                for n in kept:
                    getattr(sub, n).fill_(float("nan") if getattr(sub, n).is_floating_point() else 0)
                self._init_weights(sub)
            for n in kept:
                value = getattr(sub, n)
                if value.is_floating_point() and bool(torch.isnan(value).any()):
                    raise BadInputError(f"{type(sub).__name__}.{n} is computed, not stored, and this model's init "
                                        "does not compute it", path=self.where,
                                        fix="this architecture is not supported layer-wise")
                computed.add(f"{sub_name}.{n}" if sub_name else n)
        return computed

    def _tied_value(self, name: str) -> torch.Tensor:
        """The value parameter `name` gets when its module is materialised (for a tie into another module)."""
        owner_name = name.rpartition(".")[0]
        owner = self.model.get_submodule(owner_name)
        self._materialize(owner, owner_name)
        value = self.model.get_parameter(name).detach().clone()
        owner.to_empty(device="meta")
        return value

    def _real_rotary(self) -> None:
        """Rotary tables are computed from the config, not stored: rebuilt for real."""
        for name, child in self.decoder.named_children():
            if "rotary" in name and any(t.is_meta for t in child.buffers()):
                with torch.device(self.device):
                    setattr(self.decoder, name, type(child)(config=self.config.get_text_config()))

    @functools.cached_property
    def _stack_order(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The decoder's children other than its layers and rotary tables that its forward calls before the first
        layer and after the last one, each in call order: found by one forward of a 4-token window with every child
        replaced by a recorder. (Which children hold parameters, or the order they were declared in, says neither:
        OLMo's final LayerNorm has no parameters, and a module declared after the layers may run before them.)"""
        children = {name: child for name, child in self.decoder.named_children() if "rotary" not in name}
        originals = list(self.layers)
        self._real_rotary()
        for as_tuple in (False, True):
            calls: list[str] = []
            try:
                for name, child in children.items():
                    if child is not self.layers:
                        inner = getattr(child, "base_layer", None) or getattr(child, "original_module", None) or child
                        width = inner.embedding_dim if _is_embedding(child) else None
                        setattr(self.decoder, name, _Recorder(name, calls, width))
                for i, layer in enumerate(originals):
                    self.layers[i] = _LayerRecorder(layer, calls, as_tuple)
                with torch.no_grad():
                    self.decoder(input_ids=torch.zeros(1, 4, dtype=torch.int64, device=self.device), use_cache=False)
                break
            except Exception as e:
                if as_tuple:
                    raise BadInputError(f"cannot trace the decoder of {type(self.decoder).__name__} "
                                        f"({type(e).__name__}: {str(e)[:200]})", path=self.where,
                                        fix="this architecture is not supported layer-wise") from None
            finally:
                for name, child in children.items():
                    if child is not self.layers:
                        setattr(self.decoder, name, child)
                for i, layer in enumerate(originals):
                    self.layers[i] = layer
        if "" not in calls:
            raise BadInputError(f"the decoder of {type(self.decoder).__name__} never calls its layers",
                                path=self.where, fix="this architecture is not supported layer-wise")
        first, last = calls.index(""), len(calls) - calls[::-1].index("")
        between = [name for name in calls[first:last] if name]
        if between:
            raise BadInputError(f"the decoder of {type(self.decoder).__name__} calls {between[0]!r} between its "
                                "layers", path=self.where, fix="this architecture is not supported layer-wise")
        return tuple(dict.fromkeys(calls[:first])), tuple(dict.fromkeys(calls[last:]))

    def _before_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """What the decoder applies before its layers and needs weights for (embeddings, an embedding norm)."""
        return [(f"{self.decoder_prefix}.{name}", getattr(self.decoder, name)) for name in self._stack_order[0]
                if any(True for _ in getattr(self.decoder, name).parameters())]

    def _prepare_stack(self) -> None:
        """Makes every module of the decoder stack before the layers real (embeddings, rotary tables)."""
        self._real_rotary()
        for prefix, child in self._before_modules():
            self._materialize(child, prefix)

    def layer_inputs(self, ids: torch.Tensor, batch_size: int) -> list[LayerBatch]:
        """Hidden states and keyword arguments that layer 0 receives, batch by batch."""
        return self.layer_inputs_of(list(torch.split(ids, batch_size)))

    def layer_inputs_of(self, batches: list[torch.Tensor]) -> list[LayerBatch]:
        self._prepare_stack()
        seen = self._catch(0, batches)
        for kind in dict.fromkeys(self.kinds):  # each other kind's arguments, caught at its first layer
            if kind != self.kinds[0]:
                for batch, other in zip(seen, self._catch(self.kinds.index(kind), batches)):
                    batch.by_kind[kind] = other.kwargs
        for _, child in self._before_modules():  # the embedding is not needed any more
            child.to_empty(device="meta")
        return seen

    def _catch(self, index: int, batches: list[torch.Tensor]) -> list[LayerBatch]:
        """What layer `index` receives for each batch, the layers before it handing their input on."""
        originals = [self.layers[i] for i in range(index + 1)]
        catcher = _Catcher(originals[index])
        for i in range(index):
            self.layers[i] = _PassOn(originals[i])
        self.layers[index] = catcher
        try:
            for batch in batches:
                try:
                    with torch.no_grad():
                        self.decoder(input_ids=batch.to(self.device), use_cache=False)
                except _Caught:
                    pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        if len(catcher.seen) != len(batches):
            raise BadInputError(f"the decoder of {type(self.decoder).__name__} never reached layer {index}",
                                path=self.where, fix="this architecture is not supported layer-wise")
        return catcher.seen

    def load_layer(self, index: int) -> torch.nn.Module:
        layer = self.layers[index]
        self._materialize(layer, f"{self.layers_prefix}.{index}")
        self.alive.add(index)
        self.max_layers_alive = max(self.max_layers_alive, len(self.alive))
        return layer.eval()

    def free_layer(self, index: int) -> None:
        self.layers[index].to_empty(device="meta")
        self.alive.discard(index)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def base_layer_prefix(self, index: int) -> str:
        """The layer's prefix in checkpoint names (without an overlay's wrapper prefix)."""
        return self.layer_prefix(index).removeprefix(self._strip)

    def _final_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """What the decoder applies after its layers (the final norm), in call order."""
        return [(f"{self.decoder_prefix}.{name}", getattr(self.decoder, name)) for name in self._stack_order[1]]

    @functools.cached_property
    def logit_steps(self) -> list[tuple[str, float]]:
        """What the model's forward does to the head's output (see `logit_steps`); refuses a head it cannot rebuild,
        so callers check it before streaming the layers."""
        self._stack_order  # noqa: B018 - a decoder that cannot be traced is refused here too
        return logit_steps(self._model_class, self.config, _module_path(self.model, self.head).rpartition(".")[2])

    def load_head(self) -> None:
        """Makes the final norm and the output head real (after the last layer)."""
        for prefix, module in self._final_modules():
            self._materialize(module, prefix)
        self._materialize(self.head, _module_path(self.model, self.head))

    def free_head(self) -> None:
        for _, module in self._final_modules():
            module.to_empty(device="meta")
        self.head.to_empty(device="meta")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits from the last layer's hidden states, as the model's own forward computes them."""
        with torch.no_grad():
            for _, module in self._final_modules():
                hidden = module(hidden)
            out = self.head(hidden).float()
            for op, value in self.logit_steps:
                out = out * value if op == "mul" else out / value
            cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
            return torch.tanh(out / cap) * cap if cap else out

    def adapters(self, on: bool) -> contextlib.AbstractContextManager:
        return self.overlay.enabled(on) if self.overlay is not None else contextlib.nullcontext()


def run_layer(layer: torch.nn.Module, batch: LayerBatch, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's output for one batch. `dtype`: its matmuls run in that precision under autocast (parameters and
    the residual stream stay as they are); None: in the parameters' own (float32)."""
    autocast = (torch.autocast(batch.hidden.device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        out = layer(batch.hidden, **batch.kwargs_for(layer))
    return out[0] if isinstance(out, tuple) else out


class _Aborted(BaseException):
    """Unwinds a paused batch whose lockstep pass was abandoned (an error elsewhere)."""


class LockstepForward:
    """Every batch's forward through one layer, advanced together from stop to stop: one forward per layer where
    GPTQ would otherwise re-run the layer from its start for every group of linears it quantizes.

    `stops` are modules in the order the layer calls them (each a group's first linear). `advance()` runs each
    batch, one after the other in batch order, until it reaches the next stop's input (handed to
    `on_input(stop, batch, x)`) and pauses there; the caller may then change that stop's weights (quantize the
    group) before the next `advance()` lets every batch continue through it. After the last stop, `advance()`
    runs the batches to their ends and `outputs` holds the layer's outputs.

    Threads only serve as frames that can pause: exactly one runs at any time, in the order a plain loop would,
    so every op sees the same inputs and weights as in a loop of re-runs and gives the same bits. The price is
    memory: each paused batch keeps the activations its frame holds (callers bound it, see `lockstep_bytes`)."""

    def __init__(self, layer: torch.nn.Module, batches: list[LayerBatch], stops: list[torch.nn.Module],
                 on_input, dtype: torch.dtype | None = None):
        import threading

        self.layer, self.batches, self.on_input, self.dtype = layer, batches, on_input, dtype
        self.outputs: list[torch.Tensor | None] = [None] * len(batches)
        self.stop = -1  # the stop every batch has reached (len(stops): the end)
        self._stops = len(stops)
        self._go = [threading.Event() for _ in batches]
        self._back = threading.Event()
        self._at = [-1] * len(batches)
        self._error: BaseException | None = None
        self._abort = False
        self._local = threading.local()
        self._threads = [threading.Thread(target=self._run, args=(b,), daemon=True, name=f"qmerge-lockstep-{b}")
                         for b in range(len(batches))]
        self._handles = [m.register_forward_pre_hook(lambda _m, args, i=i: self._pause(i, args[0]))
                         for i, m in enumerate(stops)]

    def _run(self, b: int) -> None:
        self._local.batch = b
        self._wait(b)
        try:
            self.outputs[b] = run_layer(self.layer, self.batches[b], self.dtype)  # autocast is per thread: set here
            self._at[b] = self._stops
        except _Aborted:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._error = e
        self._back.set()

    def _wait(self, b: int) -> None:
        self._go[b].wait()
        self._go[b].clear()
        if self._abort:
            raise _Aborted

    def _pause(self, stop: int, x: torch.Tensor) -> None:
        b = self._local.batch
        if stop != self.stop + 1:
            raise RuntimeError(f"the layer reached stop {stop} before stop {self.stop + 1}: its linears are not "
                               "called in the order one window's forward showed")
        self.on_input(stop, b, x)
        self._at[b] = stop
        self._back.set()
        self._wait(b)

    def advance(self) -> None:
        """Every batch to the next stop (or, after the last one, to its end)."""
        target = self.stop + 1
        for b, thread in enumerate(self._threads):
            if not thread.is_alive() and self._at[b] == -1:
                thread.start()
            self._go[b].set()
            self._back.wait()
            self._back.clear()
            if self._error is not None:
                self.close()
                raise self._error
            if self._at[b] != target:
                self.close()
                raise RuntimeError(f"batch {b} stopped at {self._at[b]}, expected {target} (a linear the layer "
                                   "skips for some inputs?)")
        self.stop = target

    def close(self) -> None:
        """Removes the hooks; batches still paused are unwound."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._abort = True
        for b, thread in enumerate(self._threads):
            if thread.is_alive():
                self._go[b].set()
                thread.join()


# GPTQ runs lockstep passes (one forward per layer) when the paused batches' activations fit in this; larger
# calibration sets re-run the layer per group instead (same bits, bounded memory).
LOCKSTEP_BUDGET = 512 * 2**20


def lockstep_bytes(tokens: int, hidden: int, widest: int) -> int:
    """A bound on what paused batches hold (float32): per token the layer's input and residual, the attention's
    query/key/value and output, or the MLP's widest activation, whichever stop they wait at."""
    return tokens * 4 * (3 * hidden + widest)
