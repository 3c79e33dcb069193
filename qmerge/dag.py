"""The stage runner: order, artifact keys, cache/resume, --force/--from/--only, --dry-run, reuse-only checks.

Each stage's artifact lives in `<work_dir>/<stage>/<key>/`, where `key` hashes the stage's config
slice, its inputs' keys and the versions of the packages that shape the numbers. A stage is built in a
temp dir and renamed into place with `done.json` written last, so a crash never leaves a half artifact
under a key, and a rerun resumes after the last finished stage.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qmerge.config import Config
from qmerge.errors import EXIT_OK, BadInputError
from qmerge.io.atomic import atomic_dir, clean_stale_temps, file_lock, write_json

log = logging.getLogger("qmerge")
KEYED_PACKAGES = ("qmerge", "torch", "bitsandbytes", "transformers", "peft")


@dataclass
class StageContext:
    cfg: Config
    out: Path  # where the stage writes (a temp dir renamed to its key dir afterwards)
    inputs: dict[str, Path]  # upstream stage name -> its finished artifact dir
    results: dict[str, dict]  # upstream stage name -> its done.json "result"
    keys: dict[str, str]
    quiet: bool = False
    release_version: str | None = None
    dry_run: bool = False
    forced: bool = False  # rebuilt by --force / --from / --only: reuse nothing, not even the evaluate state cache

    @property
    def plan(self):
        """resolve's plan, typed (qmerge/plan.py)."""
        from qmerge.plan import Plan

        return Plan.from_json(self.results["resolve"])


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    config_slice: Callable[[Config], object]
    run: str | Callable[[StageContext], dict]  # "module:function", imported when the stage runs
    enabled: Callable[[Config], bool] = lambda cfg: True
    cached: bool = True  # False: runs every time (promote decides for itself what is new)
    # True: always runs (cheap), and its key hashes what it found (file contents), not only the config.
    keyed_by_result: bool = False
    # True: runs even after an earlier stage stopped the pipeline with a non-zero exit code (a rejected gate), to
    # record that outcome; its own non-zero exit code, if any, becomes the run's.
    after_stop: bool = False
    # A stage that is not cached: "module:function" giving, without changing anything, the result a run would
    # return when it has nothing new to do (promote: `latest` already holds this release), else None. A reuse-only
    # run calls it instead of `run`; an uncached stage without one always counts as work.
    unchanged: str | Callable[[StageContext], dict | None] | None = None

    def entry(self) -> Callable[[StageContext], dict]:
        return _function(self.run)


def _function(ref: str | Callable) -> Callable:
    if callable(ref):
        return ref
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


# Result fields of a keyed-by-result stage that describe the run rather than determine what later stages compute
# (the plan's memory estimates depend on every section of the config): left out of its key, so configs that
# differ only in later stages (a dense and a GPTQ target of one adapter) share the plan and everything after it.
DESCRIPTIVE = ("estimate", "input_stamps")


@dataclass
class Options:
    dry_run: bool = False
    force: bool = False
    from_stage: str | None = None
    only: str | None = None
    quiet: bool = False
    release_version: str | None = None
    # Build nothing and write nothing: answer from finished artifacts and the stages' `unchanged` checks, or stop
    # (exit code None) at the first stage that has work to do. `qmerge matrix` asks this before it starts a
    # pipeline process for a build.
    reuse_only: bool = False


@dataclass
class StageRecord:
    name: str
    key: str
    status: str  # "ran" | "cached" | "planned" | "skipped"
    seconds: float = 0.0
    result: dict = field(default_factory=dict)


def package_versions(packages: tuple[str, ...] = KEYED_PACKAGES) -> dict[str, str]:
    """Each package's version; qmerge's with its source digest appended (`0.1.0+src.<12 hex>`), since a change
    to its code changes bytes without a new version number, and an artifact built by other code must not be
    reused."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
        if pkg == "qmerge":
            out[pkg] += f"+src.{source_digest()[:12]}"
    return out


@functools.cache
def source_digest() -> str:
    """sha256 over qmerge's Python files (the native helper's C source among them), by path in the package."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: Stage, cfg: Config, upstream: dict[str, str], versions: dict[str, str]) -> str:
    payload = {"stage": stage.name, "config": stage.config_slice(cfg),
               "inputs": {n: upstream[n] for n in stage.needs if n in upstream}, "versions": versions}
    return digest(payload)[:16]


def _check_inputs_unchanged(results: dict[str, dict]) -> None:
    """Every input file an upstream stage hashed (its result's `input_stamps`) is as it was then: one rewritten or
    replaced since (a training job saving the adapter again) was read by this stage under the old file's hash, and
    what it built must not be published under that key."""
    from qmerge.io.paths import file_stamp

    for result in results.values():
        for path, stamp in (result.get("input_stamps") or {}).items():
            try:
                now = file_stamp(path)
            except OSError:
                now = None
            if now != stamp:
                raise BadInputError("changed while this run was using it (it was hashed at the start): what was "
                                    "built from it is discarded", path=Path(path),
                                    fix="rerun once whatever writes the file has finished")


def _load_done(path: Path) -> dict | None:
    done = path / "done.json"
    if not done.is_file():
        return None
    try:
        return json.loads(done.read_text())
    except json.JSONDecodeError:
        return None


class Runner:
    def __init__(self, cfg: Config, stages: list[Stage], opts: Options):
        self.cfg, self.stages, self.opts = cfg, stages, opts
        names = [s.name for s in stages]
        enabled = [s.name for s in stages if s.enabled(cfg)]
        for flag, value in (("--from", opts.from_stage), ("--only", opts.only)):
            if value is not None and value not in names:
                raise BadInputError(f"{flag} {value}: no such stage; stages are {', '.join(names)}")
            if value is not None and value not in enabled:  # else nothing would run, and exit 0 would say it did
                raise BadInputError(f"{flag} {value}: this config does not run stage {value} (it runs "
                                    f"{', '.join(enabled)})", path=cfg.source)
        self.work = cfg.output_path(cfg.work_dir)
        self.versions = package_versions()
        self.records: list[StageRecord] = []  # the last run's, so far

    def _forced(self, index: int, stage: Stage) -> bool:
        if self.opts.force or self.opts.only == stage.name:
            return True
        if self.opts.from_stage is not None:
            return index >= [s.name for s in self.stages].index(self.opts.from_stage)
        return False

    def run(self) -> tuple[list[StageRecord], int | None]:
        """The stage records and the exit code; with `reuse_only`, exit code None when a stage has work to do.
        `self.records` holds the stages done so far, also when a stage raises."""
        self._preflight()
        keys: dict[str, str] = {}
        dirs: dict[str, Path] = {}
        results: dict[str, dict] = {}
        records = self.records = []
        final = EXIT_OK  # the exit code of the stage that stopped the pipeline (then only after_stop stages run)
        for index, stage in enumerate(self.stages):
            if not stage.enabled(self.cfg) or (final != EXIT_OK and not stage.after_stop):
                continue
            if stage.keyed_by_result:
                record = self._run_keyed_by_result(stage)
                keys[stage.name], results[stage.name] = record.key, record.result
                dirs[stage.name] = self.work / stage.name / record.key
                records.append(record)
                if self.opts.reuse_only and _load_done(dirs[stage.name]) is None:
                    return records, None
                continue
            key = stage_key(stage, self.cfg, keys, self.versions)
            keys[stage.name] = key
            path = self.work / stage.name / key
            dirs[stage.name] = path
            done = _load_done(path)
            if self.opts.dry_run:
                records.append(StageRecord(stage.name, key, "cached" if done and stage.cached else "planned"))
                continue
            if self.opts.only and index > [s.name for s in self.stages].index(self.opts.only):
                break  # --only: nothing after the stage that was asked for
            if self.opts.only and stage.name != self.opts.only:
                if done is None:
                    raise BadInputError(f"--only {self.opts.only} needs stage `{stage.name}`, which has no finished "
                                        f"artifact under {path}", fix="run without --only first")
                results[stage.name] = done["result"]
                exit_code = done["result"].get("exit_code", EXIT_OK)
                if exit_code != EXIT_OK:  # e.g. --only promote after a rejected gate: nothing may follow it
                    final = exit_code
                continue
            if done is not None and stage.cached and not self._forced(index, stage):
                record = StageRecord(stage.name, key, "cached", 0.0, done["result"])
            elif self.opts.reuse_only:
                record = None if stage.cached else self._unchanged(stage, dirs, results, keys)
                if record is None:
                    return records, None
            else:
                record = self._run_or_reuse(stage, index, path, dirs, results, keys)
            records.append(record)
            results[stage.name] = record.result
            exit_code = results[stage.name].get("exit_code", EXIT_OK)
            if exit_code != EXIT_OK:
                final = exit_code
        return records, final

    def _preflight(self) -> None:
        """What can be checked from the config alone, before any stage runs (else a missing eval text or a bad
        release name surfaced hours later, after the merge and the quantization): every enabled stage's config
        slice (it reads and hashes the text specs it names), the folders qmerge writes into, the release's name."""
        for what, path in (("work_dir", self.work), ("output.dir", self.cfg.output_path(self.cfg.output.dir))):
            if path.exists() and not path.is_dir():
                raise BadInputError(f"{what} {path} is a file, not a folder", path=self.cfg.source,
                                    fix=f"point {what} at a folder (it is created if missing)")
        for stage in self.stages:
            if stage.enabled(self.cfg):
                stage.config_slice(self.cfg)
        if any(s.name == "promote" and s.enabled(self.cfg) for s in self.stages):
            from qmerge.stages.promote import version_name

            version_name(self.opts.release_version or self.cfg.output.version, "0" * 12, self.cfg)

    def lock_path(self, stage: str, key: str) -> Path:
        """The lock a stage key is built under, kept out of the stage folders (which hold only artifacts)."""
        return self.work / ".locks" / f"{stage}-{key}.lock"

    def _run_or_reuse(self, stage: Stage, index: int, path: Path, dirs, results, keys) -> StageRecord:
        """Builds `path` under its key's lock. Runs sharing a work dir take turns per key: a key another run
        finished while this one waited is reused, never rebuilt or replaced (replaced only when forced, by
        --force / --from / --only); different keys build in parallel."""
        forced = self._forced(index, stage)

        def waiting(holder: str) -> None:
            log.info("stage %s %s is being built by process %s; waiting for it", stage.name, path.name, holder)

        with file_lock(self.lock_path(stage.name, path.name), timeout=None, on_wait=waiting):
            done = _load_done(path)
            if done is not None and stage.cached and not forced:
                return StageRecord(stage.name, path.name, "cached", 0.0, done["result"])
            return self._run_stage(stage, path, dirs, results, keys, replace=path.exists(), forced=forced)

    def _unchanged(self, stage: Stage, dirs, results, keys) -> StageRecord | None:
        """A reuse-only run's record of an uncached stage: its `unchanged` result, or None (it has work to do)."""
        if stage.unchanged is None:
            return None
        start = time.perf_counter()
        inputs = {n: dirs[n] for n in stage.needs if n in dirs}
        ctx = StageContext(self.cfg, Path("/nonexistent"), inputs, dict(results), dict(keys), self.opts.quiet,
                           self.opts.release_version)
        result = _function(stage.unchanged)(ctx)
        return None if result is None else StageRecord(stage.name, keys[stage.name], "ran",
                                                       time.perf_counter() - start, result)

    def _run_keyed_by_result(self, stage: Stage) -> StageRecord:
        start = time.perf_counter()
        # A dry or reuse-only run takes what is there (a GGUF base not converted yet: its header) and writes nothing.
        reading = self.opts.dry_run or self.opts.reuse_only
        ctx = StageContext(self.cfg, Path("/nonexistent"), {}, {}, {}, self.opts.quiet, dry_run=reading)
        result = stage.entry()(ctx)
        keyed = {k: v for k, v in result.items() if k not in DESCRIPTIVE}
        key = digest({"stage": stage.name, "config": stage.config_slice(self.cfg), "result": keyed,
                      "versions": self.versions})[:16]
        path = self.work / stage.name / key
        seconds = time.perf_counter() - start
        if reading:
            return StageRecord(stage.name, key, "ran", seconds, result)
        if _load_done(path) is None:
            with file_lock(self.lock_path(stage.name, key), timeout=None):
                if _load_done(path) is None:  # equal keys mean equal results: whoever comes first publishes
                    with atomic_dir(path, replace=path.exists()) as tmp:
                        self._write_done(tmp, stage.name, key, seconds, result)
        return StageRecord(stage.name, key, "ran", seconds, result)

    def _write_done(self, out: Path, name: str, key: str, seconds: float, result: dict) -> None:
        done = {"stage": name, "key": key, "seconds": round(seconds, 3), "result": result, "versions": self.versions}
        # done.json last: its presence is what marks the artifact complete.
        write_json(out / "done.json", done)

    def _run_stage(self, stage: Stage, path: Path, dirs, results, keys, replace: bool = False,
                   forced: bool = False) -> StageRecord:
        start = time.perf_counter()
        inputs = {n: dirs[n] for n in stage.needs if n in dirs}
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent)
        log.info("stage %s -> %s", stage.name, path)
        with atomic_dir(path, replace=replace) as tmp:
            ctx = StageContext(self.cfg, tmp, inputs, dict(results), dict(keys), self.opts.quiet,
                               self.opts.release_version, forced=forced)
            result = stage.entry()(ctx)
            _check_inputs_unchanged(results)
            seconds = time.perf_counter() - start
            self._write_done(tmp, stage.name, keys[stage.name], seconds, result)
        return StageRecord(stage.name, keys[stage.name], "ran", seconds, result)
