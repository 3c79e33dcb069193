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
from qmerge.dag import StageContext, package_versions
from qmerge.errors import BadInputError
from qmerge.io.atomic import atomic_dir, file_lock, swap_symlink, write_json
from qmerge.io.safetensors_io import TEST_THROTTLE

log = logging.getLogger("qmerge")
SKIP = {"done.json", "merge_report.json", "quantize_report.json"}
FREE_MARGIN = 64 * 2**20


def release_key(ctx: StageContext) -> str:
    """What the release holds: the gated candidate, and whether the dense checkpoint ships beside it."""
    return hashlib.sha256(f"{ctx.keys['gate']}:{ctx.cfg.output.keep_dense}".encode()).hexdigest()[:12]


def release_version(ctx: StageContext, key: str) -> str:
    template = ctx.release_version or ctx.cfg.output.version
    try:
        version = template.format(date=dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d"), key=key[:8],
                                  name=ctx.cfg.name)
    except (KeyError, ValueError, IndexError) as e:
        raise BadInputError(f"release version {template!r}: bad placeholder ({type(e).__name__}: {e}); "
                            "the placeholders are {date}, {key} and {name}", path=ctx.cfg.source) from None
    if not version or "/" in version or version.startswith(".") or version == "latest":
        raise BadInputError(f"release version {version!r} is not a plain folder name", path=ctx.cfg.source)
    return version


def _sha256(path: Path) -> str:
    from qmerge.io.paths import sha256_file

    return sha256_file(path)


def final_artifact(ctx: StageContext) -> Path:
    return ctx.inputs["quantize"] if "quantize" in ctx.inputs else ctx.inputs["merge"]


def _model_files(src: Path) -> list[Path]:
    return [f for f in sorted(src.iterdir()) if f.is_file() and f.name not in SKIP]


def _place(src: Path, dst: Path) -> bool:
    """Hardlinks `src` to `dst` when both are on one filesystem (True), else copies it (False).

    Safe because a finished stage artifact is immutable: qmerge never writes into a file after its stage
    published it (a rerun with --force builds a new directory and renames it over the old one, which leaves the
    linked inodes alone). The release's bytes are therefore exactly what the gate scored, without a second copy."""
    if src.stat().st_dev == dst.parent.stat().st_dev:
        try:
            os.link(src, dst)
            return True
        except OSError:  # a filesystem without hardlinks, or a link limit: copy instead
            pass
    shutil.copyfile(src, dst)
    return False


def _copy_model(src: Path, dst: Path, placed: dict[str, int]) -> dict[str, str]:
    hashes = {}
    for f in _model_files(src):
        linked = _place(f, dst / f.name)
        os.chmod(dst / f.name, (dst / f.name).stat().st_mode & ~0o222)  # a release is immutable; so is its source
        placed["linked" if linked else "copied"] += f.stat().st_size
        hashes[f.name] = _sha256(dst / f.name)
        if TEST_THROTTLE:
            time.sleep(TEST_THROTTLE)
    return hashes


def check_free_space(sources: list[Path], root: Path) -> int:
    """Bytes the release needs on `root`'s filesystem (0 for files that will be hardlinked); exit 2 when the
    filesystem has less free space than that plus a margin for the manifest and model card."""
    same_fs = root.stat().st_dev
    need = sum(f.stat().st_size for src in sources for f in _model_files(src) if f.stat().st_dev != same_fs)
    free = shutil.disk_usage(root).free
    if need + FREE_MARGIN > free:
        raise BadInputError(f"the release needs {need / 2**30:.2f} GiB (+ {FREE_MARGIN / 2**20:.0f} MiB margin) on "
                            f"{root}, which has {free / 2**30:.2f} GiB free", path=root,
                            fix="free space there, or put output.dir on the filesystem of work_dir (files are then "
                                "hardlinked, not copied)")
    return need


def build_manifest(ctx: StageContext, key: str, version: str, files: dict[str, str]) -> dict:
    report = json.loads((ctx.inputs["gate"] / "report.json").read_text())
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
            "config_sha256": hashlib.sha256(ctx.cfg.source.read_bytes()).hexdigest(),
            "stage_keys": ctx.keys, "packages": package_versions(),
        },
        "metrics": report.get("eval"), "extra_eval": report.get("extra_eval", []), "tasks": report.get("tasks", {}),
        "combination": report.get("combination"),
        "weight_retention": report.get("weight_retention", {}), "gate": report["gate"], "files": files,
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


def model_card(manifest: dict) -> str:
    final = manifest["final"]
    combination = manifest.get("combination")
    how = f" (merge.method = {combination['method']}, density {combination['density']})" if combination else ""
    lines = [f"# {manifest['name']} {manifest['version']}", "",
             f"Built by qmerge {manifest['qmerge_version']}: the adapter(s) merged in float32 into the "
             f"`{manifest['into']}` base weights{how}; final artifact: {final}.", "",
             f"Gate: **{manifest['gate']['verdict']}**.", ""]
    if manifest.get("metrics"):
        lines += _card_section("Perplexity on", manifest["metrics"], final)
    for task, section in manifest.get("tasks", {}).items():
        lines += _card_section(f"Task `{task}` (reference: the NF4 base + this adapter alone), on", section, final)
    return "\n".join(lines + ["Provenance (hashes of every input, package versions) is in `manifest.json`.", ""])


def run_promote(ctx: StageContext) -> dict:
    key = release_key(ctx)
    root = ctx.cfg.output_path(ctx.cfg.output.dir) / ctx.cfg.name
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        latest = root / "latest"
        if (latest / "manifest.json").is_file():
            current = json.loads((latest / "manifest.json").read_text())
            if current.get("key") == key:
                log.info("release %s already holds key %s: nothing new to promote", current["version"], key)
                return {"release": str(latest.resolve()), "status": "unchanged", "key": key}
        version = release_version(ctx, key)
        target = root / version
        if target.exists():
            raise BadInputError(f"release {target} already exists and is never overwritten",
                                fix="pass --release-version with a new version")
        dense = ctx.cfg.output.keep_dense and "quantize" in ctx.inputs
        check_free_space([final_artifact(ctx), *([ctx.inputs["merge"]] if dense else [])], root)
        placed = {"linked": 0, "copied": 0}
        with atomic_dir(target) as tmp:
            files = _copy_model(final_artifact(ctx), tmp, placed)
            if dense:
                (tmp / "dense").mkdir()
                files.update({f"dense/{k}": v for k, v in _copy_model(ctx.inputs["merge"], tmp / "dense", placed).items()})
            manifest = build_manifest(ctx, key, version, files)
            (tmp / "README.md").write_text(model_card(manifest))
            write_json(tmp / "manifest.json", manifest)
        swap_symlink(latest, version)
    log.info("promoted %s", target)
    return {"release": str(target), "status": "promoted", "key": key, "version": version,
            "bytes_linked": placed["linked"], "bytes_copied": placed["copied"]}
