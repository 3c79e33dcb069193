"""`qmerge matrix releases.toml`: a nightly release matrix. Bases × adapters × targets expand into builds, each an
ordinary pipeline config; every build shares one work dir, so a stage with equal inputs (one merge feeding every
quantized target of an adapter) is built once, whichever build gets there first, and a rerun with nothing changed
rebuilds nothing. Every build is first resolved in this process (its memory estimate; torch and transformers
imported once, each input file hashed once for all builds); a build with nothing to do (every cached stage
finished, its release and registry record unchanged) is answered from its stored results there, exactly as its
pipeline process would answer. The others run as parallel `qmerge pipeline` processes within a CPU and a memory
budget (the estimates); a failed build does not stop the others. One summary table, `matrix_report.json`, and one
exit code: 2 if any build had bad input, else 1 if any hit an internal error, else 3 if any was rejected (or
inconclusive), else 0.

The matrix file (paths relative to it; keys other than `name` / `bases` are the pipeline config's own):

    work_dir = "runs/nightly"
    [defaults]                    # any pipeline sections every build shares: [defaults.gate], [defaults.output]
    [[bases]]    name = "..."  + the keys of [base] (path, sha256, nf4 = {...})
    [[adapters]] name = "..."  + the keys of one [[adapters]] entry; bases = ["..."] limits it (default: all)
    [[targets]]  name = "..."  + pipeline sections: merge = {...}, quantize = {...}, gate = {...}, output = {...}

Build `<adapter>-<target>` (`<base>-<adapter>-<target>` with several bases) publishes to `<output.dir>/<build>/`.
`--ray [ADDRESS]` runs the builds left to run as Ray tasks (qmerge/ray_scheduler.py); the table, report and exit code
are the same.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qmerge.errors import EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_INTERNAL, EXIT_OK, ConfigError, QmergeError

# Keys whose values are paths, by section: made absolute (against the matrix file) in each build's config.
PATH_KEYS = {"base": ("path",), "adapters": ("path", "eval"), "merge": ("select",), "quantize": ("calibration",),
             "gate": ("eval", "extra_eval"), "output": ("dir",)}
SECTIONS = ("merge", "quantize", "gate", "output")


@dataclass
class Build:
    name: str
    config: Path
    shares: str = ""  # base + adapter: builds with the same value share a merge
    estimate_bytes: int = 0
    exit_code: int | None = None
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)  # what `qmerge pipeline --summary-json` wrote
    error: str | None = None  # the last lines of its log, when it wrote no summary
    reused: bool = False  # answered in this process from its stored results (nothing to build): no pipeline process
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")


def _absolute(value, folder: Path):
    if isinstance(value, (list, tuple)):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, str) and not value.startswith("package:"):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (folder / p).resolve())
    return value


def absolute_paths(config: dict, folder: Path) -> dict:
    """Every path of a pipeline config dict made absolute against `folder` (in place; `package:` paths kept), so
    the config can be written anywhere."""
    if "work_dir" in config:
        config["work_dir"] = _absolute(config["work_dir"], folder)
    for section, keys in PATH_KEYS.items():
        entries = config.get(section)
        for entry in entries if isinstance(entries, list) else [entries] if entries else []:
            for k in keys:
                if k in entry:
                    entry[k] = _absolute(entry[k], folder)
    output = config.get("output")
    if isinstance(output, dict) and isinstance(output.get("registry_uri"), str):
        from qmerge.config import absolute_sqlite_uri

        output["registry_uri"] = absolute_sqlite_uri(output["registry_uri"], folder)
    return config


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _named(raw: dict, key: str, path: Path) -> list[dict]:
    items = raw.get(key)
    if not isinstance(items, list) or not items:
        raise ConfigError(f"needs at least one [[{key}]] entry", path=path)
    names = [i.get("name") for i in items]
    for n in names:
        if not isinstance(n, str) or not n or "/" in n or n.startswith("."):
            raise ConfigError(f"every [[{key}]] entry needs a plain `name` (got {n!r})", path=path)
    if len(set(names)) != len(names):
        raise ConfigError(f"[[{key}]] names must be unique (got {names})", path=path)
    return items


def expand(path: Path) -> tuple[Path, list[tuple[str, dict, str]]]:
    """(work dir, [(build name, pipeline config dict, base/adapter)]) of a matrix file; exit 2 naming what is
    wrong."""
    from qmerge.io.paths import read_toml

    path = Path(path).resolve()
    raw = read_toml(path, "matrix file")
    unknown = sorted(set(raw) - {"work_dir", "defaults", "bases", "adapters", "targets"})
    if unknown:
        raise ConfigError(f"unknown key `{unknown[0]}` (a matrix file has work_dir, [defaults], [[bases]], "
                          "[[adapters]], [[targets]])", path=path)
    if not isinstance(raw.get("work_dir"), str):
        raise ConfigError("missing required key `work_dir`", path=path)
    folder = path.parent
    work = Path(_absolute(raw["work_dir"], folder))
    defaults = raw.get("defaults", {})
    bases, adapters, targets = (_named(raw, k, path) for k in ("bases", "adapters", "targets"))
    base_names = {b["name"] for b in bases}
    builds = []
    for base in bases:
        for adapter in adapters:
            wanted = adapter.get("bases", sorted(base_names))
            if not set(wanted) <= base_names:
                raise ConfigError(f"adapter {adapter['name']!r} names unknown bases {sorted(set(wanted) - base_names)}",
                                  path=path)
            if base["name"] not in wanted:
                continue
            for target in targets:
                name = "-".join(([base["name"]] if len(bases) > 1 else []) + [adapter["name"], target["name"]])
                extra = sorted(set(target) - {"name", *SECTIONS})
                if extra:
                    raise ConfigError(f"target {target['name']!r}: unknown key `{extra[0]}` (a target sets "
                                      f"{', '.join(SECTIONS)})", path=path)
                config = _deep_merge(defaults, {k: v for k, v in target.items() if k != "name"})
                config |= {"name": name, "work_dir": str(work),
                           "base": {k: v for k, v in base.items() if k != "name"},
                           "adapters": [{k: v for k, v in adapter.items() if k not in ("name", "bases")}]}
                absolute_paths(config, folder)
                builds.append((name, config, f"{base['name']}/{adapter['name']}"))
    # a build's name is its config file, its release folder and its row: two that join to one name would share them
    seen: dict[str, str] = {}
    for name, _, shares in builds:
        if name in seen:
            raise ConfigError(f"builds {seen[name]} and {shares} are both named {name!r} (names join base, adapter "
                              "and target names with '-')", path=path, fix="rename an adapter or target so that "
                              "the joined names differ")
        seen[name] = shares
    return work, builds


def write_builds(path: Path) -> tuple[Path, list[Build]]:
    """Each build's config written to `<work_dir>/matrix/<build>.toml` and validated (exit 2 naming the build)."""
    from qmerge.config import load_config
    from qmerge.io.atomic import atomic_write_text
    from qmerge.io.paths import dump_toml

    work, expanded = expand(path)
    folder = work / "matrix"
    folder.mkdir(parents=True, exist_ok=True)
    builds = []
    for name, config, shares in expanded:
        file = folder / f"{name}.toml"
        atomic_write_text(file, f"# build {name} of {path} (written by qmerge matrix; edit the matrix file)\n"
                          + dump_toml(config))
        try:
            load_config(file)
        except ConfigError as e:
            raise ConfigError(f"build {name}: {e}", path=path) from None
        builds.append(Build(name, file, shares))
    return work, builds


def estimate(build: Build) -> int:
    """The build's largest stage peak from the dry-run plan (headers only)."""
    from qmerge.config import load_config
    from qmerge.stages.resolve import resolve

    return int(resolve(load_config(build.config), dry_run=True, progress=False).estimate["peak_bytes"])


def answer_unchanged(builds: list[Build], quiet: bool) -> None:
    """Sets each build's estimate from its plan, and answers each build that has nothing to do from its stored
    results, as its pipeline process would (the same summary JSON and log, the same row), without starting it:
    on a rerun with nothing changed, that process spends seconds importing torch and transformers and hashing
    inputs to find only finished stages. Reads only (a reuse-only run: qmerge/dag.py). A build whose inputs resolve
    refuses (a missing or broken adapter) is not started: it gets its exit code and message, and the others run; one
    that fails later is left to its own process, which says why."""
    from qmerge.config import load_config
    from qmerge.dag import Options, Runner
    from qmerge.io.atomic import atomic_write_text
    from qmerge.io.paths import memoized_hashes
    from qmerge.pipeline import STAGES
    from qmerge.report import print_summary, summary_json

    with memoized_hashes():
        for b in builds:
            start = time.perf_counter()
            runner = Runner(load_config(b.config), STAGES, Options(quiet=True, reuse_only=True))
            try:
                records, code = runner.run()
            except QmergeError as e:
                if not runner.records:  # refused before any stage answered: this build cannot run
                    b.exit_code, b.error = e.exit_code, str(e)
                    b.log.write_text(f"qmerge: {e}\n")
                    print(f"qmerge matrix: {b.name} not started: {e}", file=sys.stderr, flush=True)
                    continue
                records, code = runner.records, None
            b.estimate_bytes = int(next(r for r in records if r.name == "resolve").result["estimate"]["peak_bytes"])
            if code is None:
                continue
            text = summary_json(runner.cfg.source, records, code)
            atomic_write_text(b.config.with_suffix(".summary.json"), text)
            with open(b.log, "w") as log:
                print_summary(records, runner.work, code, out=log)
            b.summary, b.exit_code, b.reused = json.loads(text), code, True
            b.seconds = time.perf_counter() - start
            if not quiet:
                print(f"qmerge matrix: {b.name} has nothing to build: answered from its finished stages, exit {code}",
                      file=sys.stderr, flush=True)


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemFree", 0))


def order_for_sharing(builds: list[Build]) -> list[Build]:
    """Round robin over base/adapter pairs: builds running at the same time rarely need the same merge, and a
    later target of an adapter finds its merge finished."""
    groups: dict[str, list[Build]] = {}
    for b in builds:
        groups.setdefault(b.shares, []).append(b)
    out = []
    while any(groups.values()):
        for g in groups.values():
            if g:
                out.append(g.pop(0))
    return out


def run_builds(builds: list[Build], jobs: int, budget: int, quiet: bool) -> None:
    """Starts builds in order while fewer than `jobs` run and their estimates fit `budget` (a build larger than
    the budget runs alone); each child gets cores // jobs threads so they do not oversubscribe the CPU."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    waiting, running = list(builds), {}
    while waiting or running:
        for b in list(waiting):
            used = sum(r.estimate_bytes for r in running.values())
            if len(running) >= jobs or (running and used + b.estimate_bytes > budget):
                break
            waiting.remove(b)
            summary = b.config.with_suffix(".summary.json")
            summary.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "qmerge", "pipeline", str(b.config), "--quiet", "--summary-json", str(summary)]
            with open(b.log, "w") as log:
                running[b.name] = b
                b.seconds = time.perf_counter()
                b.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL)
            if not quiet:
                print(f"qmerge matrix: started {b.name} ({threads} threads)", file=sys.stderr, flush=True)
        for name, b in list(running.items()):
            rc = b.proc.poll()
            if rc is None:
                continue
            del running[name]
            b.exit_code, b.seconds = rc, time.perf_counter() - b.seconds
            summary = b.config.with_suffix(".summary.json")
            if summary.is_file():
                b.summary = json.loads(summary.read_text())
            if rc not in (EXIT_OK, EXIT_GATE_REJECTED) or not b.summary:
                b.error = " / ".join(b.log.read_text(errors="replace").strip().splitlines()[-3:])
            if not quiet:
                print(f"qmerge matrix: {b.name} finished, exit {rc} ({b.seconds:.0f} s)", file=sys.stderr, flush=True)
        time.sleep(0.2)


def aggregate_exit(codes: list[int]) -> int:
    """2 if any build had bad input, else 1 if any failed otherwise (an internal error, or a build killed: -9, 137,
    130), else 3 if any was rejected, else 0."""
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT
    if any(c not in (EXIT_OK, EXIT_GATE_REJECTED) for c in codes):
        return EXIT_INTERNAL
    return EXIT_GATE_REJECTED if EXIT_GATE_REJECTED in codes else EXIT_OK


def _row(b: Build) -> dict:
    stages = {s["name"]: s for s in b.summary.get("stages", [])}
    results = b.summary.get("results", {})
    gate, ev, promote = results.get("gate", {}), results.get("evaluate", {}), results.get("promote", {})
    verdict = gate.get("verdict") or ("error" if b.exit_code not in (EXIT_OK,) else "no gate")
    merge = stages.get("merge", {})
    final = gate.get("candidate") or ev.get("final", "")  # the artifact the release describes: the first that passed
    figures = ev.get("artifacts", {}).get(final, ev)
    return {"build": b.name, "exit_code": b.exit_code, "verdict": verdict, "seconds": round(b.seconds, 1),
            "merge": f"{merge.get('key', '?')} {merge.get('status', '')}".strip(),
            "ran": [n for n, s in stages.items() if s["status"] == "ran"],
            "artifact": final or None, "retention": figures.get("retention"), "kl_mean": figures.get("kl_mean"),
            "ppl": ev.get("ppl", {}).get(final),
            "release": promote.get("release"), "release_status": promote.get("status"),
            "registry": _registry(results.get("register")),
            "reasons": gate.get("reasons", []), "error": b.error, "config": str(b.config), "log": str(b.log)}


def _registry(result: dict | None) -> str | None:
    if not result:
        return None
    from qmerge.report import registry_line

    return registry_line(result)


def print_table(rows: list[dict], out=None) -> None:
    out = out or sys.stdout
    print("qmerge matrix", file=out)
    print(f"  {'build':<28} {'exit':>4}  {'verdict':<12} {'merge (key, status)':<26} {'retention':>9} "
          f"{'KL':>8}  release", file=out)
    for r in rows:
        ret = "" if r["retention"] is None else f"{r['retention']:.3f}"
        kl = "" if r["kl_mean"] is None else f"{r['kl_mean']:.4f}"
        release = r["release"] and f"{r['release']} ({r['release_status']})" or (r["error"] or "")[:90]
        print(f"  {r['build']:<28} {r['exit_code']:>4}  {r['verdict']:<12} {r['merge']:<26} {ret:>9} {kl:>8}  "
              f"{release}", file=out)
        if r.get("registry"):
            print(f"  {'':<28} registry: {r['registry']}", file=out)


def run_matrix_command(args) -> int:
    from qmerge.io.atomic import write_json_atomic

    path = Path(args.matrix)
    work, builds = write_builds(path)
    ray = getattr(args, "ray", None) is not None  # --ray, with or without an address
    address = None
    if ray and not args.dry_run:  # every check that can refuse the run happens before anything runs
        from qmerge.ray_scheduler import check_reachable, import_ray, resolve_address, run_builds_ray

        import_ray()
        address = resolve_address(args.ray or None)
        if address is not None:
            check_reachable(address)
    budget = int(args.memory_gib * 2**30) if args.memory_gib else int(0.9 * available_memory())
    if args.dry_run:
        from qmerge.io.paths import memoized_hashes

        with memoized_hashes():
            for b in builds:
                b.estimate_bytes = estimate(b)
        jobs = args.jobs or max(1, min(len(builds), (os.cpu_count() or 1)))
        print(f"qmerge matrix plan: {len(builds)} builds in {work}, up to {jobs} at once within "
              f"{budget / 2**30:.1f} GiB", file=sys.stdout)
        for b in order_for_sharing(builds):
            print(f"  {b.name:<28} peak ~{b.estimate_bytes / 2**30:.2f} GiB  {b.config}")
        return EXIT_OK
    started = time.perf_counter()
    answer_unchanged(builds, args.quiet)
    to_run = order_for_sharing([b for b in builds if b.exit_code is None])  # neither answered nor refused
    jobs = args.jobs or max(1, min(len(to_run), (os.cpu_count() or 1)))
    if ray:
        scheduler = f"ray {address or 'local'}"
        if to_run:
            run_builds_ray(to_run, address, args.jobs, budget, args.quiet)
    else:
        scheduler = "local"
        run_builds(to_run, jobs, budget, args.quiet)
    rows = [_row(b) for b in builds]
    code = aggregate_exit([b.exit_code for b in builds])
    print_table(rows)
    report = {"matrix": str(path.resolve()), "work_dir": str(work), "exit_code": code,
              "jobs": args.jobs if ray else jobs,
              "scheduler": scheduler, "memory_budget_bytes": budget,
              "seconds": round(time.perf_counter() - started, 1), "builds": rows,
              "estimates": {b.name: b.estimate_bytes for b in builds},
              "reused": [b.name for b in builds if b.reused]}
    write_json_atomic(work / "matrix" / "matrix_report.json", report)
    print(f"  exit code {code}; report {work / 'matrix' / 'matrix_report.json'}")
    return code

