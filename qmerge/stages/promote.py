"""promote: publish a gated candidate to `<output.dir>/<name>/<version>/`, atomically.

The release is assembled in a temp dir on the same filesystem, fsynced and renamed; `latest` is a
symlink swapped with os.replace. Model files are hardlinked from the finished stage artifact when the work dir
and the release dir share a filesystem (no second copy of a 13.5 GB checkpoint), copied otherwise, after a check
that the release filesystem has room for what must be copied. A per-name lock serialises concurrent promotions; an existing version
is never overwritten; a run whose key equals the key in `latest`'s manifest is a no-op that says so.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from qmerge import __version__
from qmerge.config import is_quantized
from qmerge.dag import StageContext
from qmerge.errors import BadInputError
from qmerge.io.atomic import atomic_dir, clean_stale_temps, file_lock, swap_symlink, write_json
from qmerge.io.safetensors_io import TEST_THROTTLE
from qmerge.io.compensation import FOLDER, compensation_folder
from qmerge.io.sources import artifact_bytes, artifact_files
from qmerge.pipeline import built_with

log = logging.getLogger("qmerge")
FREE_MARGIN = 64 * 2**20


def release_key(ctx: StageContext) -> str:
    """What the release holds: the gated candidate, and whether the dense checkpoint ships beside it."""
    return hashlib.sha256(f"{ctx.keys['gate']}:{ctx.cfg.output.keep_dense}".encode()).hexdigest()[:12]


def release_version(ctx: StageContext, key: str) -> str:
    return version_name(ctx.release_version or ctx.cfg.output.version, key, ctx.cfg)


def version_name(template: str, key: str, cfg) -> str:
    """The release folder's name from the version template (also checked before a pipeline runs anything)."""
    try:
        version = template.format(date=dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d"), key=key[:8],
                                  name=cfg.name)
    except (KeyError, ValueError, IndexError) as e:
        raise BadInputError(f"release version {template!r}: bad placeholder ({type(e).__name__}: {e}); "
                            "the placeholders are {date}, {key} and {name}", path=cfg.source) from None
    if not version or "/" in version or version.startswith(".") or version == "latest":
        raise BadInputError(f"release version {version!r} is not a plain folder name", path=cfg.source)
    return version


def _sha256(path: Path) -> str:
    from qmerge.io.paths import sha256_file

    return sha256_file(path)


def artifact_folder(ctx: StageContext, artifact: str) -> Path:
    """The finished stage folder holding `artifact` (the bytes evaluate read back and the gate decided on)."""
    if artifact == "merged":
        return ctx.inputs["merge"]
    if artifact == "quantized":
        return ctx.inputs["quantize"]
    return ctx.inputs["export"] / artifact


def shipped(ctx: StageContext) -> list[str]:
    """The artifacts this release holds: those the gate passed, in output.formats order."""
    gate = ctx.results["gate"]
    return list(gate.get("passed_artifacts", ctx.cfg.artifacts))


def _place(src: Path, dst: Path) -> bool:
    """Hardlinks `src` to `dst` when both are on one filesystem (True), else copies it (False).

    Safe because a finished stage artifact is immutable: qmerge never writes into a file after its stage
    published it (a rerun with --force builds a new directory and renames it over the old one, which leaves the
    linked inodes alone). The release's bytes are therefore exactly what the gate scored, without a second copy."""
    if dst.exists() or dst.is_symlink():  # never onto a name already placed: it may be another release's inode
        raise FileExistsError(f"{dst}: two artifacts of one release place the same file")
    if src.stat().st_dev == dst.parent.stat().st_dev:
        try:
            os.link(src, dst)
            return True
        except OSError:  # a filesystem without hardlinks, or a link limit: copy instead
            pass
    with open(src, "rb") as fin, open(dst, "xb") as fout:  # "x": a new file, never one that appeared meanwhile
        shutil.copyfileobj(fin, fout, 16 * 2**20)
    return False


def _copy_model(src: Path, dst: Path, placed: dict[str, int]) -> dict[str, str]:
    hashes = {}
    for f in artifact_files(src):
        name = f.relative_to(src).as_posix()  # the compensation adapter keeps its folder
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        linked = _place(f, dst / name)
        os.chmod(dst / name, (dst / name).stat().st_mode & ~0o222)  # a release is immutable; so is its source
        placed["linked" if linked else "copied"] += f.stat().st_size
        hashes[name] = _sha256(dst / name)
        if TEST_THROTTLE:
            time.sleep(TEST_THROTTLE)
    return hashes


def _subfolder(ctx: StageContext, artifact: str) -> str:
    """Where an artifact sits in the release: at the top when the config ships one format (the layout every
    single-format release has), else in a folder named after it."""
    return "" if len(ctx.cfg.artifacts) == 1 else artifact


def check_free_space(sources: list[Path], root: Path) -> int:
    """Bytes the release needs on `root`'s filesystem (0 for files that will be hardlinked); exit 2 when the
    filesystem has less free space than that plus a margin for the manifest and model card."""
    same_fs = root.stat().st_dev
    need = sum(f.stat().st_size for src in sources for f in artifact_files(src) if f.stat().st_dev != same_fs)
    free = shutil.disk_usage(root).free
    if need + FREE_MARGIN > free:
        raise BadInputError(f"the release needs {need / 2**30:.2f} GiB (+ {FREE_MARGIN / 2**20:.0f} MiB margin) on "
                            f"{root}, which has {free / 2**30:.2f} GiB free", path=root,
                            fix="free space there, or put output.dir on the filesystem of work_dir (files are then "
                                "hardlinked, not copied)")
    return need


def build_manifest(ctx: StageContext, key: str, version: str, files: dict[str, str]) -> dict:
    report = json.loads((ctx.inputs["gate"] / "report.json").read_text())
    exported = ctx.results.get("export", {}).get("artifacts", {})
    verdicts = report["gate"].get("artifacts", {report["final"]: {"verdict": report["gate"]["verdict"]}})
    ships = shipped(ctx)
    artifacts = {a: {"verdict": v["verdict"], "shipped": a in ships, "folder": _subfolder(ctx, a) or ".",
                     "bytes": artifact_bytes(artifact_folder(ctx, a)),
                     **({"write_seconds": exported[a]["seconds"]} if a in exported else {}),
                     **({"compensation": "/".join(filter(None, (_subfolder(ctx, a), FOLDER)))}
                        if compensation_folder(artifact_folder(ctx, a)) else {})}
                 for a, v in verdicts.items()}
    plan = ctx.plan
    return {
        "name": ctx.cfg.name, "version": version, "key": key, "qmerge_version": __version__,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "final": report["final"], "into": report["into"],
        "provenance": {
            "base": {k: getattr(plan.base, k) for k in ("folder", "kind", "sha256", "files")},
            "base_gguf": plan.base.gguf, "base_note": plan.base.note,
            "adapters": [{k: getattr(a, k) for k in ("path", "weight", "sha256", "files")} for a in plan.adapters],
            "eval_token_ids_sha256": report["eval"]["tokens"]["sha256"] if report.get("eval") else None,
            "task_token_ids_sha256": {t: sec["tokens"]["sha256"] for t, sec in report.get("tasks", {}).items()},
            "calibration_token_ids_sha256": ctx.results.get("calibrate", {}).get("sha256"),
            "config": ctx.cfg.model_dump(mode="json"),
            "config_sha256": ctx.cfg.source_sha256 or hashlib.sha256(ctx.cfg.source.read_bytes()).hexdigest(),
            "stage_keys": ctx.keys, "packages": built_with(ctx.cfg),
        },
        "metrics": report.get("eval"), "extra_eval": report.get("extra_eval", []), "tasks": report.get("tasks", {}),
        "combination": report.get("combination"),
        "weight_retention": report.get("weight_retention", {}), "gate": report["gate"], "artifacts": artifacts,
        "files": files,
    }


def _card_section(title: str, ev: dict, final: str) -> list[str]:
    """One eval text of the model card: every model's perplexity, then the final model's retention and KL."""
    rows = [f"| {name} | {e['value']:.3f} ± {e['stderr']:.3f} |" for name, e in ev["ppl"].items()]
    cand = ev["candidates"][final]
    ret = cand["retention"]
    ret_text = f"{ret['value']:.3f} ± {ret['stderr']:.3f}" if ret["defined"] else f"undefined ({ret['reason']})"
    return [f"{title} `{ev['tokens']['spec']}` ({ev['tokens']['windows']} windows × {ev['tokens']['seq_len']} "
            "tokens):", "", "| model | perplexity |", "|---|---|", *rows, "",
            f"Delta retention of the final model: {ret_text}; mean KL(reference ‖ final) "
            f"{cand['kl']['mean']['value']:.5f} nats/token, top-1 agreement {cand['kl']['top1_agreement']['value']:.4f}.",
            ""]


def _base_model(manifest: dict) -> str | None:
    """The base's Hub id when an adapter names one ("org/name"), else None: the Hub takes `base_model` for a
    repository id only (a file or folder name there is an invalid card), and the card's text names the base."""
    prov = manifest["provenance"]
    for adapter in prov["adapters"]:
        cfg_file = Path(adapter["path"]) / "adapter_config.json"
        name = json.loads(cfg_file.read_text()).get("base_model_name_or_path") if cfg_file.is_file() else None
        if isinstance(name, str) and name.count("/") == 1 and ":" not in name and not Path(name).exists():
            return name
    return None


def _base_name(manifest: dict) -> str:
    """The Hub id of the base where known, else its file or folder name."""
    prov = manifest["provenance"]
    return _base_model(manifest) or Path(prov["base_gguf"] or prov["base"]["folder"]).name


def front_matter(manifest: dict) -> list[str]:
    """The Hub's model-card metadata (YAML; JSON scalars are valid YAML): base model and relation, who quantized,
    and `model-index` with the gate's figures of every shipped artifact on every eval text."""
    shipped = [a for a, v in manifest.get("artifacts", {}).items() if v["shipped"]] or [manifest["final"]]
    relation = "quantized" if any(map(is_quantized, shipped)) else \
        "merge" if len(manifest["provenance"]["adapters"]) > 1 else "finetune"
    q = json.dumps
    base = _base_model(manifest)
    lines = ["---", f"base_model: {q(base)}" if base else None, f"base_model_relation: {relation}" if base else None,
             f"quantized_by: {q('qmerge ' + manifest['qmerge_version'])}" if relation == "quantized" else None,
             "library_name: transformers", "tags: [qmerge" + "".join(f", {q(a)}" for a in shipped) + "]",
             "model-index:", f"- name: {q(manifest['name'])}", "  results:"]
    sections = ([("eval", manifest["metrics"])] if manifest.get("metrics") else []) + \
        [(f"task {t}", sec) for t, sec in manifest.get("tasks", {}).items()]
    for label, sec in sections:
        lines += ["  - task: {type: text-generation}",
                  f"    dataset: {{name: {q(label + ': ' + sec['tokens']['spec'])}, type: {q(sec['tokens']['spec'])}}}",
                  "    metrics:"]
        for artifact in shipped:
            cand = sec["candidates"].get(artifact)
            if cand is None:
                continue
            figures = [("perplexity", sec["ppl"][artifact]["value"]),
                       ("kl_divergence", cand["kl"]["mean"]["value"])]
            if cand["retention"]["defined"]:
                figures.append(("delta_retention", cand["retention"]["value"]))
            lines += [f"    - {{type: {kind}, value: {value:.6g}, name: {q(f'{kind} ({artifact})')}}}"
                      for kind, value in figures]
    return [line for line in lines if line is not None] + ["---", ""]


def model_card(manifest: dict) -> str:
    final = manifest["final"]
    combination = manifest.get("combination")
    how = f" (merge.method = {combination['method']}, density {combination['density']})" if combination else ""
    lines = [*front_matter(manifest), f"# {manifest['name']} {manifest['version']}", "",
             f"Built by qmerge {manifest['qmerge_version']}: the adapter(s) merged in float32 into the "
             f"`{manifest['into']}` weights of the base `{_base_name(manifest)}`{how}; final artifact: {final}.", "",
             f"Gate: **{manifest['gate']['verdict']}**.", ""]
    artifacts = manifest.get("artifacts", {})
    if len(artifacts) > 1:
        lines += ["| artifact | folder | verdict | bytes |", "|---|---|---|---|",
                  *(f"| {a} | {v['folder'] if v['shipped'] else '(not shipped)'} | {v['verdict']} | {v['bytes']:,} |"
                    for a, v in artifacts.items()), ""]
    for a, v in artifacts.items():
        if v.get("compensation") and v["shipped"]:
            lines += [f"The {a} weights ship with a compensation adapter in `{v['compensation']}/`: a LoRA fitted to "
                      "what quantization removed. The gate scored the two together; serve them together "
                      f"(`PeftModel.from_pretrained(model, \"{v['compensation']}\")`, or the adapter as a LoRA in "
                      "vLLM).", ""]
    if manifest.get("metrics"):
        lines += _card_section("Perplexity on", manifest["metrics"], final)
    for task, section in manifest.get("tasks", {}).items():
        lines += _card_section(f"Task `{task}` (reference: the NF4 base + this adapter alone), on", section, final)
    return "\n".join(lines + ["Provenance (hashes of every input, package versions) is in `manifest.json`.", ""])


def unchanged_release(ctx: StageContext) -> dict | None:
    """Promote's result when `latest` already holds this release (nothing new to promote), else None. Reads only:
    a reuse-only run (the matrix's check) asks it without the lock. A version asked for by --release-version is
    published even then, under that name (a deploy step waits for it), unless `latest` is that version already."""
    key = release_key(ctx)
    latest = ctx.cfg.output_path(ctx.cfg.output.dir) / ctx.cfg.name / "latest"
    if not (latest / "manifest.json").is_file():
        return None
    current = json.loads((latest / "manifest.json").read_text())
    if current.get("key") != key:
        return None
    if ctx.release_version is not None and latest.resolve().name != release_version(ctx, key):
        return None
    return {"release": str(latest.resolve()), "status": "unchanged", "key": key, **_left_out(ctx)}


def release_lock(root: Path):
    """The lock of one release name's folder. It waits as long as another promotion of the name takes: flock is
    released when its holder dies, so a wait never outlives a crashed holder, and copying a large model across
    filesystems can take longer than any fixed timeout (which made the waiting run exit 1)."""
    def waiting(holder: str) -> None:
        log.info("release %s is being promoted by process %s; waiting for it", root.name, holder)

    return file_lock(root / ".lock", timeout=None, on_wait=waiting)


def run_promote(ctx: StageContext) -> dict:
    key = release_key(ctx)
    root = ctx.cfg.output_path(ctx.cfg.output.dir) / ctx.cfg.name
    root.mkdir(parents=True, exist_ok=True)
    with release_lock(root):
        clean_stale_temps(root)  # a killed promotion's half-written release (the lock says none is running)
        latest = root / "latest"
        unchanged = unchanged_release(ctx)
        if unchanged is not None:
            log.info("release %s already holds key %s: nothing new to promote", unchanged["release"], key)
            return unchanged
        version = release_version(ctx, key)
        target = root / version
        ships = shipped(ctx)
        if target.exists() and _published_key(target) == key:  # published by a run stopped before `latest` moved
            swap_symlink(latest, version)
            log.info("release %s was published with key %s; latest now points to it", target, key)
            return _promoted(ctx, target, key, ships, {"linked": 0, "copied": 0}) | {"resumed": True}
        if target.exists():
            raise BadInputError(f"release {target} already exists and is never overwritten",
                                fix="pass --release-version with a new version")
        dense = ctx.cfg.output.keep_dense and "quantize" in ctx.inputs and "merged" not in ctx.cfg.artifacts
        check_free_space([artifact_folder(ctx, a) for a in ships] + ([ctx.inputs["merge"]] if dense else []), root)
        placed = {"linked": 0, "copied": 0}
        with atomic_dir(target) as tmp:
            files = {}
            for artifact in ships:
                sub = _subfolder(ctx, artifact)
                (tmp / sub).mkdir(exist_ok=True)
                copied = _copy_model(artifact_folder(ctx, artifact), tmp / sub, placed)
                files.update({f"{sub}/{k}" if sub else k: v for k, v in copied.items()})
            if dense:
                (tmp / "dense").mkdir()
                files.update({f"dense/{k}": v for k, v in _copy_model(ctx.inputs["merge"], tmp / "dense", placed).items()})
            manifest = build_manifest(ctx, key, version, files)
            (tmp / "README.md").write_text(model_card(manifest))
            write_json(tmp / "manifest.json", manifest)
            for name in ("README.md", "manifest.json"):  # read-only like the model files: the release is immutable
                os.chmod(tmp / name, (tmp / name).stat().st_mode & ~0o222)
        swap_symlink(latest, version)
    log.info("promoted %s", target)
    return _promoted(ctx, target, key, ships, placed)


def _promoted(ctx: StageContext, target: Path, key: str, ships: list[str], placed: dict[str, int]) -> dict:
    """Promote's result for the release `target` now behind `latest`."""
    return {"release": str(target), "status": "promoted", "key": key, "version": target.name, "artifacts": ships,
            "bytes_linked": placed["linked"], "bytes_copied": placed["copied"], **_left_out(ctx)}


def _published_key(release: Path) -> str | None:
    """The release key in `release`'s manifest (None where it has none it can read)."""
    try:
        return json.loads((release / "manifest.json").read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _left_out(ctx: StageContext) -> dict:
    """A release that leaves a configured artifact out (the gate rejected it) still exits 3: the nightly job must
    see that a format it asked for did not ship."""
    from qmerge.errors import EXIT_GATE_REJECTED

    missing = [a for a in ctx.cfg.artifacts if a not in shipped(ctx)]
    return {"left_out": missing, "exit_code": EXIT_GATE_REJECTED} if missing else {}
