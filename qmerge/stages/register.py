"""register: record the gate's outcome in the model registry (`[output] registry = "mlflow"`), after promote.

Runs after a passing promote and after a rejected or inconclusive gate alike (the stage runner lets it follow a
stop): a promoted release (pass or partial) becomes a model version whose source is the release folder, and the
alias moves to it; a reject is
recorded as a run with its reasons and never aliased (qmerge/registry.py says what is recorded and why).

A registry failure does not undo anything: the release stays published and `latest` stays swapped. The stage then
returns exit code 1 with the error and the release named, so an unattended job sees the failure; a rerun promotes
nothing new (unchanged) and registers what is missing.
"""

from __future__ import annotations

import logging

from qmerge.dag import StageContext
from qmerge.errors import EXIT_INTERNAL

log = logging.getLogger("qmerge")


def _outcome(ctx: StageContext):
    """The registry's record of this build (qmerge.registry.Outcome): verdict, reasons, figures, keys, release."""
    import json

    from qmerge.registry import Outcome, gate_metrics, outcome_tags

    gate, promote = ctx.results["gate"], ctx.results.get("promote", {})
    report = json.loads((ctx.inputs["gate"] / "report.json").read_text())
    reasons = tuple(gate.get("reasons", ()))
    keys = {k: v for k, v in ctx.keys.items() if k != "register"}
    tags = outcome_tags(ctx.cfg.name, gate["verdict"], reasons, keys, ctx.results["resolve"], report,
                        ctx.results.get("calibrate", {}).get("sha256"))
    return Outcome(ctx.cfg.name, gate["verdict"], reasons, gate_metrics(report), tags, ctx.keys["gate"],
                   promote.get("release"), promote.get("key"))


def run_register(ctx: StageContext) -> dict:
    from qmerge.registry import record

    cfg = ctx.cfg
    outcome = _outcome(ctx)
    uri, model = cfg.registry_uri, cfg.registered_model
    work = cfg.output_path(cfg.work_dir)
    try:
        return record(uri, model, cfg.output.alias, outcome, ctx.inputs["gate"] / "report.json", work)
    except Exception as e:  # the registry's failure, not the release's: it stays published
        kept = f"release {outcome.release} is published and kept" if outcome.release else "nothing was promoted"
        error = f"registering {model} ({outcome.verdict}) in {uri} failed: {type(e).__name__}: {e}"
        log.error("%s; %s; fix: make the registry reachable and rerun (nothing is rebuilt)", error, kept)
        return {"registry": uri, "registered_model": model, "verdict": outcome.verdict, "status": "failed",
                "error": f"{error}; {kept}", "release": outcome.release, "exit_code": EXIT_INTERNAL}


def registered(ctx: StageContext) -> dict | None:
    """Register's result when the registry holds this outcome already (nothing to record), else None. Reads
    only. A registry that cannot be read counts as work: the build's own run records it or reports the failure."""
    from qmerge.registry import recorded

    cfg = ctx.cfg
    try:
        return recorded(cfg.registry_uri, cfg.registered_model, cfg.output.alias, _outcome(ctx),
                        cfg.output_path(cfg.work_dir))
    except Exception as e:
        log.info("registry %s could not be read (%s: %s): the build's run will record it", cfg.registry_uri,
                 type(e).__name__, e)
        return None
