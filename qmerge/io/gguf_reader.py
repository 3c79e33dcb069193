"""Reading a GGUF file back as an HF checkpoint, tensor by tensor: the readback that evaluates what ships.

Independent of `qmerge.io.gguf_writer` by construction: its own GGUF -> HF name table (written out below, not
gguf's `TensorNameMap` the writer uses), its own inverse of llama's Q/K permutation, and the HF config rebuilt
from the file's metadata alone. Only the `gguf` package's reader and dequantizer are shared with the writer's
world (they are llama.cpp's reference Python implementation). A mistake on either side (a name, a permutation, a
metadata key) therefore shows up as a mismatch instead of cancelling out.

`GGUFTensorSource(path)` has the interface of `CheckpointReader` (`names`, `get`), so `LayerwiseModel` runs a GGUF
one decoder layer at a time like any checkpoint. `write_folder_view(gguf, folder)` puts next to the file what an
HF folder has besides weights: config.json (from the GGUF's metadata) and the tokenizer transformers builds from
the GGUF. A folder holding exactly one `*.gguf` and no safetensors is then a checkpoint `LayerwiseModel.from_folder`
and `open_tensor_source` read: the GGUF stage's artifact can be evaluated in place, with nothing converted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qmerge.errors import BadInputError

READ_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF architecture -> HF model_type
# GGUF per-block name -> HF name (llama.cpp's `gguf-py/gguf/tensor_mapping.py` for LlamaForCausalLM/Qwen2), by hand.
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor of a llama/qwen2 file, None for one without an HF counterpart."""
    m = _BLK.match(gguf_name)
    if m:
        block, part, suffix = m.groups()
        return f"model.layers.{block}.{_BLOCK[part]}.{suffix}" if part in _BLOCK else None
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_GLOBAL[stem]}.{suffix}" if stem in _GLOBAL else None


# YaRN keys of llama.cpp that transformers' YaRN has no counterpart for, with the values that change nothing
# (ext_factor: -1 is llama.cpp's "1 for YaRN"); any other value is refused
YARN_NOT_READ = {"yarn_ext_factor": (-1.0, 1.0), "yarn_attn_factor": (1.0,), "yarn_log_multiplier": (0.0,)}


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int, path: Path | None = None) -> dict:
    """Llama 3.x's rope parameters (`rope_type = "llama3"`) behind a GGUF's `rope_freqs.weight`, the factor llama.cpp
    divides each rotary frequency by. The factors fix the scaling, not its four numbers (orig/low and orig/high
    matter, not orig): low_freq_factor is taken as 1, `factor` is the largest, and the original context length and
    high_freq_factor follow from the smoothly scaled frequencies, whose smoothing is linear in 1/wavelength. The
    parameters are checked to give transformers' frequencies the factors give (within 1e-5); factors of no llama3
    scaling are refused. All factors 1: no scaling ({})."""
    import math

    f = factors.astype(np.float64)
    if f.size != head_dim // 2 or not np.all(np.isfinite(f)) or np.any(f < 1):
        raise BadInputError(f"rope_freqs.weight holds {f.size} factors, not the {head_dim // 2} positive llama3 "
                            f"scaling factors of a head of {head_dim}", path=path)
    if np.all(f == 1):
        return {}
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv
    factor = float(f.max())
    smooth = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    params = None
    if smooth.sum() >= 2:  # s = (orig/wavelen - low)/(high - low) with low = 1: s = a/wavelen + b
        s = (1 / f[smooth] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[smooth], s, 1)
        if b < 0:
            high, orig = 1 - 1 / b, -a / b
            params = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(f"{high:.6g}"),
                      "original_max_position_embeddings": int(round(orig))}
    if params is not None:
        want = torch.from_numpy(inv / f)
        got = _llama3_inv_freq(theta, head_dim, **params)
        if torch.allclose(got, want, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", **params}
    raise BadInputError("rope_freqs.weight is not a llama3 rope scaling qmerge can read back (it needs two or more "
                        "smoothly scaled frequencies)", path=path)


def _llama3_inv_freq(theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> torch.Tensor:
    """transformers' llama3 rope frequencies (`modeling_rope_utils._compute_llama3_parameters`), in float64."""
    import math

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def unpermute_qk(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF -> HF rows of a llama Q/K projection: llama.cpp stores each head's rotary pairs interleaved
    ([x0, y0, x1, y1, ...]); HF keeps the halves apart ([x0, x1, ... | y0, y1, ...])."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
            .transpose(1, 2).reshape(weights.shape))


@functools.cache
def _reader_class():
    from gguf import GGUFReader

    class Reader(GGUFReader):
        """gguf's GGUFReader over a plain ndarray view of its memory map. The stock reader slices an `np.memmap`,
        whose Python-level `__getitem__` and `__array_finalize__` run for each of the views it makes while parsing
        the metadata, about ten per vocabulary entry (SmolLM2's 49k tokens and merges: 2.9 s; 1.0 s on the plain
        view). The fields, tensors and bytes are the stock reader's (a test holds them); only the arrays' Python
        type differs."""

        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is np.memmap:  # the first read, right after the stock __init__ mapped the file
                self.data = self.data.view(np.ndarray)  # still backed by the mapping (its base)
            return super()._get(offset, dtype, count, override_order)

    return Reader


def open_gguf(path: Path | str):
    """`gguf.GGUFReader(path)`, faster (`_reader_class`)."""
    return _reader_class()(str(path))


_GGUF_READER_SWAP = threading.Lock()


@contextlib.contextmanager
def opened_for_transformers(path: Path, reader):
    """While the block runs, `gguf.GGUFReader(file)`, which transformers' GGUF loader calls (importing it from the
    module at each call), returns `reader` (opened by `open_gguf`) when `file` is `path`, and `open_gguf(file)` for
    any other file: the metadata is parsed once, by gguf's parser on a plain array (`_reader_class`), instead of
    again on an `np.memmap` (SmolLM2's file: 4 of the 6 s transformers takes to build a tokenizer from it). One swap
    at a time in the process (a lock), and gguf's own class back afterwards, whatever happens."""
    import gguf

    path = Path(path).resolve()

    def swapped(file, *args, **kwargs):
        if args or kwargs:  # a mode or endianness asked for: gguf's own reader
            return stock(file, *args, **kwargs)
        return reader if Path(file).resolve() == path else open_gguf(file)

    with _GGUF_READER_SWAP:
        stock = gguf.GGUFReader
        gguf.GGUFReader = swapped
        try:
            yield
        finally:
            gguf.GGUFReader = stock


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


class GGUFTensorSource:
    """A GGUF file's tensors under HF names, each dequantized to float32 on `get` (and nothing else read).

    `names` are the HF names the checkpoint stores: the tied head is absent, as in a safetensors checkpoint that
    stores a tie once. `types[name]` is the GGUF type the tensor is stored in."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.reader = open_gguf(self.path)
        except Exception as e:  # gguf raises ValueError/IndexError/... on damaged files
            raise BadInputError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=self.path,
                                fix="rewrite the file") from None
        self.arch = _field(self.reader, "general.architecture")
        if self.arch not in READ_ARCHITECTURES:
            raise BadInputError(f"GGUF architecture {self.arch!r} is not read back (supported: "
                                f"{', '.join(READ_ARCHITECTURES)})", path=self.path)
        self.n_head = int(_field(self.reader, f"{self.arch}.attention.head_count"))
        self.n_kv = int(_field(self.reader, f"{self.arch}.attention.head_count_kv", self.n_head))
        self._tensors = {}
        self.types: dict[str, str] = {}
        self._rope_freqs = None  # llama3 rope's frequency factors: part of the config, not a weight
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight" and self.arch == "llama":
                self._rope_freqs = t
                continue
            name = hf_name(t.name)
            if name is None:
                raise BadInputError(f"tensor {t.name!r} has no HF counterpart in a {self.arch} model", path=self.path)
            self._tensors[name] = t
            self.types[name] = t.tensor_type.name
        self.loaded = 0

    @property
    def names(self):
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF (numpy-order) shape; GGUF stores ggml order, innermost first."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor `name` dequantized to float32 (gguf.quants.dequantize), Q/K rows back in HF order."""
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise KeyError(f"{name!r} is not in {self.path.name} ({len(self._tensors)} tensors)")
        t = self._tensors[name]
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))
        tensor = torch.from_numpy(values.copy())
        if self.arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            tensor = unpermute_qk(tensor, self.n_head)
        elif self.arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            tensor = unpermute_qk(tensor, self.n_kv)
        self.loaded += 1
        return tensor.contiguous().to(device)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def hf_config(self) -> dict:
        """The HF config.json of this file's model, from its metadata alone."""
        r, a = self.reader, self.arch
        n_embd = int(_field(r, f"{a}.embedding_length"))
        config = {
            "model_type": READ_ARCHITECTURES[a],
            "architectures": ["LlamaForCausalLM" if a == "llama" else "Qwen2ForCausalLM"],
            "hidden_size": n_embd,
            "intermediate_size": int(_field(r, f"{a}.feed_forward_length")),
            "num_hidden_layers": int(_field(r, f"{a}.block_count")),
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv,
            "head_dim": int(_field(r, f"{a}.attention.key_length", n_embd // self.n_head)),
            "max_position_embeddings": int(_field(r, f"{a}.context_length")),
            "rms_norm_eps": float(_field(r, f"{a}.attention.layer_norm_rms_epsilon")),
            "vocab_size": int(_field(r, f"{a}.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": _field(r, "tokenizer.ggml.padding_token_id"),
            "hidden_act": "silu",
            "dtype": "float32",
        }
        rope = {"rope_theta": float(_field(r, f"{a}.rope.freq_base", 10000.0)), "rope_type": "default"}
        scaling = _field(r, f"{a}.rope.scaling.type")
        if scaling in ("linear", "yarn"):
            rope["rope_type"] = scaling
            rope["factor"] = float(_field(r, f"{a}.rope.scaling.factor"))
            if scaling == "yarn":
                rope["original_max_position_embeddings"] = int(_field(r, f"{a}.rope.scaling.original_context_length"))
                for key in ("beta_fast", "beta_slow"):
                    if _field(r, f"{a}.rope.scaling.yarn_{key}") is not None:
                        rope[key] = float(_field(r, f"{a}.rope.scaling.yarn_{key}"))
                odd = [key for key, neutral in YARN_NOT_READ.items()
                       if _field(r, f"{a}.rope.scaling.{key}", neutral[0]) not in neutral]
                if odd:
                    raise BadInputError(f"YaRN's {', '.join(odd)} are not read back", path=self.path)
        elif scaling not in (None, "none"):
            raise BadInputError(f"rope scaling {scaling!r} is not read back", path=self.path)
        if self._rope_freqs is not None:
            if rope["rope_type"] != "default":
                raise BadInputError(f"rope_freqs.weight beside {rope['rope_type']} rope scaling is not read back",
                                    path=self.path)
            from gguf.quants import dequantize

            t = self._rope_freqs
            factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
            rope.update(llama3_rope(factors, rope["rope_theta"], config["head_dim"], self.path))
        config["rope_parameters"] = rope
        if a == "qwen2":
            config["use_sliding_window"] = False
        return config

    def close(self) -> None:
        self._tensors.clear()


def find_gguf(folder: Path) -> Path | None:
    """The one `*.gguf` of a folder that holds no safetensors (a GGUF checkpoint view), else None."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return None
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        raise BadInputError(f"holds {len(files)} GGUF files; a GGUF checkpoint folder holds one", path=folder,
                            fix="keep one .gguf per folder")
    return files[0] if files else None


def open_tensor_source(folder: Path):
    """The tensor source of a checkpoint folder: a GGUF view's file, else the safetensors (`CheckpointReader`)."""
    from qmerge.io.safetensors_io import CheckpointReader

    gguf_file = find_gguf(folder)
    return GGUFTensorSource(gguf_file) if gguf_file is not None else CheckpointReader(folder)


def write_folder_view(gguf_file: Path, folder: Path | None = None) -> Path:
    """Makes `folder` (default: the GGUF's own folder) an HF checkpoint view of `gguf_file`: config.json from the
    GGUF's metadata and the tokenizer transformers builds from the GGUF (its own GGUF tokenizer converter). The
    weights stay in the GGUF; a `folder` other than the file's gets a hardlink to it (a copy across filesystems).
    Returns the folder."""
    import os
    import shutil

    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    folder = Path(folder) if folder is not None else gguf_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    source = GGUFTensorSource(gguf_file)
    (folder / "config.json").write_text(json.dumps(source.hf_config(), indent=2, sort_keys=True) + "\n")
    with warnings.catch_warnings(), opened_for_transformers(gguf_file, source.reader):
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        except Exception as e:
            raise BadInputError(f"transformers cannot build a tokenizer from this GGUF ({type(e).__name__}: {e})",
                                path=gguf_file) from None
    tokenizer.save_pretrained(folder)
    target = folder / gguf_file.name
    if target.resolve() != gguf_file:
        try:
            os.link(gguf_file, target)
        except OSError:
            shutil.copyfile(gguf_file, target)
    return folder
