"""Runs the pipeline for the CLI and prints what happened: the dry-run plan or the end-of-run summary."""

from __future__ import annotations

import sys
from pathlib import Path

from qmerge.config import load_config
from qmerge.errors import BadInputError
from qmerge.dag import Options, Runner, StageRecord


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_plan(records: list[StageRecord], out=None) -> None:
    out = out or sys.stdout
    plan = next(r.result for r in records if r.name == "resolve")
    base = plan["base"]
    print("qmerge plan (dry run: no weights loaded, nothing written)", file=out)
    print(f"  base: {base['folder']} ({base['kind']}, {base['model_type']}, {base['tensors']} tensors, "
          f"{'pre-quantized bnb-4bit' if base['prequantized'] else 'full precision'})", file=out)
    covers = "the GGUF file" if base.get("gguf_sha256") else f"combined over {len(base['files'])} files"
    print(f"        sha256 {base['sha256']}  (the base.sha256 pin: {covers})", file=out)
    if base["kind"] == "gguf" and not Path(base["folder"]).is_dir():
        print("        (GGUF not converted yet: planned from its header; the first real run converts it into that "
              "folder)", file=out)
    nf4 = plan["nf4"]
    print(f"  nf4:  blocksize {nf4['blocksize']}, double quant {nf4['double_quant']}, load {nf4['load_dtype'] or 'auto'}, "
          f"compute {nf4['compute_dtype']}, dequant {nf4['dequant_dtype'] or 'auto'}", file=out)
    print(f"  quantized linears: {len(plan['quantized_modules'])}; skipped: {', '.join(plan['skipped_modules'])}",
          file=out)
    for a in plan["adapters"]:
        m = a["matches"]
        print(f"  adapter {a['path']} (weight {a['weight']}): {m['lora_modules']} LoRA modules, "
              f"{m['on_quantized_linears']} on quantized linears, {len(a['replaced_tensors'])} replaced tensors"
              f"{', DoRA' if a['dora'] else ''}; all matched to base shapes", file=out)
        print(f"        sha256 {a['sha256']}  (the adapters.sha256 pin: combined over {len(a['files'])} files)", file=out)
    est = plan["estimate"]
    print(f"  estimate: output {_gib(est['output_bytes'])}, peak memory ~{_gib(est['peak_bytes'])} "
          f"(largest tensor {est['largest_tensor_elements']:,} elements)", file=out)
    print("  stages:                          peak memory (anon)  disk written", file=out)
    for r in records:
        s = est["stages"].get(r.name)
        figures = f"  ~{_gib(s['peak_bytes']):>12}  ~{_gib(s['disk_bytes']):>10}" if s else ""
        print(f"    {r.name:<10} {r.key}  {r.status:<7}{figures}", file=out)


def registry_line(result: dict) -> str:
    """One line for the register stage's result: version and alias, the recorded reject, or the failure."""
    if result.get("status") == "failed":
        return result["error"]
    if result.get("version"):
        return (f"{result['registered_model']} version {result['version']} @{result['alias']} "
                f"({result['status']}) in {result['registry']}")
    return f"{result['registered_model']}: {result['verdict']} recorded as run {result['run_id']} ({result['status']})"


def print_summary(records: list[StageRecord], work: Path, exit_code: int, out=None) -> None:
    out = out or sys.stdout
    print("qmerge summary", file=out)
    for r in records:
        print(f"  {r.name:<10} {r.key}  {r.status:<7} {r.seconds:7.1f} s  {work / r.name / r.key}", file=out)
    for r in records:
        if r.name == "evaluate" and r.result.get("ppl"):
            res = r.result
            ppl = ", ".join(f"{k} {v:.3f}" for k, v in res["ppl"].items())
            ret = "undefined" if res.get("retention") is None else f"{res['retention']:.3f}"
            print(f"  perplexity: {ppl}", file=out)
            print(f"  {res['final']}: delta retention {ret}, mean KL vs reference {res['kl_mean']:.5f} nats/token",
                  file=out)
        if r.name == "evaluate":
            for task, t in r.result.get("tasks", {}).items():
                ret = "undefined" if t.get("retention") is None else f"{t['retention']:.3f}"
                print(f"  task {task}: {r.result['final']} ppl {t['ppl']:.3f}, delta retention {ret}, mean KL vs "
                      f"its reference {t['kl_mean']:.5f} nats/token", file=out)
        if r.name == "gate" and "verdict" in r.result:
            print(f"  verdict: {r.result['verdict']}", file=out)
            artifacts = r.result.get("artifacts", {})
            for name, a in artifacts.items() if len(artifacts) > 1 else ():
                size = f"{a['bytes'] / 2**20:,.1f} MiB" if a.get("bytes") is not None else "size unknown"
                print(f"    {name:<20} {a['verdict']:<12} {size}", file=out)
            for reason in r.result.get("reasons", []):
                print(f"    - {reason}", file=out)
        if r.name == "promote" and r.result.get("release"):
            print(f"  release: {r.result['release']} ({r.result.get('status', '')})", file=out)
        if r.name == "register" and r.result:
            print(f"  registry: {registry_line(r.result)}", file=out)
    names = [r.name for r in records]
    if exit_code == 0 and "gate" not in names and any(r.name == "merge" and r.status in ("ran", "cached")
                                                      for r in records):
        built = next(r for r in reversed(records) if r.name in ("export", "quantize", "merge"))
        print(f"  no [gate]: nothing was evaluated or promoted; the {built.name} artifact is "
              f"{work / built.name / built.key}", file=out)
    print(f"  exit code {exit_code}", file=out)


def run_pipeline_command(args) -> int:
    from qmerge.pipeline import STAGES

    cfg = load_config(args.config)
    summary = getattr(args, "summary_json", None)
    if summary and not Path(summary).expanduser().resolve().parent.is_dir():  # found out only after the whole run
        raise BadInputError(f"--summary-json {summary}: its folder does not exist", fix="create the folder first")
    opts = Options(dry_run=args.dry_run, force=args.force, from_stage=args.from_stage, only=args.only,
                   quiet=args.quiet, release_version=args.release_version)
    runner = Runner(cfg, STAGES, opts)
    records, exit_code = runner.run()
    if opts.dry_run:
        print_plan(records)
    else:
        print_summary(records, runner.work, exit_code)
    if getattr(args, "summary_json", None):
        from qmerge.io.atomic import atomic_write_text

        atomic_write_text(args.summary_json, summary_json(cfg.source, records, exit_code, opts.dry_run))
    return exit_code


def summary_json(config: Path, records: list[StageRecord], exit_code: int, dry_run: bool = False) -> str:
    """What `--summary-json` writes (`qmerge matrix` reads it back for its table)."""
    import json

    return json.dumps({
        "config": str(config), "exit_code": exit_code, "dry_run": dry_run,
        "stages": [{"name": r.name, "key": r.key, "status": r.status, "seconds": round(r.seconds, 3)}
                   for r in records],
        "results": {r.name: r.result for r in records if r.name in ("evaluate", "gate", "promote", "register")}},
        indent=2, sort_keys=True, default=str) + "\n"
