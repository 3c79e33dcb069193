"""The pipeline's stages in order, each with its config slice (what its artifact key hashes)."""

from __future__ import annotations

from qmerge.config import Config
from qmerge.dag import Stage, package_versions


# The packages that turn a text spec's file into token ids: the tokenizer's, and its format's reader.
TOKENIZER = "tokenizers"
TEXT_READERS = {"jsonl": ("datasets",), "parquet": ("datasets",), "mediawiki": ("gensim",)}


def text_digest(cfg: Config, value: str, what: str) -> dict:
    """A text spec as its artifact keys see it: what the spec says (how its source is read, which documents), its
    source's bytes and the versions of what reads and tokenizes it, so that editing `split.documents`, the text
    itself or upgrading `tokenizers` never reuses windows built from the old ones. Not the spec's path or bytes:
    `cal.toml` and `./cal.toml`, a relative path and the absolute one a matrix build writes, or a comment added to
    the spec give the same token ids, and must not rerun GPTQ."""
    from qmerge.io.paths import sha256_file
    from qmerge.io.textset import load_text_spec, parse_slice

    spec = load_text_spec(cfg.path(value, what))
    documents = parse_slice(spec.split.documents)
    readers = (TOKENIZER, *TEXT_READERS.get(spec.source.format, ()))
    return {"source": spec.source.model_dump(exclude={"path"}),
            "documents": [documents.start, documents.stop, documents.step],
            "source_sha256": sha256_file(spec.source_path), "readers": package_versions(readers)}


def _eval_texts(cfg: Config) -> dict | None:
    if cfg.gate is None:
        return None
    texts = {"eval": text_digest(cfg, cfg.gate.eval, "gate.eval") if cfg.gate.eval is not None else None,
             "extra_eval": [text_digest(cfg, v, f"gate.extra_eval[{i}]") for i, v in enumerate(cfg.gate.extra_eval)]}
    if cfg.tasks:  # absent for single-text configs, so their keys stay what they were
        texts["tasks"] = [{"task": a.task, "adapter": cfg.adapters.index(a),
                           **text_digest(cfg, a.eval, "adapters.eval")} for a in cfg.tasks]
    return texts


def _merge_slice(cfg: Config) -> dict:
    # linear's pruning parameters are inert: left out, so linear configs keep the keys they had before them
    inert = {"density", "majority_sign_method", "seed"} if cfg.merge.method == "linear" else set()
    out = cfg.merge.model_dump(exclude={"device", "select", *inert})
    if cfg.merge.method.startswith("dare"):  # the keep masks' definition (ops/combine.py): a new one is new bytes
        out["dare_mask"] = "keep_hash-v2"
    if cfg.merge.into == "auto":
        # The choice is scored on `select` windows of gate.seq_len. The eval texts are only checked against them
        # (resolve does it on every run), so a report-only text added to the gate does not redo both merges.
        out["select_text"] = text_digest(cfg, cfg.merge.select, "merge.select")
        out["gate"] = {"seq_len": cfg.gate.seq_len if cfg.gate else None}
    return out


def _calibrate_slice(cfg: Config) -> dict:
    # The eval texts are only checked against the calibration (resolve does it on every run): they change no byte
    # of the windows, so a report-only text added to the gate must not rerun GPTQ.
    q = cfg.quantize
    return {**q.model_dump(include={"samples", "seq_len"}),
            "text": text_digest(cfg, q.calibration, "quantize.calibration")}


def _shipped(cfg: Config) -> dict:
    """The artifacts the release would ship (output.formats), for the keys of the stages that score and decide each
    of them: a list they were not run for must not be read from their cache. Left out at the default, keeping the
    keys configs without output.formats always had."""
    return {"artifacts": list(cfg.artifacts)} if cfg.output.formats is not None else {}


TEXT_PATHS = {"eval", "extra_eval"}  # the gate's text specs: in the keys by content (`text_digest`), not by path


def _evaluate_slice(cfg: Config) -> dict:
    thresholds = {"max_ppl_increase", "min_delta_retention", "max_kl", "confidence"}
    return {**cfg.gate.model_dump(exclude=thresholds | TEXT_PATHS), "texts": _eval_texts(cfg)} | _shipped(cfg)


def _gate_slice(cfg: Config) -> dict | None:
    if cfg.gate is None:
        return None
    required = {"required_tasks": [a.task for a in cfg.tasks if a.required]} if cfg.tasks else {}
    return cfg.gate.model_dump(exclude=TEXT_PATHS) | required | _shipped(cfg)


def _resolve_slice(cfg: Config) -> dict:
    # A sha256 pin verifies the inputs, whose hashes resolve's result holds (the key is made from both): it changes
    # no byte, so adding the pins that --dry-run prints keeps every key (it re-ran every stage and published the
    # same model again). Left as None, the key of a config that never had pins.
    return {"base": cfg.base.model_dump() | {"sha256": None},
            "adapters": [a.model_dump(exclude={"name", "eval", "required"}) | {"sha256": None} for a in cfg.adapters]}


def _quantize_slice(cfg: Config) -> dict:
    # Options at their defaults are left out, so configs without them keep the keys they had before they existed.
    # forward_dtype enters resolved ("auto" is bfloat16 or float32 by the hardware): float32 is left out like a
    # default, so an "auto" that resolves to it keeps the key (and the bytes) float32 configs always had.
    from qmerge.runtime import forward_dtype, pick_device

    q = cfg.quantize
    resolved = forward_dtype(q.forward_dtype, pick_device()) if q.backend == "qmerge" else "float32"
    q = q.model_copy(update={"forward_dtype": resolved})
    defaults = {"forward_dtype": "float32", "scale_search": "minmax", "compensate": None, "gptaq": None,
                "static_groups": False}
    exclude: dict = {k: True for k, v in defaults.items() if getattr(q, k) == v}
    exclude["calibration"] = True  # its windows come from calibrate, whose key holds the text by content
    # GPTQModel's solver and writer make this stage's bytes on its backend
    out = {"gptqmodel": package_versions(("gptqmodel",))["gptqmodel"]} if q.backend == "gptqmodel" else {}
    if q.compensate is not None and q.compensate.train is None:
        exclude["compensate"] = {"train"}  # untrained compensation keeps the key it had before training existed
    return q.model_dump(exclude=exclude) | out


REGISTRY_KEYS = {"registry", "registry_uri", "registered_model", "alias"}


def _promote_slice(cfg: Config) -> dict:
    # The registry settings say where a release is recorded, not what it holds: left out of promote's key.
    return cfg.output.model_dump(exclude=REGISTRY_KEYS) | {"name": cfg.name}


def _register_slice(cfg: Config) -> dict:
    return {"uri": cfg.registry_uri, "registered_model": cfg.registered_model, "alias": cfg.output.alias}


EXPORT_WRITERS = ("gguf", "compressed-tensors")  # the packages whose code makes the export's bytes


def _export_slice(cfg: Config) -> dict:
    # A GGUF file holds the config's name (general.name): a renamed build writes other bytes. The writers' versions
    # too (the stage keys' packages are qmerge's own and the model stack's): an upgraded `gguf` re-exports, so the
    # release's provenance names the versions that wrote its files
    gguf = any(artifact.startswith("gguf-") for artifact in cfg.exports)
    return {"formats": list(cfg.exports), "writers": package_versions(EXPORT_WRITERS)} | \
        ({"name": cfg.name} if gguf else {})


def built_with(cfg: Config) -> dict[str, str]:
    """Every package version some stage key of `cfg` holds: the release's provenance names them all."""
    out = package_versions()
    if cfg.exports:
        out |= package_versions(EXPORT_WRITERS)
    if cfg.quantize is not None and cfg.quantize.backend == "gptqmodel":
        out |= package_versions(("gptqmodel",))
    if cfg.quantize is not None or cfg.gate is not None:  # texts read and tokenized (`text_digest`)
        out |= package_versions((TOKENIZER, *sorted({p for ps in TEXT_READERS.values() for p in ps})))
    return out


def _exporting(cfg: Config) -> bool:
    return bool(cfg.exports)


def _quantizing(cfg: Config) -> bool:
    return cfg.quantize is not None


def _gating(cfg: Config) -> bool:
    return cfg.gate is not None


def _registering(cfg: Config) -> bool:
    return cfg.gate is not None and cfg.output.registry is not None


# Each stage's entry point is named as "module:function" and imported when the stage runs, so a dry run or a
# resumed pipeline never imports the stages it does not run (resolve overlaps hashing with those imports).
STAGES = [
    Stage("resolve", (), _resolve_slice, "qmerge.stages.resolve:run_resolve", keyed_by_result=True),
    Stage("merge", ("resolve",), _merge_slice, "qmerge.stages.merge:run_merge_stage"),
    Stage("calibrate", ("resolve",), _calibrate_slice, "qmerge.stages.calibrate:run_calibrate", enabled=_quantizing),
    Stage("quantize", ("merge", "calibrate"), _quantize_slice, "qmerge.stages.quantize:run_quantize",
          enabled=_quantizing),
    Stage("export", ("merge", "quantize"), _export_slice, "qmerge.stages.export:run_export", enabled=_exporting),
    Stage("evaluate", ("resolve", "merge", "quantize", "export"), _evaluate_slice,
          "qmerge.stages.evaluate:run_evaluate", enabled=_gating),
    Stage("gate", ("evaluate",), _gate_slice, "qmerge.stages.gate:run_gate", enabled=_gating),
    Stage("promote", ("resolve", "merge", "calibrate", "quantize", "export", "gate"), _promote_slice,
          "qmerge.stages.promote:run_promote", enabled=_gating, cached=False,
          unchanged="qmerge.stages.promote:unchanged_release"),
    # Runs after a rejected gate too (a reject is recorded, never aliased); a failure keeps the release (exit 1).
    Stage("register", ("resolve", "calibrate", "gate", "promote"), _register_slice,
          "qmerge.stages.register:run_register", enabled=_registering, cached=False, after_stop=True,
          unchanged="qmerge.stages.register:registered"),
]
