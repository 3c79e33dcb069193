"""What the model looks like, derived on the meta device (no weights): which linears transformers'
bitsandbytes integration quantizes to 4-bit, which weights are tied, and each module's layout."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.errors import BadInputError
from qmerge.numerics import MATH_DTYPE


@dataclass(frozen=True)
class Architecture:
    model_type: str
    quantized: frozenset[str]  # module names bitsandbytes turned into Linear4bit
    skipped: tuple[str, ...]  # transformers' modules_to_not_convert for this architecture
    tied: dict[str, str]  # tied parameter -> its source, e.g. {"lm_head.weight": "model.embed_tokens.weight"}
    layouts: dict[str, str]  # module name -> "linear" | "conv1d" | "embedding"
    parameters: tuple[str, ...] = ()  # every parameter a checkpoint of it stores (tied copies aside)


def hf_config(config: dict):
    """A transformers config from a config.json dict (without the quantization_config the meta model must not see)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})


def meta_model(config) -> torch.nn.Module:
    """The model of `config` on the meta device (no memory), float32 parameters: the one place qmerge builds a
    model skeleton (architecture replay, the layer runner, header-only GGUF plans)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return AutoModelForCausalLM.from_config(config, dtype=MATH_DTYPE)
        except ValueError as e:  # "Unrecognized configuration class ...": not a causal LM transformers knows
            raise BadInputError(f"model_type {getattr(config, 'model_type', None)!r} is not a causal language model "
                                f"transformers can build ({str(e).splitlines()[0][:200]})",
                                fix="qmerge merges adapters of decoder-only causal LMs (AutoModelForCausalLM)",
                                ) from None


def load_hf_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise BadInputError(f"cannot read config.json: {e}", path=folder / "config.json") from None


def describe_architecture(folder: Path, skip_modules: tuple[str, ...] | None = None,
                          quantization_config: dict | None = None) -> Architecture:
    """Replays transformers' bnb 4-bit conversion on a meta model (exact nn.Linear type; minus its default
    skips and `_keep_in_fp32_modules`; a user's `llm_int8_skip_modules` replaces the defaults)."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.auto import AutoHfQuantizer

    config = load_hf_config(folder)
    if quantization_config is not None:
        bnb_config = BitsAndBytesConfig.from_dict(quantization_config)
    else:
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        llm_int8_skip_modules=None if skip_modules is None else list(skip_modules))
    model = meta_model(config)
    layouts = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            layouts[name] = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            layouts[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            layouts[name] = "linear"
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    parameters = tuple(n for n, _ in model.named_parameters() if n not in tied)
    quantizer = AutoHfQuantizer.from_config(bnb_config, pre_quantized=quantization_config is not None)
    skipped = quantizer.get_modules_to_not_convert(model, bnb_config.llm_int8_skip_modules,
                                                   model._keep_in_fp32_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = replace_with_bnb_linear(model, modules_to_not_convert=skipped, quantization_config=bnb_config,
                                        pre_quantized=quantization_config is not None)
    quantized = frozenset(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    return Architecture(config.model_type, quantized, tuple(sorted(skipped)), tied, layouts, parameters)
