"""GGUF output: a dense HF checkpoint folder written by qmerge -> one GGUF file that llama.cpp loads, with the
`gguf` package only (no llama.cpp build). The conversion follows llama.cpp's `convert_hf_to_gguf.py` (classes
`ModelBase.prepare_tensors`, `TextModel.set_gguf_parameters`, `LlamaModel`, `_set_vocab_gpt2`); where qmerge
differs, the comment says so.

What is written:
- tensors under llama.cpp's names (`gguf.get_tensor_name_map`), llama attention Q/K rows permuted HF -> GGUF
  (`LlamaModel.permute`: HF keeps each head's rotary halves apart, llama.cpp interleaves them); for Llama 3.x's
  rope scaling (`rope_type = "llama3"`) the `rope_freqs.weight` llama.cpp scales each frequency by
  (`LlamaModel.generate_extra_tensors`);
- the metadata llama.cpp reads for the architecture, and the byte-level BPE tokenizer (`tokenizer.ggml.model =
  "gpt2"`), its pre-tokenizer named by llama.cpp's hash of a test string's token ids.

Types (`TENSOR_RULES`): 1-D tensors and `*_norm.weight` are always F32 (`prepare_tensors`: "Most of the codebase
that takes in 1D tensors or norms only handles F32 tensors"); every other weight gets the requested type; a weight
whose row length is not a multiple of the type's block size falls back to F16 (`prepare_tensors` catches
`gguf.QuantError` and writes F16). For the 4/5-bit types this is llama-quantize's `--pure` mode: llama-quantize's
default mix (Q6_K output head, ...) needs K-quants, which `gguf.quants` cannot produce.

Memory: the header, metadata and every tensor's info are written first (shapes and types are known from the
safetensors headers), then the tensors' data one at a time: read, permute, quantize, write, drop. Never more
than one tensor (and its quantized copy) is alive. Writes go to a temp file next to the target, past the page
cache where the filesystem allows (`qmerge/io/direct.py`: on the VMs qmerge is benchmarked on, writing through the
page cache cost 2-3x a plain copy of the same bytes), fsynced, renamed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qmerge.errors import BadInputError, ConfigError
from qmerge.io.atomic import fsync_dir, temp_sibling
from qmerge.io.direct import DirectFile
from qmerge.io.paths import sha256_file
from qmerge.io.safetensors_io import CheckpointReader
from qmerge.runtime import map_on_threads

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what gguf.quants quantizes in Python
# HF model_type -> GGUF architecture. Mistral is llama's tensor map and metadata in llama.cpp (`LlamaModel` is
# registered for MistralForCausalLM); qwen2 is llama's tensor names without the Q/K permutation, plus q/k/v biases.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED = {"llama"}  # GGUF architectures whose attention Q/K rows llama.cpp permutes (NORM rope)
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
YARN_UNWRITTEN = ("attention_factor", "mscale", "mscale_all_dim")  # transformers' YaRN keys no llama GGUF holds
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope: a factor per rotary frequency, which llama.cpp divides it by
TENSOR_RULES = ("1-D tensors and *_norm.weight: F32; other weights: the requested type, F16 where a row is not "
                "a multiple of its block size (llama.cpp convert_hf_to_gguf.py prepare_tensors)")
# llama.cpp's pre-tokenizer check (convert_hf_to_gguf.py `get_vocab_base_pre`): the sha256 of str(token ids of
# CHKTXT) names the pre-tokenizer. A fixed subset of llama.cpp's table, for the bases qmerge meets; an unknown hash
# is refused, as llama.cpp refuses it (a wrong pre-tokenizer silently changes how llama.cpp splits text).
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
          "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
          "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SKIPPED = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")  # never written (llama.cpp)


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str | None  # None: made from the config (ROPE_FREQS)
    gguf_name: str
    shape: tuple[int, ...]  # numpy order, as in the HF checkpoint
    qtype: str
    nbytes: int
    permute_heads: int | None  # Q/K: the head count of the permutation, else None


def _fix() -> str:
    return f"choose one of {', '.join(QTYPES)}"


def _model_type(hf_config: dict) -> str:
    return str(hf_config.get("model_type") or "")


def validate_gguf_target(hf_config: dict, qtype: str) -> None:
    """Refuses, before anything runs, a combination the writer cannot produce: an unknown type (ConfigError), or
    an architecture / config feature it does not convert (BadInputError). Both are exit 2."""
    if qtype not in QTYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}", fix=_fix())
    model_type = _model_type(hf_config)
    if model_type not in ARCHITECTURES:
        raise BadInputError(f"GGUF output supports model_type {', '.join(sorted(ARCHITECTURES))}; this model is "
                            f"{model_type or 'of no model_type'!r}",
                            fix="convert it with llama.cpp's convert_hf_to_gguf.py, or drop the GGUF output")
    problems = []
    if model_type in ("llama", "mistral") and (hf_config.get("attention_bias") or hf_config.get("mlp_bias")):
        problems.append("attention_bias/mlp_bias (not part of llama's GGUF metadata: loaders would drop the biases)")
    if hf_config.get("use_sliding_window") or (model_type == "mistral" and hf_config.get("sliding_window")
                                               and hf_config["sliding_window"] < hf_config.get("max_position_embeddings", 0)):
        problems.append(f"sliding-window attention ({hf_config.get('sliding_window')}): llama.cpp's llama/qwen2 "
                        "graphs attend to the whole context")
    rope = _rope(hf_config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope type {rope_type!r} (written: {', '.join(ROPE_TYPES)})")
    elif rope_type == "llama3" and ARCHITECTURES.get(model_type) != "llama":
        problems.append(f"llama3 rope scaling on a {model_type} model (llama.cpp reads its frequency factors for "
                        "llama only)")
    elif rope_type == "yarn":
        odd = [key for key in YARN_UNWRITTEN if rope.get(key) is not None] + \
            (["truncate = false"] if rope.get("truncate") is False else [])
        if odd:
            problems.append(f"YaRN's {', '.join(odd)} (llama.cpp computes its attention scale and correction range "
                            "itself; only factor, original_max_position_embeddings, beta_fast and beta_slow are "
                            "written)")
    if float(rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor")) or 1.0) != 1.0:
        problems.append("partial rotary embeddings (llama.cpp's llama/qwen2 graphs rotate the whole head)")
    if problems:
        raise BadInputError(f"cannot write this {model_type} model as GGUF: " + "; ".join(problems),
                            fix="convert it with llama.cpp's convert_hf_to_gguf.py, or drop the GGUF output")


def _rope(hf_config: dict) -> dict:
    """The rope parameters, from transformers 5's `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and hf_config.get("rope_theta") is not None:
        params["rope_theta"] = hf_config["rope_theta"]
    return params


def rope_freqs(hf_config: dict) -> torch.Tensor | None:
    """The llama3 rope's frequency factors as llama.cpp writes them (convert_hf_to_gguf.py
    `LlamaModel.generate_extra_tensors`, the same float32 steps), None for any other rope. One difference: the
    original context length comes from the rope parameters, where transformers reads it (llama.cpp reads a top-level
    key that Llama 3.x configs do not have and falls back to 8192, their value)."""
    import math

    rope = _rope(hf_config)
    if rope.get("rope_type") != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = hf_config.get("head_dim") or int(hf_config["hidden_size"]) // int(hf_config["num_attention_heads"])
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings",
                               hf_config.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The type tensor `gguf_name` is written in when the file's type is `qtype` (llama.cpp's rules, module doc)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return "F32"
    block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
    return qtype if shape[-1] % block == 0 else "F16"


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows * (shape[-1] // block) * size


def plan_tensors(hf_config: dict, reader: CheckpointReader, qtype: str, folder: Path | None = None) -> list[PlannedTensor]:
    """Every tensor the file will hold, in write order (embedding, blocks in order, final norm, head)."""
    import gguf

    arch = ARCHITECTURES[_model_type(hf_config)]
    n_layers = int(hf_config["num_hidden_layers"])
    n_head = int(hf_config["num_attention_heads"])
    n_kv = int(hf_config.get("num_key_value_heads") or n_head)
    name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    tied = bool(hf_config.get("tie_word_embeddings", False))
    planned = []
    for hf_name, info in reader.tensors.items():
        if hf_name.endswith(_SKIPPED) or (tied and hf_name == "lm_head.weight"):
            continue  # tied: the head is token_embd (llama.cpp loads output = token_embd when output is absent)
        stem, dot, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(stem)
        if mapped is None or not dot:
            raise BadInputError(f"tensor {hf_name!r} has no llama.cpp name for architecture {arch}", path=folder,
                                fix="this checkpoint is not a plain llama/qwen2 model")
        gguf_name = f"{mapped}.{suffix}"
        shape = tuple(info.shape)
        permute = None
        if arch in PERMUTED and stem.endswith("self_attn.q_proj"):
            permute = n_head
        elif arch in PERMUTED and stem.endswith("self_attn.k_proj"):
            permute = n_kv  # LlamaModel.permute(w, n_head, n_kv) permutes with n_kv heads when they differ
        t = tensor_qtype(gguf_name, shape, qtype)
        planned.append(PlannedTensor(hf_name, gguf_name, shape, t, _nbytes(shape, t), permute))
    if tied and "lm_head.weight" not in reader.tensors and "model.embed_tokens.weight" not in reader.tensors:
        raise BadInputError("no model.embed_tokens.weight", path=folder, fix="the checkpoint is incomplete")
    factors = rope_freqs(hf_config)
    if factors is not None:  # made from the config, not read (hf_name None); llama.cpp writes it first
        planned.append(PlannedTensor(None, ROPE_FREQS, tuple(factors.shape), "F32", factors.numel() * 4, None))

    def order(p: PlannedTensor) -> tuple:
        if p.hf_name is None:
            return (-1, 0, p.gguf_name)
        m = _LAYER.match(p.hf_name)
        if m:
            return (1, int(m.group(1)), p.gguf_name)
        return (0 if p.gguf_name.startswith("token_embd") else 2 if p.gguf_name.startswith("output_norm") else 3,
                0, p.gguf_name)

    return sorted(planned, key=order)


def permute_qk(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> GGUF rows of a llama Q or K projection (convert_hf_to_gguf.py `LlamaModel.permute`): within each head,
    row order [first half | second half] of the rotary pairs becomes interleaved [x0, y0, x1, y1, ...]."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


_TORCH_CASTS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _encode(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    """`tensor` (float32) in `qtype`'s bytes, as `gguf.quants.quantize` makes them. The float types are cast by
    torch (vectorized; numpy's float32 -> float16 `astype` took 7.9 s of a 7B slice's 14 s write): both round to
    nearest even, so every finite and infinite value gets gguf's bits; a tensor holding a NaN, whose payload the
    two treat differently, takes gguf's own code."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    cast = _TORCH_CASTS.get(qtype)
    if cast is not None and not _has_nan(tensor):
        out = tensor.to(cast).contiguous()
        return (out.view(torch.int16) if cast is torch.bfloat16 else out).numpy()
    if cast is None and tensor.dim() >= 2:
        return _quantize_in_row_chunks(tensor.numpy(), GGMLQuantizationType[qtype])
    return quantize(tensor.numpy(), GGMLQuantizationType[qtype])


QUANT_CHUNK_ENTRIES = 1 << 20  # entries per call of gguf's row quantizer (whole rows)


def _quantize_in_row_chunks(array: np.ndarray, qtype) -> np.ndarray:
    """`gguf.quants.quantize(array, qtype)` for a block type: the type's own row quantizer (`quantize_rows`, what
    `quantize` applies to groups of 16 rows) on chunks of about QUANT_CHUNK_ENTRIES entries, on as many threads as
    torch uses. A block never spans two rows (the type's block divides the row length, or the tensor is not given
    this type), so the bytes are those of one `quantize` call (tested). gguf's numpy code runs on one core and
    releases the GIL; its 16-row groups are small enough on narrow rows that Python's overhead dominates."""
    import gguf.quants
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        return gguf.quants.quantize(array, qtype)  # gguf's own error
    rows = array.reshape(-1, array.shape[-1])
    row_bytes = rows.shape[1] // block * type_size
    out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
    quantize_rows = getattr(gguf.quants, qtype.name).quantize_rows
    step = max(1, QUANT_CHUNK_ENTRIES // rows.shape[1])

    def chunk(start: int) -> None:
        out[start:start + step] = quantize_rows(rows[start:start + step])

    map_on_threads(chunk, range(0, rows.shape[0], step), "qmerge-gguf-quant")
    return out.reshape(*array.shape[:-1], row_bytes)


def _has_nan(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds a NaN. A NaN makes any sum NaN, so a finite sum (one vectorized pass, no mask)
    answers for the usual tensor; a non-finite one (an infinity, an overflowing sum) is checked entry by entry."""
    return not bool(torch.isfinite(tensor.sum())) and bool(torch.isnan(tensor).any())


def _write_one(writer, reader: CheckpointReader, p: PlannedTensor, hf_config: dict) -> None:
    """One tensor: read (or made from the config), float32, permute, encode, write. Every intermediate dies on
    return."""
    tensor = reader.get(p.hf_name).to(torch.float32) if p.hf_name is not None else rope_freqs(hf_config)
    if p.permute_heads is not None:
        tensor = permute_qk(tensor, p.permute_heads).contiguous()
    data = _encode(tensor, p.qtype)
    if data.nbytes != p.nbytes:
        raise AssertionError(f"{p.hf_name}: encoded {data.nbytes} bytes, planned {p.nbytes}")
    writer.write_tensor_data(data)


# ---- metadata ---------------------------------------------------------------------------------------------------

def _add_hparams(writer, hf_config: dict, arch: str, qtype: str, name: str) -> None:
    """TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters, for the keys a llama/qwen2 config has."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(int(hf_config["num_hidden_layers"]))
    writer.add_context_length(int(hf_config["max_position_embeddings"]))
    writer.add_embedding_length(int(hf_config["hidden_size"]))
    writer.add_feed_forward_length(int(hf_config["intermediate_size"]))
    n_head = int(hf_config["num_attention_heads"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(hf_config.get("num_key_value_heads") or n_head))
    rope = _rope(hf_config)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("beta_fast") is not None:  # as convert_hf_to_gguf.py writes them (transformers: 32 and 1)
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(hf_config["rms_norm_eps"]))
    head_dim = hf_config.get("head_dim") or int(hf_config["hidden_size"]) // n_head
    if hf_config.get("head_dim") is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(_file_type(qtype))
    if arch == "llama":
        writer.add_vocab_size(int(hf_config["vocab_size"]))
        writer.add_rope_dimension_count(int(head_dim))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(qtype: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType.ALL_F32 if qtype == "F32" else LlamaFileType[f"MOSTLY_{qtype}"])


def _byte_level_chars() -> tuple[str, ...]:
    """The character `tokenizers`' ByteLevel pre-tokenizer maps each byte to (GPT-2's `bytes_to_unicode`)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(shifted)) for b in range(256))


_BYTE_LEVEL = _byte_level_chars()


def _splits_then_byte_level(pre_tokenizer) -> bool:
    """Whether the pre-tokenizer only splits the text and maps its bytes (ByteLevel, no prefix space added, after
    any number of Splits): every piece the BPE model sees is then the byte-level image of a stretch of the text."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else [
        pre_tokenizer]
    return (bool(steps) and all(isinstance(step, dict) for step in steps)
            and steps[-1].get("type") == "ByteLevel" and not steps[-1].get("add_prefix_space")
            and all(step.get("type") == "Split" for step in steps[:-1]))


def _added_tokens_in_vocab(spec: dict) -> bool:
    """Whether every added token is a vocabulary entry under the id the file gives it. `tokenizers` gives an added
    token outside the vocabulary the next free id after the vocabulary, whatever id the file states (Llama 3's
    files: added tokens from 128000 on, after 128000 entries): ids read from the file, or kept by a cut vocabulary,
    are then not the ids `tokenizers` uses."""
    try:
        vocab = spec["model"]["vocab"]
        return all(vocab.get(t["content"]) == t["id"] for t in spec.get("added_tokens", ()))
    except (KeyError, TypeError, AttributeError):
        return False


def probe_spec(spec: dict, texts) -> dict | None:
    """tokenizer.json (parsed) cut to what encoding `texts` can touch: the vocabulary entries and merges whose
    strings occur in a text's byte-level image, every added token, the unknown token. BPE only ever holds stretches
    of a piece and merges two neighbours into a longer stretch, so the cut tokenizer gives those texts the same ids
    (ids and merge order kept) for a fraction of the build (`Tokenizer.from_str`: 0.14 s for 49k tokens). None
    where that argument does not hold: a normalizer, a pre-tokenizer that does more than split and map bytes, a
    subword prefix or suffix, dropout, byte fallback, an added token outside the vocabulary (its id would follow the
    cut vocabulary's size: `_added_tokens_in_vocab`)."""
    model = spec.get("model") or {}
    if (spec.get("normalizer") is not None or not _splits_then_byte_level(spec.get("pre_tokenizer"))
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout")
            or model.get("byte_fallback") or not isinstance(model.get("vocab"), dict) or not model.get("merges")
            or not isinstance(model["merges"], list) or not _added_tokens_in_vocab(spec)):
        return None
    longest = max(map(len, model["vocab"]), default=0)
    stretches = set()
    for text in texts:
        image = "".join(_BYTE_LEVEL[b] for b in text.encode("utf-8"))
        stretches.update(image[i:j] for i in range(len(image)) for j in range(i + 1, min(len(image), i + longest) + 1))
    keep = stretches | {t.get("content") for t in spec.get("added_tokens", ())} | {model.get("unk_token")}
    vocab = {token: i for token, i in model["vocab"].items() if token in keep}
    pairs = model["merges"] if set(map(type, model["merges"])) == {list} else [
        m if isinstance(m, list) else str(m).split(" ", 1) for m in model["merges"]]
    if set(map(len, pairs)) != {2}:
        return None  # not a BPE merge list: the whole tokenizer's own error
    # the parts first: that test (no string built) drops nearly every merge
    merges = [m for m, (a, b) in zip(model["merges"], pairs) if a in stretches and b in stretches and a + b in stretches]
    return dict(spec, model=dict(model, vocab=vocab, merges=merges))


class _RawTokenizer:
    """The few things `_set_vocab_gpt2` asks of a tokenizer, from `tokenizers` directly (transformers' AutoTokenizer
    takes 0.3 s warm and over 1 s the first time in a process). Used only where the two agree (`applies`):
    transformers would load the folder with its generic backend (it replaces tokenizer.json's pipeline by a
    model-specific one for some model types: qwen2's split regex), and tokenizer_config.json asks for no BOS/EOS on
    top of tokenizer.json's post-processor and no clean-up of spaces.

    The texts the GGUF writer encodes (`PROBES`: llama.cpp's check text, "a", the added tokens) go through a
    tokenizer built from `probe_spec` where it holds; any other text, and ids outside the cut vocabulary, through
    the whole tokenizer, built on first use."""

    PROBES = (CHKTXT, "a")

    def __init__(self, text: str | bytes, config: dict, spec: dict | None = None):
        from tokenizers import Tokenizer

        self._text, self._full = text, None
        self.vocab = self._spec_vocab(spec)
        self._probes = set(self.PROBES) | {t.get("content") for t in (spec or {}).get("added_tokens", ())}
        try:
            cut = probe_spec(spec, self._probes) if self.vocab is not None else None
            self._tok = Tokenizer.from_str(json.dumps(cut)) if cut is not None else self._whole()
        except Exception:  # noqa: BLE001 - `tokenizers` raises plain Exception; the whole tokenizer is always exact
            cut, self._tok = None, self._whole()
        self._cut_ids = set(cut["model"]["vocab"].values()) if cut is not None else None
        if self.vocab is None:
            self.vocab = self._tok.get_vocab(with_added_tokens=True)
        self.added_tokens_decoder = self._tok.get_added_tokens_decoder()

        def token_id(key: str) -> int | None:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return self.vocab.get(value) if isinstance(value, str) else None

        self.bos_token_id, self.eos_token_id = token_id("bos_token"), token_id("eos_token")

    @staticmethod
    def _spec_vocab(spec: dict | None) -> dict[str, int] | None:
        """`get_vocab(with_added_tokens=True)` from the parsed tokenizer.json (`tokenizers` builds it again from its
        own copy: 0.04 s for 49k tokens): the model's vocabulary, where every added token is in it under its own id
        (`_added_tokens_in_vocab`; a test holds the two equal). None otherwise: `tokenizers`' own."""
        if spec is None or not _added_tokens_in_vocab(spec) or not isinstance(spec["model"]["vocab"], dict):
            return None
        return dict(spec["model"]["vocab"])

    # model types whose folders transformers (as pinned) loads with TokenizersBackend when tokenizer_config.json names
    # it; a test holds transformers to this
    GENERIC_MODEL_TYPES = frozenset({"llama", "mistral"})

    @classmethod
    def applies(cls, config: dict, model_type: str | None) -> bool:
        return (model_type in cls.GENERIC_MODEL_TYPES and config.get("tokenizer_class") == "TokenizersBackend"
                and not ({"add_bos_token", "add_eos_token"} & set(config))
                and not config.get("clean_up_tokenization_spaces"))

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}

    def _whole(self):
        if self._full is None:
            from tokenizers import Tokenizer

            text = self._text
            self._full = Tokenizer.from_buffer(text) if isinstance(text, bytes) else Tokenizer.from_str(text)
        return self._full

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._tok if self._cut_ids is None or text in self._probes else self._whole()
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        added = self.added_tokens_decoder
        cut = self._cut_ids is None or all(i in self._cut_ids or i in added for i in ids)
        return (self._tok if cut else self._whole()).decode(ids, skip_special_tokens=False)


def source_tokenizer(folder: Path, text: str | bytes, model_type: str | None, prefer_raw: bool = True,
                     spec: dict | None = None):
    """`_RawTokenizer` where it is exact (`_RawTokenizer.applies`), else transformers' AutoTokenizer. `text`:
    tokenizer.json's contents (str, or its UTF-8 bytes); `spec`: `text` parsed, if the caller has it."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if prefer_raw and isinstance(config, dict) and _RawTokenizer.applies(config, model_type):
        return _RawTokenizer(text, config, spec)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class StringArray(Sequence):
    """A GGUF string array whose packed body (`_length_prefixed`) is made once, however many files it is written
    into: the tokenizer's tokens and merges, which every GGUF type of a release shares (`GGUFVocab`)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @functools.cached_property
    def body(self) -> bytes:
        return _length_prefixed(self.items)


class MergePairs(StringArray):
    """tokenizer.json's [a, b] merges as gguf stores them, "a b", each such string made only where one is read: the
    body is packed from `joined`, every part joined with NULs, none holding a space or a NUL (`_merges`)."""

    def __init__(self, items: list[list[str]], joined: str):
        super().__init__(items)
        self.joined = joined

    def __getitem__(self, i):
        return " ".join(self.items[i]) if isinstance(i, int) else list(map(" ".join, self.items[i]))

    @functools.cached_property
    def body(self) -> bytes:
        data = _utf8_array(self.joined)
        nuls = np.flatnonzero(data == 0)
        data[nuls[0::2]] = ord(" ")  # between a pair's parts
        return _framed(data, nuls[1::2])


def _merges(spec: dict) -> StringArray | None:
    """tokenizer.json's merges as `gguf.SpecialVocab` stores them ("a b"; a space inside a part becomes U+0120,
    as gguf encodes it), without its per-character pass when no part holds a space (the usual case)."""
    merges = spec.get("model", {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return None
    if isinstance(merges[0], str):
        return StringArray(merges)
    if set(map(type, merges)) != {list} or set(map(len, merges)) != {2}:
        return None  # another layout: gguf's own conversion (or its error)
    try:
        joined = "\0".join(itertools.chain.from_iterable(merges))
    except TypeError:
        return None  # a part that is not a string
    if " " in joined:
        return None  # spaces inside parts: gguf's own encoding
    if joined.count("\0") != 2 * len(merges) - 1:  # a NUL inside a part
        return StringArray(list(map(" ".join, merges)))
    return MergePairs(merges, joined)


def vocab_fields(tokenizer, vocab_size: int) -> tuple[list[str], list[int], str]:
    """`_set_vocab_gpt2`'s token list (+ [PAD<i>] up to vocab_size), token types and the pre-tokenizer check hash."""
    import gguf

    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    # The vocabulary by id (ids past vocab_size are refused before): as it is where its ids run 0, 1, 2, ..., else
    # placed one by one; then the few missing and added ids.
    vocab = tokenizer.vocab  # a property that rebuilds the dict on transformers' tokenizers: read once
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    if np.array_equal(ids, np.arange(len(vocab))):  # the usual order: ids 0, 1, 2, ... (no per-token pass)
        tokens: list = [*vocab, *[None] * (vocab_size - len(vocab))]
        missing = range(len(vocab), vocab_size)
    else:
        tokens = [None] * vocab_size
        for token, i in vocab.items():
            tokens[i] = token
        missing = [i for i, token in enumerate(tokens) if token is None]
    # plain ints (numpy packs a list of them several times faster than one of IntEnums); the same bytes
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for i in missing:
        tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    # get_vocab_base: added tokens that are special (or look special) are CONTROL, other added ones USER_DEFINED.
    decoder = tokenizer.added_tokens_decoder
    for token in tokenizer.get_added_vocab():
        i = vocab.get(token)
        if i is None or tokens[i] != token:  # not in the vocabulary, or its id went to another string
            continue
        if not decoder[i].normalized:
            token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
        if decoder[i].special or looks_special(token):
            tokens[i], types[i] = token, int(gguf.TokenType.CONTROL)
        else:  # llama.cpp pre-normalizes a user-defined token's spaces (added for Gemma)
            tokens[i], types[i] = token.replace("\u2581", " "), int(gguf.TokenType.USER_DEFINED)
    return tokens, types, chkhsh


def looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special` (convert_hf_to_gguf.py): added tokens that some models leave
    non-special but that are control tokens (deepseek-coder's <pad> and <｜…｜>, gemma's <mask>, <2mass>, [@BOS@] and
    <unused…>, every <|…|>)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


# What gguf's SpecialVocab reads besides tokenizer.json (gguf as pinned), and the keys of tokenizer.json it reads
# when it is not asked for the merges.
_SPECIAL_VOCAB_FILES = ("tokenizer_config.json", "config.json", "chat_template.jinja", "chat_template.json",
                        "additional_chat_templates")
_SPECIAL_VOCAB_KEYS = ("added_tokens", "post_processor")


def special_vocab(folder: Path, spec: dict, merges: StringArray | None, vocab_size: int):
    """gguf's `SpecialVocab` of `folder` (special token ids, add_bos/add_eos, chat template) with `merges`, without
    its second parse of tokenizer.json (a 49k-token one: 0.1-0.2 s, more than the rest of the file's metadata):
    SpecialVocab reads a folder holding links to the small files it reads and a tokenizer.json cut to the keys it
    reads. With `merges` None it reads `folder` itself and converts the merges its own way."""
    import gguf

    if merges is None:
        return gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    with tempfile.TemporaryDirectory(prefix="qmerge-special-vocab-") as view:
        view = Path(view)
        for name in _SPECIAL_VOCAB_FILES:
            if (folder / name).exists():
                (view / name).symlink_to((folder / name).resolve())
        cut = {key: spec[key] for key in _SPECIAL_VOCAB_KEYS if key in spec}
        (view / "tokenizer.json").write_text(json.dumps(cut or {"model": {}}), encoding="utf-8")
        special = gguf.SpecialVocab(view, load_merges=False, n_vocab=vocab_size)
    special.merges = merges
    return special


@dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE tokenizer's GGUF metadata (`_set_vocab_gpt2`): tokens (+ [PAD<i>] up to vocab_size), token
    types, pre-tokenizer, merges, special ids, add_bos/add_eos, chat template. Made once by `gguf_vocab` and written
    into any number of files (`write_gguf(vocab=)`): the GGUF types of one release share it, so only the first file
    pays for it (0.1-0.15 s for SmolLM2's 49,152 tokens; the tensor bytes dominate any bigger model)."""

    folder: Path  # the checkpoint folder whose tokenizer this is
    pre: str
    tokens: StringArray
    types: list[int]
    special: object  # gguf.SpecialVocab, merges as a StringArray
    add_bos: bool | None  # stated where SpecialVocab does not state it
    add_eos: bool | None

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)


def gguf_vocab(folder: Path, hf_config: dict | None = None) -> GGUFVocab:
    """The GGUF metadata of the tokenizer in `folder` (a dense checkpoint; `hf_config`: its config.json, if the
    caller has it parsed). tokenizer.json is parsed once, here (`special_vocab`, `_RawTokenizer._spec_vocab` and
    `_merges` take that parse)."""
    folder = Path(folder).resolve()
    if hf_config is None:
        hf_config = _read_config(folder)
    tokenizer_json = folder / "tokenizer.json"
    with _gc_paused():
        try:
            text = tokenizer_json.read_bytes()  # json and `tokenizers` decode UTF-8 themselves
            spec = json.loads(text)
            model = spec["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInputError(f"no readable tokenizer.json ({type(e).__name__}: {e})", path=tokenizer_json,
                                fix="ship the tokenizer files with the merged checkpoint") from None
        byte_level = '"ByteLevel"' in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
            raise BadInputError(f"tokenizer is {model.get('type')} (byte_fallback={model.get('byte_fallback')}); "
                                "GGUF output writes byte-level BPE tokenizers only (tokenizer.ggml.model = gpt2); "
                                "sentencepiece/llama vocabularies are not written", path=tokenizer_json,
                                fix="convert with llama.cpp's convert_hf_to_gguf.py")
        tokenizer = source_tokenizer(folder, text, hf_config.get("model_type"), spec=spec)
        vocab_size = int(hf_config.get("vocab_size") or len(tokenizer.vocab))
        if max(tokenizer.vocab.values()) >= vocab_size:
            raise BadInputError(f"the tokenizer has ids up to {max(tokenizer.vocab.values())}, the model's "
                                f"vocab_size is {vocab_size}", path=folder,
                                fix="the tokenizer does not belong to this model")
        tokens, types, chkhsh = vocab_fields(tokenizer, vocab_size)
        pre = PRE_TOKENIZERS.get(chkhsh)
        if pre is None:
            raise BadInputError(f"unknown BPE pre-tokenizer (llama.cpp check hash {chkhsh})", path=tokenizer_json,
                                fix="convert with llama.cpp's convert_hf_to_gguf.py, which knows more "
                                    f"pre-tokenizers (qmerge knows: {', '.join(sorted(set(PRE_TOKENIZERS.values())))})")
        special = special_vocab(folder, spec, _merges(spec), vocab_size)
        if not special.merges:
            raise BadInputError("tokenizer.json has no merges", path=tokenizer_json,
                                fix="a BPE tokenizer needs its merges")
        if not isinstance(special.merges, StringArray):  # converted by gguf itself
            special.merges = StringArray(list(special.merges))
        # Always state add_bos/add_eos (llama.cpp's own default for a gpt2 vocab differs by version): what the
        # source tokenizer does to plain text.
        probe = tokenizer.encode("a")
        plain = tokenizer.encode("a", add_special_tokens=False)
        adds = len(probe) > len(plain)
        return GGUFVocab(folder, pre, StringArray(tokens), types, special,
                         None if "bos" in special.add_special_token else adds and probe[0] == tokenizer.bos_token_id,
                         None if "eos" in special.add_special_token else adds and probe[-1] == tokenizer.eos_token_id)


# ---- writing ----------------------------------------------------------------------------------------------------

_INT_FORMATS = {"UINT8": "<u1", "INT8": "<i1", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4", "INT32": "<i4",
                "UINT64": "<u8", "INT64": "<i8"}


def _length_prefixed(items: list) -> bytes:
    """Each item's UTF-8 bytes after its length as a little-endian uint64, all concatenated (a GGUF string array's
    body), without an item-by-item build: strings are joined with NULs and encoded in one call where none holds a
    NUL (no per-item `encode`), other items are encoded one by one and joined the same way."""
    if set(map(type, items)) == {str} and (data := _nul_joined(items, len(items))) is not None:
        return _framed(data, np.flatnonzero(data == 0))
    encoded = [item.encode("utf-8") if isinstance(item, str) else item for item in items]
    ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1)[:-1] - 1
    return _framed(np.frombuffer(b"\0".join(encoded), dtype=np.uint8), ends)


def _framed(data: np.ndarray, ends: np.ndarray) -> bytes:
    """The string array body of the items `data` holds one after another, item i ending at `ends[i]` (a separator
    byte there; the last item ends with `data`). Each separator (and one put before the first item) becomes the
    next item's 8-byte length: one `repeat` lays the bytes out, one scatter writes the lengths."""
    lengths = np.diff(ends, prepend=-1, append=data.size) - 1
    nuls = np.concatenate([[0], ends + 1])  # each item's NUL in `data` with a NUL put first
    repeats = np.ones(data.size + 1, dtype=np.intp)
    repeats[nuls] = 8
    out = np.repeat(np.concatenate([np.zeros(1, dtype=np.uint8), data]), repeats)
    heads = nuls + 7 * np.arange(len(nuls))  # 7 bytes more before each later item
    out[(heads[:, None] + np.arange(8)).reshape(-1)] = lengths.astype("<u8").view(np.uint8)
    return out.tobytes()


def _nul_joined(strings, count: int) -> np.ndarray | None:
    """`count` strings joined with NULs, UTF-8, as a writable byte array; None where a string holds a NUL."""
    joined = "\0".join(strings)
    return _utf8_array(joined) if joined.count("\0") == count - 1 else None


def _utf8_array(text: str) -> np.ndarray:
    """`text`'s UTF-8 bytes as a writable uint8 array."""
    return np.frombuffer(bytearray(text.encode("utf-8")), dtype=np.uint8)


@functools.cache
def _writer_class():
    """`gguf.GGUFWriter` with metadata arrays packed in one pass. The stock writer packs an array item by item
    (a `struct.pack` and a bytearray append each): a 49,152-token vocabulary + its merges cost about 1.3 s, a
    Llama-3 one (128k + 280k) several. Strings and integers are packed here to the same bytes (length-prefixed
    UTF-8, little-endian fixed width; a test holds them to the stock writer's); anything else, a mixed-type array
    (the stock error) or a big-endian file goes to the stock code."""
    import gguf
    from gguf import GGUFEndian, GGUFValueType
    from gguf.gguf_writer import WriterState

    class Writer(gguf.GGUFWriter):
        def write_tensor_data(self, tensor, tensor_endianess=None):
            """The stock method with numpy's `tofile` (which needs an OS file) replaced by a write of the array's
            bytes, so that the output can be a `DirectFile`; one file, native (little) endian, as qmerge writes."""
            if (len(self.fout or ()) != 1 or tensor_endianess not in (None, self.endianess)
                    or self.endianess != GGUFEndian.LITTLE or sys.byteorder != "little"):
                return super().write_tensor_data(tensor, tensor_endianess)
            if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
                raise ValueError(f"Expected output file to contain tensor info or weights, got {self.state}")
            fout = self.fout[0]
            info = self.tensors[0].pop(next(iter(self.tensors[0])))
            assert info.nbytes == tensor.nbytes
            self.write_padding(fout, fout.tell())
            fout.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
            self.write_padding(fout, tensor.nbytes)
            self.state = WriterState.WEIGHTS

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if (vtype != GGUFValueType.ARRAY or self.endianess != GGUFEndian.LITTLE
                    or not isinstance(val, (list, tuple, StringArray)) or not val):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
            samples = {str: val[0]} if isinstance(val, StringArray) else dict(zip(map(type, val), val))  # per type
            if sub_type is None and any(GGUFValueType.get_type(item) is not ltype for item in samples.values()):
                return super()._pack_val(val, vtype, add_vtype, sub_type)  # as the stock per-item check decides
            if ltype == GGUFValueType.STRING and isinstance(val, StringArray):
                body = val.body  # packed once for every file it goes into
            elif ltype == GGUFValueType.STRING and all(issubclass(kind, (str, bytes)) for kind in samples):
                body = _length_prefixed(val)
            elif ltype.name in _INT_FORMATS and all(issubclass(kind, int) for kind in samples):
                try:
                    wide = np.asarray(val, dtype=np.int64)
                except OverflowError:
                    return super()._pack_val(val, vtype, add_vtype, sub_type)
                body = wide.astype(_INT_FORMATS[ltype.name]).tobytes()
                if not np.array_equal(np.frombuffer(body, dtype=_INT_FORMATS[ltype.name]), wide):
                    return super()._pack_val(val, vtype, add_vtype, sub_type)  # out of range: the stock error
            else:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", ltype) + self._pack("Q", len(val))
            return head + body

    return Writer


@contextlib.contextmanager
def _gc_paused():
    """Python's cycle collector off for a while. The metadata build makes a few hundred thousand small objects (the
    parsed tokenizer.json, the token and merge lists) and no cycles; with the collector on, the collections they
    trigger walk everything else alive in the process too (torch, transformers: about 0.1 s per write)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read config.json ({type(e).__name__}: {e})", path=folder / "config.json") from None


def write_gguf(folder: Path, out_file: Path, qtype: str, quiet: bool = True, name: str | None = None,
               vocab: GGUFVocab | None = None) -> dict:
    """Writes the dense HF checkpoint in `folder` as one GGUF file `out_file` of type `qtype` (module doc).

    `name` (general.name) defaults to `out_file`'s stem, so the bytes depend on the inputs and the file name only.
    `vocab`: the tokenizer's metadata made by `gguf_vocab(folder)` for an earlier file (made here if None).
    Returns {"qtype", "file", "bytes", "seconds", "tensor_types", "sha256", "pre_tokenizer", "tensors"}."""
    import gguf
    from gguf.gguf_writer import WriterState

    start = time.perf_counter()
    folder, out_file = Path(folder), Path(out_file)
    hf_config = _read_config(folder)
    validate_gguf_target(hf_config, qtype)
    if (hf_config.get("quantization_config") or {}):
        raise BadInputError("is a quantized checkpoint; GGUF output reads dense checkpoints", path=folder,
                            fix="write the GGUF from the merged (dense) checkpoint")
    arch = ARCHITECTURES[_model_type(hf_config)]
    if vocab is None:
        vocab = gguf_vocab(folder, hf_config)
    elif vocab.folder != folder.resolve():
        raise ValueError(f"the vocabulary was made from {vocab.folder}, not from {folder}")
    reader = CheckpointReader(folder)
    planned = plan_tensors(hf_config, reader, qtype, folder)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_file)
    writer = _writer_class()(path=None, arch=arch)
    try:
        _add_hparams(writer, hf_config, arch, qtype, name or out_file.stem)
        vocab.add_to(writer)
        for p in planned:
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[p.qtype])
        out = DirectFile(tmp, background=True)  # past the page cache, each chunk written while the next tensor is
                                                # quantized (qmerge/io/direct.py); the writer's own open() is skipped
        writer.path, writer.fout, writer.state = tmp, [out], WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:
            _write_one(writer, reader, p, hf_config)
        out.finish()
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    fsync_dir(out_file.parent)
    if not quiet:
        print(f"qmerge: wrote {out_file} ({qtype}, {out_file.stat().st_size / 2**20:.1f} MiB)")
    return {"qtype": qtype, "file": str(out_file), "bytes": out_file.stat().st_size,
            "seconds": round(time.perf_counter() - start, 3),
            "tensor_types": dict(sorted(Counter(p.qtype for p in planned).items())),
            "sha256": sha256_file(out_file, progress=False), "pre_tokenizer": vocab.pre, "tensors": len(planned),
            "rules": TENSOR_RULES}
