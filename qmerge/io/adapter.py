"""Reading PEFT LoRA adapters: config allowlist, tensor layout, per-module r/alpha/scale.

Every `adapter_config.json` field is either handled here, known to be inert for a merge, or an error
(exit 2) when it holds a non-default value: qmerge never silently merges math it does not reproduce.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qmerge.errors import BadInputError, UnsupportedAdapterError
from qmerge.ops.lora import lora_scale

PREFIX = "base_model.model."

# Fields whose values qmerge reproduces (see `LoraModule`).
HANDLED = {
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias",
    "lora_bias", "use_dora", "modules_to_save", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "init_lora_weights",
}
# Fields that do not change the merged weights (metadata, training-only, runtime).
INERT = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "megatron_core", "runtime_config", "qalora_group_size",
}
# Fields known to change the math; like any other field outside the two sets above, they are allowed only off:
# None, False, [] or their LoraConfig default. Not `{}`: PEFT turns an empty sub-config (kasa_config, velora_config,
# arrow_config, monteclora_config, ...) into a default config object, which switches that variant on.
MATH_FIELDS = {
    "use_qalora", "alora_invocation_tokens", "layer_replication", "trainable_token_indices",
    "target_parameters", "megatron_config", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying",
}
# init_lora_weights values that only initialise A/B (the base is unchanged); pissa/olora/corda/loftq rewrite it.
# PEFT lowercases the string ("Gaussian" is "gaussian").
PLAIN_INITS = {True, False, "gaussian", "orthogonal", "eva"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted base module, as tensor names into the adapter file plus its scale."""

    module: str  # base module name, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" | "embedding"
    lora_a: str
    lora_b: str
    r: int
    alpha: float
    scale: float
    lora_b_bias: str | None = None
    magnitude: str | None = None  # DoRA


@dataclass(frozen=True)
class Adapter:
    path: Path
    weights_file: Path
    config: dict
    modules: dict[str, LoraModule]
    # base tensor name -> adapter tensor name of a full replacement (modules_to_save, bias, base_layer)
    replacements: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    # replacements saved as `….base_layer.weight` (PEFT's save_embedding_layers: a resized or retrained
    # embedding that a tied lm_head follows), unlike modules_to_save copies, which leave the tied side alone
    resized: frozenset[str] = frozenset()

    def load(self, name: str) -> torch.Tensor:
        return _load_tensor(self.weights_file, name)


def _load_tensor(path: Path, name: str) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    return _load_bin(path)[name]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors memory-mapped (mmap): reading shapes touches only the pickle and the zip directory, not the
    data (what a dry run may read). weights_only: no code in the pickle runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle with code in it, a corrupt file, or the pre-1.6 non-zip format mmap cannot read
        raise BadInputError(f"cannot load adapter weights safely: {e}", path=path,
                            fix="re-save the adapter with safetensors (save_pretrained(safe_serialization=True))")


def check_adapter_config(config: dict, path: Path) -> None:
    """Refuse any PEFT type or field whose math qmerge does not reproduce, naming it."""
    from peft import LoraConfig

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported; qmerge merges LoRA adapters only",
                                      path=path)
    fields = LoraConfig.__dataclass_fields__
    for key, value in config.items():
        if key not in fields:
            raise UnsupportedAdapterError(f"field `{key}` is unknown to the installed peft; qmerge cannot tell "
                                          "whether it changes the merge", path=path)
        if key in HANDLED or key in INERT or value is None or value is False or value == [] or \
                value == _default(fields[key]):
            continue
        why = "changes the adapter math" if key in MATH_FIELDS else "is not in qmerge's allowlist"
        raise UnsupportedAdapterError(f"field `{key}` = {value!r} {why}; qmerge cannot merge it exactly", path=path)
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise BadInputError(f"`{key}` is {type(config[key]).__name__}, not an object of module pattern -> value",
                                path=path, fix="rewrite adapter_config.json with PEFT's save_pretrained")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or (init.lower() if isinstance(init, str) else init) not in PLAIN_INITS:
        raise UnsupportedAdapterError(
            f"init_lora_weights = {config['init_lora_weights']!r} rewrites the base weights during init; "
            "qmerge cannot reproduce that base", path=path,
            fix="convert the adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)")


def _default(f):
    """A LoraConfig dataclass field's default value (None where it has none)."""
    import dataclasses

    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _pattern_matches(key: str, module: str) -> bool:
    """Whether a rank_pattern/alpha_pattern key names `module`, as PEFT matches them."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """Exactly `peft.utils.other.get_pattern_key` (first matching key in dict order)."""
    return next((key for key in pattern_keys if _pattern_matches(key, key_to_match)), key_to_match)


def read_adapter(path: Path) -> Adapter:
    """Parse one adapter folder without loading LoRA weights (headers only for safetensors)."""
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise BadInputError("no adapter_config.json", path=path, fix="point adapters.path at a PEFT adapter folder")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"cannot read adapter_config.json: {e}", path=cfg_file) from None
    if not isinstance(config, dict):
        raise BadInputError("adapter_config.json is not a JSON object", path=cfg_file)
    check_adapter_config(config, cfg_file)
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise BadInputError("a LoRA config needs an integer `r` and a number `lora_alpha`", path=cfg_file)
    shapes, weights_file = _adapter_shapes(path)
    modules, replacements = _parse_tensors(shapes, config, weights_file)
    if not modules and not replacements:
        raise BadInputError("adapter holds no LoRA tensors", path=weights_file)
    resized = frozenset(t for t, n in replacements.items() if ".base_layer." in n)
    return Adapter(path, weights_file, config, modules, replacements, shapes, resized)


def _adapter_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], Path]:
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from qmerge.io.safetensors_io import read_header

        return {k: v.shape for k, v in read_header(st).items()}, st
    binf = path / "adapter_model.bin"
    if binf.is_file():
        return {k: tuple(v.shape) for k, v in _load_bin(binf).items()}, binf
    raise BadInputError("no adapter_model.safetensors (or adapter_model.bin)", path=path)


_LORA = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                   r"lora_embedding_B|lora_magnitude_vector(\.weight)?)$")


def _parse_tensors(shapes: dict, config: dict, file: Path) -> tuple[dict[str, LoraModule], dict[str, str]]:
    parts: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for name in shapes:
        if not name.startswith(PREFIX):
            raise BadInputError(f"tensor {name!r} does not start with {PREFIX!r}; not a PEFT adapter file", path=file)
        m = _LORA.match(name[len(PREFIX):])
        if m is None:
            # A full tensor saved by PEFT: modules_to_save, bias="all"/"lora_only", or an embedding base_layer.
            replacements[name[len(PREFIX):].replace(".base_layer.", ".")] = name
            continue
        parts.setdefault(m["mod"], {})[m["part"].split(".")[0] + ("_bias" if m["part"] == "lora_B.bias" else "")] = name
    modules = {mod: _module(mod, p, shapes, config, file) for mod, p in parts.items()}
    _check_flags_match_tensors(modules, config, file)
    return modules, replacements


def _some(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def _check_one_value(name: str, pattern: dict, module: str, file: Path) -> None:
    """Several keys of a pattern matching one module with different values: PEFT takes the first in the file's
    order, and it saves the file with sorted keys, so the model as trained may have taken another one."""
    matching = [k for k in pattern if _pattern_matches(k, module)]
    if len({json.dumps(pattern[k]) for k in matching}) > 1:
        raise UnsupportedAdapterError(
            f"`{name}` keys {', '.join(repr(k) for k in matching)} all match {module} with different values; PEFT "
            "takes the first in the file, whose keys save_pretrained sorts, so which one the model was trained with "
            "is not known", path=file.parent / "adapter_config.json",
            fix=f"make the `{name}` keys match disjoint modules")


def _check_flags_match_tensors(modules: dict[str, LoraModule], config: dict, file: Path) -> None:
    """PEFT follows `use_dora` and `lora_bias` and ignores tensors they do not expect (silently: no warning);
    qmerge reads what the file holds. Where the two disagree the merge has no single meaning: refused."""
    dora = bool(config.get("use_dora", False))
    mismatched = [m.module for m in modules.values() if m.kind == "linear" and bool(m.magnitude) != dora]
    if mismatched:
        holds = "holds no" if dora else "holds"
        raise UnsupportedAdapterError(
            f"use_dora = {str(dora).lower()} in adapter_config.json but the adapter file {holds} DoRA magnitude "
            f"vectors for {_some(mismatched)}; PEFT would run another model than the tensors describe",
            path=file.parent / "adapter_config.json",
            fix="save the adapter again with PEFT's save_pretrained, or correct use_dora")
    stray = [m.module for m in modules.values() if m.lora_b_bias and not config.get("lora_bias", False)]
    if stray:
        raise UnsupportedAdapterError(
            f"the adapter file holds lora_B biases ({_some(stray)}) but adapter_config.json has lora_bias = false, "
            "so PEFT ignores them", path=file.parent / "adapter_config.json",
            fix="save the adapter again with PEFT's save_pretrained, or set lora_bias = true if they were trained")


def _module(mod: str, p: dict[str, str], shapes: dict, config: dict, file: Path) -> LoraModule:
    embedding = "lora_embedding_A" in p
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in p or b_key not in p:
        raise BadInputError(f"module {mod}: {a_key}/{b_key} pair incomplete", path=file)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        _check_one_value(name, pattern, mod, file)
    r = int(rank_pattern.get(get_pattern_key(rank_pattern, mod), config["r"]))
    alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern, mod), config["lora_alpha"]))
    a_shape, b_shape = shapes[p[a_key]], shapes[p[b_key]]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        raise BadInputError(f"module {mod}: rank from the config is {r} but lora_A is {list(a_shape)} and lora_B is "
                            f"{list(b_shape)}", path=file, fix="check r / rank_pattern in adapter_config.json")
    magnitude = p.get("lora_magnitude_vector")
    if magnitude and embedding:
        raise UnsupportedAdapterError(f"module {mod}: DoRA on an embedding is not supported", path=file)
    return LoraModule(mod, "embedding" if embedding else "linear", p[a_key], p[b_key], r, alpha,
                      lora_scale(alpha, r, bool(config.get("use_rslora", False))),
                      p.get("lora_B_bias"), magnitude)
