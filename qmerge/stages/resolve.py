"""resolve: validate every input and produce the plan, from headers only (no weights loaded).

Checks that every adapter tensor lands on a base module with matching shapes, hashes every input file
(a pinned sha256 that differs is exit 2), and derives which linears bitsandbytes quantized.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from qmerge.config import Config, NF4Settings
from qmerge.errors import BadInputError, UnsupportedAdapterError
from qmerge.io.adapter import Adapter, LoraModule, read_adapter
from qmerge.io.base import BaseCheckpoint, NF4Recipe
from qmerge.io.paths import MODEL_FILES, Cancelled, file_stamp, sha256_file, tokenizer_source
from qmerge.io.safetensors_io import ST_DTYPE_NAMES
from qmerge.numerics import DTYPES
from qmerge.plan import AdapterPlan, BasePlan, Plan

def base_folder(cfg: Config, progress: bool = True, dry_run: bool = False,
                scratch: Path | None = None) -> tuple[Path, dict, dict | None]:
    """The HF folder for `base.path`, what the plan says of its origin, and (only for a dry run before a GGUF's
    first conversion) the header-only tensor table that stands in for the folder's weights.

    A GGUF is converted once into a cached folder; a dry run never converts: it reads the GGUF's header and
    writes the config the conversion would write into `scratch`."""
    path = cfg.path(cfg.base.path, "base.path")
    if path.is_file() and path.suffix == ".gguf":
        from qmerge.io import gguf

        target, sha, current = gguf.cache_folder(path, progress=progress)
        origin = {"kind": "gguf", "gguf": str(path), "gguf_sha256": sha, "note": gguf.NOTE}
        # The conversion is a pure function of the GGUF (and the keyed package versions): the GGUF is the input.
        files = ({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha},)
        # before converting: the folder's provenance, or the GGUF's header, names its architecture
        _check_gguf_load_dtype(cfg, path, gguf.folder_architecture(target) if current
                               else gguf.gguf_header(path)["architecture"])
        if current:
            return target, {**origin, "files": files}, None
        if dry_run:  # the plan names the folder the first real run will convert into
            return scratch, {**origin, "files": files, "folder": str(target)}, gguf.header_view(path, scratch)
        return gguf.gguf_to_hf(path, progress=progress), {**origin, "files": files}, None
    if not path.is_dir():
        raise BadInputError("base.path is neither a model folder nor a .gguf file", path=path)
    if not (path / "config.json").is_file():
        raise BadInputError("no config.json in the base folder", path=path,
                            fix="point base.path at a Hugging Face model folder (config.json + *.safetensors)")
    return path, {"kind": "hf"}, None


def nf4_recipe(cfg: Config) -> NF4Recipe:
    return _recipe(cfg.base.nf4)


def _recipe(nf4: NF4Settings) -> NF4Recipe:
    load = None if nf4.load_dtype == "auto" else nf4.load_dtype
    deq = None if nf4.dequant_dtype == "auto" else nf4.dequant_dtype
    return NF4Recipe(nf4.blocksize, nf4.double_quant, load, nf4.compute_dtype, deq)


HASH_THREADS = 8  # files hashed at once at most: past a few, the disk rather than the cores sets the pace


def files_digest(files: list[Path], progress: bool, stop: threading.Event | None = None,
                 stamps: dict[str, list[int]] | None = None) -> tuple[list[dict], str]:
    """Each file's sha256, and the pin: the sha256 of their hex digests concatenated in file-name order (what
    `sha256sum FILES | LC_ALL=C sort -k2 | cut -c1-64 | tr -d '\\n' | sha256sum` prints in the folder).

    One sha256 runs on one core (~1.1 GB/s here): a model's shards are hashed on up to one thread per core
    (HASH_THREADS at most; hashlib releases the GIL), one progress bar over all their bytes. A 2.1 GB two-shard
    base on 2 cores: 2.4 -> 1.4 s; a 70B's 140 GB in 30 shards, ~2 min on one core, is bound by the disk instead.
    The digests do not depend on the order the threads finish in. `stamps` receives each file's `file_stamp` as
    it was hashed; a file that changes while it is hashed is exit 2."""
    ordered = sorted(files, key=lambda f: f.name.encode())
    sizes = [f.stat().st_size for f in ordered]
    total = sum(sizes)
    workers = max(1, min(len(ordered), os.cpu_count() or 1, HASH_THREADS))
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"sha256 ({len(ordered)} files)",
              disable=not progress or total < 64 * 2**20) as bar, \
            ThreadPoolExecutor(workers, thread_name_prefix="qmerge-sha256") as pool:
        lock, halt = threading.Lock(), stop if stop is not None else threading.Event()

        def read(n: int) -> None:
            with lock:
                bar.update(n)

        def one(f: Path) -> str:
            try:
                before = file_stamp(f)
                digest = sha256_file(f, stop=halt, read=read)
                if file_stamp(f) != before:
                    raise BadInputError("changed while qmerge hashed it", path=f,
                                        fix="rerun once whatever writes the file has finished")
                if stamps is not None:
                    with lock:
                        stamps[str(f)] = before
                return digest
            except BaseException:
                halt.set()  # the other files stop at their next chunk
                raise

        futures = [pool.submit(one, f) for f in ordered]
        try:
            errors = [e for e in (future.exception() for future in futures) if e is not None]
        except BaseException:  # interrupted while waiting (Ctrl-C): the threads stop at their next chunk
            halt.set()
            raise
        if errors:  # the error that stopped the others, not their `Cancelled`
            raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
        digests = [future.result() for future in futures]
    entries = [{"path": str(f), "bytes": size, "sha256": digest} for f, size, digest in zip(ordered, sizes, digests)]
    combined = hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()
    return entries, combined


def _base_files(folder: Path) -> list[Path]:
    """What the base is made of: config.json, the weights the checkpoint reads (the index and the shards it names,
    or model.safetensors; not other .safetensors beside them, such as a repository's consolidated.safetensors),
    and the tokenizer and generation files (MODEL_FILES), which end up in the output too."""
    from qmerge.io.safetensors_io import INDEX_NAME, SINGLE_NAME, read_index

    index = folder / INDEX_NAME
    weights = [index, *(folder / s for s in sorted(set(read_index(index).values())))] if index.is_file() else \
        [folder / SINGLE_NAME] if (folder / SINGLE_NAME).is_file() else []
    files = [*weights, *(p for p in folder.iterdir() if p.name == "config.json" or p.name in MODEL_FILES)]
    for p in files:
        if not p.is_file():
            raise BadInputError("is not a readable file (a dangling link?)", path=p, fix="restore the model's files")
    return files


def run_resolve(ctx) -> dict:
    """The stage entry point: the plan for `ctx.cfg`, serialised (later stages read it as `ctx.plan`)."""
    return resolve(ctx.cfg, dry_run=ctx.dry_run, progress=not ctx.quiet).to_json()


def resolve(cfg: Config, *, dry_run: bool = False, progress: bool = True) -> Plan:
    # a dry run's scratch folder, for the config of a GGUF not yet converted
    with tempfile.TemporaryDirectory(prefix="qmerge-dry-") if dry_run else contextlib.nullcontext() as scratch:
        folder, origin, headers = base_folder(cfg, progress, dry_run, scratch and Path(scratch))
        from qmerge.io.textset import reading_sources_once

        with reading_sources_once():  # the texts are compared pairwise and with the training records
            return _resolve(cfg, folder, origin, headers, progress)


def _check_gguf_load_dtype(cfg: Config, path: Path, architecture: str | None) -> None:
    """A GGUF that transformers dequantizes in the dtype it is loaded in (LFM2, Qwen3.5) is only the base its
    trainer quantized when both loaded it in float32: qmerge's cached folder is float32, and rounding it to
    bfloat16 afterwards changes thousands of W_nf4 codes per weight against a bfloat16 dequantization."""
    from qmerge.io.gguf import dtype_sensitive

    load = cfg.base.nf4.load_dtype
    if load not in ("auto", "float32") and dtype_sensitive(architecture):
        raise BadInputError(f"[base.nf4] load_dtype = {load!r}: transformers dequantizes {architecture} GGUFs in the "
                            "dtype they are loaded in, which qmerge's float32 conversion does not reproduce",
                            path=cfg.source, fix="train and merge with load_dtype = \"float32\", or start from an HF "
                            f"folder saved from the {load} model the adapter was trained on")


def _resolve(cfg: Config, folder: Path, origin: dict, headers: dict | None, progress: bool) -> Plan:
    skip = None if cfg.base.nf4.skip_modules == "auto" else cfg.base.nf4.skip_modules
    stamps: dict[str, list[int]] = {}  # every input file hashed here, for the runner's unchanged-since check
    plan_folder = origin.pop("folder", str(folder))
    if origin["kind"] == "gguf":  # the GGUF is the input, hashed already; its conversion is a pure function of it
        base = BaseCheckpoint(folder, nf4_recipe(cfg), skip, headers)
        base_entries, base_sha = origin.pop("files"), origin["gguf_sha256"]
    else:
        base, base_entries, base_sha = _hashed_base(folder, nf4_recipe(cfg), skip, progress, stamps)
    _check_complete(base, folder)
    pinned = cfg.base.sha256
    # One digest over everything that changes the result: a pin of config.json or of one shard of many would
    # let the other files change unnoticed.
    if pinned and pinned.lower() != base_sha:
        covers = "the GGUF file" if origin["kind"] == "gguf" else f"combined over its {len(base_entries)} files"
        raise BadInputError(f"sha256 mismatch: config pins {pinned} but the base hashes to {base_sha} ({covers})",
                            path=cfg.source, fix="update base.sha256 (--dry-run prints it) or point base.path at the "
                            "pinned model")
    adapters, parsed = [], []
    for i, a in enumerate(cfg.adapters):
        apath = cfg.path(a.path, f"adapters[{i}].path")
        adapter = read_adapter(apath)
        extra = [apath / f for f in MODEL_FILES if (apath / f).is_file()]  # a tokenizer shipped with the adapter
        entries, sha = files_digest([adapter.weights_file, apath / "adapter_config.json", *extra], progress,
                                    stamps=stamps)
        # adapter_config.json is in the pin: alpha, r, rslora and the patterns change the merge as much as the weights
        if a.sha256 and a.sha256.lower() != sha:
            raise BadInputError(f"sha256 mismatch for adapters[{i}]: pinned {a.sha256}, found {sha} (combined over "
                                f"{', '.join(Path(e['path']).name for e in entries)})", path=apath,
                                fix="update the pin (--dry-run prints it) or use the pinned adapter")
        _check_training_record(cfg, apath, origin, base)
        matches = match_adapter(adapter, base)
        parsed.append((apath, a.weight, adapter))
        adapters.append({"path": str(apath), "weight": a.weight, "files": entries, "sha256": sha,
                         "modules": len(adapter.modules), "replaced_tensors": sorted(adapter.replacements),
                         "dora": any(m.magnitude for m in adapter.modules.values()), "matches": matches,
                         "tokenizer": (apath / "tokenizer_config.json").is_file()})
    _check_combination(cfg, adapters)
    _check_replacements(cfg, parsed)
    if cfg.quantize is not None:  # shapes are known here, so a group_size that cannot work fails before the merge
        from qmerge.ops.gptq import check_group_size

        names = sorted(f"{m}.weight" for m in base.arch.quantized if f"{m}.weight" in base.tensors)
        conv1d = sorted(m for m in base.arch.quantized if base.arch.layouts.get(m) == "conv1d")
        if conv1d and cfg.quantize.backend == "qmerge":
            raise BadInputError(f"GPTQ of Conv1D layers ({conv1d[0]} and {len(conv1d) - 1} more; GPT-2 style) is not "
                                "supported by the qmerge backend: they would ship unquantized in a GPTQ checkpoint",
                                path=cfg.source, fix='remove [quantize], or use quantize.backend = "gptqmodel"')
        if not names:
            raise BadInputError("[quantize] is set but this base has no quantizable linear layers", path=cfg.source,
                                fix="remove [quantize]")
        check_group_size({n: base.tensors[n][1] for n in names}, names, cfg.quantize.group_size, cfg.quantize.bits,
                         cfg.source)
    tokenizer = tokenizer_source([a["path"] for a in adapters], folder)  # the one the merged checkpoint will hold
    gguf = [artifact[5:] for artifact in cfg.exports if artifact.startswith("gguf-")]
    if gguf:  # a GGUF type, architecture or tokenizer the writer cannot take fails before the merge
        from qmerge.io.gguf_writer import gguf_vocab, validate_gguf_target

        for qtype in gguf:
            validate_gguf_target(base.hf_config, qtype)
        # the tokenizer the merged checkpoint will hold, checked as the export will check it; its vocabulary's size
        # against the model's is checked there (an adapter may resize the embeddings)
        if tokenizer != folder or headers is None:  # else a dry run's stand-in for a GGUF not converted yet: no files
            gguf_vocab(tokenizer, {**base.hf_config, "vocab_size": None})
    # (a dry run's stand-in for a GGUF not converted yet has no tokenizer: its texts are checked but not cut)
    _check_texts(cfg, tokenizer if headers is None else None, base.hf_config)
    if cfg.merge.into == "original" and base.prequantized:
        raise BadInputError('merge.into = "original" needs a full-precision base; this base is pre-quantized',
                            path=cfg.source, fix='use into = "nf4" (or "auto", which means "nf4" here)')
    return Plan(
        base=BasePlan(folder=plan_folder, **origin, prequantized=base.prequantized, files=tuple(base_entries),
                      sha256=base_sha, model_type=base.arch.model_type, tensors=len(base.tensors)),
        adapters=tuple(AdapterPlan(**a) for a in adapters),
        nf4=vars(nf4_recipe(cfg)),
        quantized_modules=tuple(sorted(base.arch.quantized)),
        skipped_modules=tuple(base.arch.skipped),
        tied=base.arch.tied,
        estimate=_estimate(cfg, base),
        input_stamps=dict(sorted(stamps.items())),
    )


TRAINING_RECORD = "qmerge_training.json"  # written beside an adapter by scripts/train_demo_adapter.py


def _check_training_record(cfg: Config, apath: Path, origin: dict, base: BaseCheckpoint) -> None:
    """An adapter that records how its base was quantized for training must be merged onto that same W_nf4:
    another blocksize, double quant or dtype chain is another base, and the merge would be off by it silently.
    Settings that differ in name only ("auto" loading a float32 checkpoint as float32) agree."""
    path = apath / TRAINING_RECORD
    if not path.is_file():
        return
    unreadable = dict(path=path, fix="restore the file written at training time, or delete it")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"cannot read the adapter's training record: {e}", **unreadable) from None
    _check_training_text(cfg, path, record.get("train_text") if isinstance(record, dict) else None)
    if base.prequantized:  # a pre-quantized base brings its own W_nf4; [base.nf4] is ignored
        return
    nf4 = record.get("nf4") if isinstance(record, dict) else None
    if not isinstance(nf4, dict):
        raise BadInputError('the adapter\'s training record has no "nf4" table', **unreadable)
    ours = cfg.base.nf4
    fields = ("quant_type", "blocksize", "double_quant", "load_dtype", "compute_dtype", "dequant_dtype")
    try:
        theirs = NF4Settings(**(ours.model_dump(include=set(fields)) | {f: nf4[f] for f in fields if f in nf4}))
    except ValueError as e:
        raise BadInputError(f"the adapter's training record has an invalid nf4 table: {e}", **unreadable) from None
    stored = {ST_DTYPES[d] for d, _ in base.tensors.values() if d in ST_DTYPES}
    if _weights_seen(theirs, stored) != _weights_seen(ours, stored):
        differ = [(f, json.dumps(getattr(theirs, f)), json.dumps(getattr(ours, f))) for f in fields
                  if getattr(theirs, f) != getattr(ours, f)]
        raise BadInputError(
            "the adapter was trained on a base quantized otherwise: "
            + ", ".join(f"{f} = {trained} (config: {configured})" for f, trained, configured in differ)
            + "; the merge would start from another W_nf4 than the one the adapter learned against", path=cfg.source,
            fix="set " + ", ".join(f"[base.nf4] {f} = {trained}" for f, trained, _ in differ) + f" as {path} records")
    trained = record.get("base")
    trained_on = trained.get("sha256") if isinstance(trained, dict) else None
    if origin["kind"] == "gguf" and isinstance(trained_on, str) and trained_on.lower() != origin["gguf_sha256"]:
        raise BadInputError(f"the adapter was trained on the GGUF with sha256 {trained_on}, but base.path hashes to "
                            f"{origin['gguf_sha256']}", path=cfg.source,
                            fix=f"point base.path at the GGUF that {path} records")


def _check_training_text(cfg: Config, path: Path, trained: object) -> None:
    """No text the gate scores, nor the selection text, holds a document the adapter was trained on (the record's
    `train_text.document_sha256`, as `document_digests` hashes documents): a gate measured on training text flatters
    the model it is meant to judge."""
    from qmerge.io.textset import document_digests, load_text_spec, shared_documents

    digests = trained.get("document_sha256") if isinstance(trained, dict) else None
    if not isinstance(digests, list):
        return
    seen = {d: i for i, d in enumerate(digests) if isinstance(d, str)}
    texts = list(cfg.eval_texts()) + ([(cfg.merge.select, "merge.select")] if cfg.merge.into == "auto" else [])
    for value, what in texts:
        spec = load_text_spec(cfg.path(value, what))
        shared = shared_documents(document_digests(spec), seen)
        if shared:
            (i, _), n = shared[0], len(shared)
            raise BadInputError(f"{what} ({spec.spec_path}) holds {n} of the documents the adapter was trained on "
                                f"({trained.get('spec', 'its training text')}, as {path} records), e.g. document {i} "
                                f"of {spec.source_path.name}", path=cfg.source,
                                fix=f"score {what} on documents the adapter was not trained on: measuring on training "
                                    "text flatters the model")


ST_DTYPES = {ST_DTYPE_NAMES[dtype]: name for name, dtype in DTYPES.items()}  # "BF16" -> "bfloat16", ...


def _weights_seen(nf4: NF4Settings, stored: set[str]) -> tuple:
    """What fixes W_nf4 and the other weights the trained model saw, per stored float dtype: the NF4 layout, the
    roundings of the stored value before quantization, and those of the dequantized product. A float32 step
    changes no value here (every input is float32 or narrower) and is left out, as is a repeated rounding."""
    recipe = _recipe(nf4)

    def roundings(chain) -> tuple:
        out = []
        for d in chain:
            if d != "float32" and (not out or out[-1] != d):
                out.append(d)
        return tuple(out)

    per_dtype = []
    for s in sorted(stored):
        load = recipe.load_dtype or s
        product = [recipe.dequant_dtype] if recipe.dequant_dtype else [load, recipe.compute_dtype]
        per_dtype.append((s, roundings([s, load]), roundings(product)))
    return nf4.quant_type, recipe.blocksize, recipe.double_quant, tuple(per_dtype)


def _check_texts(cfg: Config, tokenizer_folder: Path | None, hf_config: dict) -> None:
    """The texts evaluate and calibrate will cut into windows, checked as they will check them, before the merge:
    the specs load, the calibration and the selection share no documents with an eval text, no window is longer
    than the model's context, and (given a tokenizer) each text gives its windows (each of these was found only
    after the merge)."""
    from qmerge.io.textset import build_windows, check_disjoint, load_text_spec
    from qmerge.stages.evaluate import load_tokenizer

    texts, q, select = cfg.eval_texts(), cfg.quantize, cfg.merge.select if cfg.merge.into == "auto" else None
    if not texts and q is None and select is None:
        return
    context = hf_config.get("max_position_embeddings") or hf_config.get("n_positions")
    lengths = []  # (what, its length, the fix)
    if texts:
        lengths.append(("gate.seq_len", cfg.gate.seq_len, f"set gate.seq_len to {context} or less"))
    if q is not None:
        lengths.append(("quantize.seq_len", q.seq_len, f"set quantize.seq_len to {context} or less"))
    if select is not None and cfg.gate is None:
        lengths.append(("the selection windows' length (gate.seq_len; without [gate])", cfg.select_window_shape[0],
                        f"add a [gate] with seq_len = {context} or less (it sets the selection windows' length), or "
                        'set merge.into = "nf4"'))
    for what, seq_len, fix in lengths:
        if isinstance(context, int) and seq_len > context:
            raise BadInputError(f"{what} = {seq_len} is longer than the model's context ({context} positions)",
                                path=cfg.source, fix=fix)
    specs = [(load_text_spec(cfg.path(spec, what)), what) for spec, what in texts]
    calibration = load_text_spec(cfg.path(q.calibration, "quantize.calibration")) if q is not None else None
    chosen_on = load_text_spec(cfg.path(select, "merge.select")) if select is not None else None
    for spec, what in specs:
        if calibration is not None:
            check_disjoint(calibration, spec, "quantize.calibration", what)
        if chosen_on is not None:  # merge.into = "auto" chooses on it only after both merges
            check_disjoint(chosen_on, spec, "merge.select", what)
    if tokenizer_folder is None:
        return
    tokenizer = load_tokenizer(tokenizer_folder)
    for spec, _ in specs:
        build_windows(tokenizer, spec, cfg.gate.seq_len, cfg.gate.windows)
    if calibration is not None:
        build_windows(tokenizer, calibration, q.seq_len, q.samples)
    if chosen_on is not None:
        build_windows(tokenizer, chosen_on, cfg.select_window_shape[0], cfg.merge.select_windows)


def _check_complete(base: BaseCheckpoint, folder: Path) -> None:
    """Every parameter of the architecture is in the checkpoint (tied copies aside): a tensor a shard index leaves
    out, or a shard that lacks it, would otherwise be merged as absent and the release would load it freshly
    initialised."""
    missing = [n for n in base.arch.parameters if n not in base.tensors]
    if missing and len(missing) < len(base.arch.parameters):  # none at all: names of another scheme, refused later
        raise BadInputError(f"the checkpoint lacks {len(missing)} of the {len(base.arch.parameters)} parameters its "
                            f"config.json describes: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}",
                            path=folder, fix="re-download the model (an incomplete shard or index)")


def _hashed_base(folder: Path, recipe: NF4Recipe, skip, progress: bool,
                 stamps: dict[str, list[int]]) -> tuple[BaseCheckpoint, list[dict], str]:
    # The base files are hashed on a thread while this one imports transformers and bitsandbytes and builds the
    # meta model (hashing releases the GIL): on a 7B-shaped slice that hides the ~1.5 s of hashing. A failure
    # here stops the hash at its next chunk instead of waiting for it.
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmerge-sha256") as pool:
        digest = pool.submit(files_digest, _base_files(folder), progress, stop, stamps)
        try:
            base = BaseCheckpoint(folder, recipe, skip)
        except BaseException:
            stop.set()
            raise
        entries, combined = digest.result()
    return base, entries, combined


def _check_combination(cfg: Config, adapters: list[dict]) -> None:
    dora = [a["path"] for a in adapters if a["dora"]]
    if dora and (len(adapters) > 1 or adapters[0]["weight"] != 1.0):
        raise UnsupportedAdapterError(f"DoRA is not additive: adapter {dora[0]} (DoRA) cannot be combined with "
                                      "other adapters or a weight other than 1.0", path=cfg.source)
    if dora and cfg.merge.method != "linear":
        raise UnsupportedAdapterError(f'adapter {dora[0]} is DoRA: merge.method = "{cfg.merge.method}" would prune '
                                      "its ΔW under a magnitude trained against the whole ΔW (no exact meaning)",
                                      path=cfg.source, fix='use merge.method = "linear"')
    seen: dict[str, str] = {}
    for a in adapters:
        for t in a["replaced_tensors"]:
            if t in seen:
                raise UnsupportedAdapterError(f"adapters {seen[t]} and {a['path']} both replace {t}; no exact "
                                              "merge exists", path=cfg.source)
            seen[t] = a["path"]
        if a["replaced_tensors"] and len(adapters) > 1 and cfg.merge.method != "linear":
            raise UnsupportedAdapterError(
                f"adapter {a['path']} saves whole tensors ({', '.join(a['replaced_tensors'][:3])}); merge.method = "
                f'"{cfg.merge.method}" combines deltas only', path=cfg.source,
                fix='use merge.method = "linear", or retrain without modules_to_save')


def _check_replacements(cfg: Config, parsed: list[tuple[Path, float, Adapter]]) -> None:
    """A tensor an adapter saves whole (modules_to_save, bias = "all"/"lora_only", a saved embedding) replaces the
    base tensor: it has no weighted form, and another adapter's delta on the same module has no exact meaning."""
    for path, weight, adapter in parsed:
        if not adapter.replacements:
            continue
        if weight != 1.0:
            raise UnsupportedAdapterError(
                f"adapter {path} has weight {weight} but saves {', '.join(sorted(adapter.replacements)[:3])} whole "
                "(modules_to_save, bias, or a saved embedding): a replaced tensor cannot be weighted", path=cfg.source,
                fix="give this adapter weight 1.0, or retrain it without modules_to_save / bias")
        for other_path, _, other in parsed:
            clash = sorted(t for t in adapter.replacements if t.rpartition(".")[0] in other.modules)
            if other is not adapter and clash:
                raise UnsupportedAdapterError(
                    f"adapter {path} replaces {clash[0]} whole and adapter {other_path} adds a LoRA delta to the same "
                    "module: no exact merge exists", path=cfg.source, fix="merge them separately")


def match_adapter(adapter: Adapter, base: BaseCheckpoint) -> dict:
    """Every LoRA module and replacement must map onto a base tensor of a compatible shape."""
    tensors = base.tensors
    for mod in adapter.modules.values():
        _match_module(mod, adapter, base)
    for target, stored in adapter.replacements.items():
        if not _saved_whole_by_peft(target, stored, adapter, base):
            raise BadInputError(f"adapter holds {stored} whole, which nothing in its adapter_config.json explains "
                                "(modules_to_save, bias = \"all\"/\"lora_only\", a saved embedding): PEFT would not "
                                "load it, and qmerge will not guess", path=adapter.weights_file,
                                fix="remove the tensor, or save the adapter with PEFT's save_pretrained")
        if target not in tensors and target not in base.arch.tied:
            raise BadInputError(f"adapter replaces {target}, which the base does not have", path=adapter.weights_file,
                                fix="this adapter was trained on another base model")
    quantized = sum(1 for m in adapter.modules if m in base.arch.quantized)
    return {"lora_modules": len(adapter.modules), "on_quantized_linears": quantized}


def _saved_whole_by_peft(target: str, stored: str, adapter: Adapter, base: BaseCheckpoint) -> bool:
    """Whether PEFT saves base tensor `target` whole in an adapter of this config (as `stored`): a module of
    `modules_to_save` (PEFT matches names by suffix), a bias under bias = "all"/"lora_only", or an input or output
    embedding (`save_embedding_layers`, also a LoRA embedding's own base_layer). Anything else in the file is a
    tensor PEFT's loader ignores, which qmerge would otherwise have merged as a replacement."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    module, _, param = target.rpartition(".")
    config = adapter.config
    if any(module.endswith(m) for m in config.get("modules_to_save") or []):
        return True
    if param == "bias" and config.get("bias") in ("all", "lora_only"):
        return True
    return (".base_layer." in stored or base.arch.layouts.get(module) == "embedding"
            or module.rpartition(".")[2] in EMBEDDING_LAYER_NAMES or target in base.arch.tied)


def _match_module(mod: LoraModule, adapter: Adapter, base: BaseCheckpoint) -> None:
    name = f"{mod.module}.weight"
    if name not in base.tensors and name in base.arch.tied:  # a tied lm_head: stored as its source
        name = base.arch.tied[name]
    if name not in base.tensors:
        raise BadInputError(f"adapter targets {mod.module}, which is not in the base", path=adapter.weights_file,
                            fix="this adapter was trained on another base model")
    shape = base.tensors[name][1]
    if f"{mod.module}.weight" in adapter.replacements:  # the adapter saved its own base (e.g. a resized vocab)
        shape = adapter.shapes[adapter.replacements[f"{mod.module}.weight"]]
    layout = base.arch.layouts.get(mod.module, "linear")
    a, b = adapter.shapes[mod.lora_a], adapter.shapes[mod.lora_b]
    want = {"linear": (b[0], a[1]), "conv1d": (a[1], b[0]), "embedding": (a[1], b[0])}[layout]
    if tuple(shape) != want:
        raise BadInputError(f"adapter shape mismatch at {mod.module}: base weight is {list(shape)} ({layout}), "
                            f"lora_A {list(a)} and lora_B {list(b)} give {list(want)}", path=adapter.weights_file,
                            fix="this adapter was trained on another base model")
    if mod.magnitude and layout == "conv1d":
        raise UnsupportedAdapterError(f"DoRA on the Conv1D layer {mod.module} is not supported (its magnitude is per "
                                      "output row of the transposed weight)", path=adapter.weights_file)
    if mod.lora_b_bias and f"{mod.module}.bias" not in base.tensors:
        raise UnsupportedAdapterError(f"lora_bias on {mod.module}, which has no bias (PEFT cannot merge this either)",
                                      path=adapter.weights_file)


def _estimate(cfg: Config, base: BaseCheckpoint) -> dict:
    from qmerge.estimate import model_shape, stage_estimates

    out_item = {"float32": 4, "float16": 2, "bfloat16": 2}[cfg.merge.dtype]
    shape = model_shape(base.hf_config, base.tensors, set(base.arch.quantized), out_item)
    releases = cfg.output_path(cfg.output.dir)
    work = cfg.output_path(cfg.work_dir)
    stages = stage_estimates(cfg, shape, _same_filesystem(work, releases))
    return {"output_bytes": shape.output_bytes, "largest_tensor_elements": shape.largest_elements,
            "peak_bytes": max(s["peak_bytes"] for s in stages.values()), "stages": stages}


def _same_filesystem(a: Path, b: Path) -> bool:
    """Whether two (maybe not yet created) folders land on one filesystem: their nearest existing ancestors'."""
    def device(p: Path) -> int:
        p = p.resolve()
        while not p.exists():
            p = p.parent
        return p.stat().st_dev
    return device(a) == device(b)
