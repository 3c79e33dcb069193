"""Model registry records (`[output] registry = "mlflow"`): what the gate decided, in MLflow.

Every gated build is an MLflow run in the experiment `qmerge/<registered model>`: the gate's figures as metrics
(perplexities, ppl ratio, delta retention, KL, weight-space retention), the verdict, the reasons, every stage key
and every input sha256 as tags, and the gate's `report.json` as the run's one artifact (kilobytes). A promoted
release (a pass, or a partial one that ships the artifacts that passed) is also a version of the registered model
whose source is the release folder, with the same tags, linked to that run; the alias (default "champion") is moved
to it, as `latest` is. A rejected or inconclusive build is a run only: it never becomes a version, so nothing in the
registry can alias it. The weights are not copied into MLflow: the
release folder is already immutable and hashed in its manifest, and a second copy of a large checkpoint is not
cheap.

Idempotent: a run is found again by its gate key (tag `qmerge.gate_key`), a version by its release key and
source (tag `qmerge.release_key`), so a rerun with unchanged inputs records nothing new. Registrations to one
registry are serialised by a file lock (SQLite takes one writer at a time, and MLflow creates a new database's
tables on first use), so the builds of a matrix can register at once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qmerge.scores import EvalReport

log = logging.getLogger("qmerge")
PROMOTED = ("pass", "partial")  # verdicts whose release promote publishes (partial: the artifacts that passed)
TAG_LIMIT = 4000  # MLflow caps tag values (5000 characters for model versions); reasons are cut to fit


@dataclass(frozen=True)
class Outcome:
    """What a gated build is, as the registry records it."""

    name: str  # the config's name (the build)
    verdict: str  # pass | reject | inconclusive
    reasons: tuple[str, ...]
    metrics: dict[str, float]
    tags: dict[str, str]
    gate_key: str
    release: str | None = None  # the release folder, when promoted (or already promoted: unchanged)
    release_key: str | None = None


def gate_metrics(report: dict) -> dict[str, float]:
    """The gate report's figures as flat MLflow metrics (None and non-finite values left out)."""
    ev = EvalReport.from_json(report)
    out = {}
    # the gate's eval text unprefixed; each task's own text (a multi-adapter release) as task.<name>.<metric>
    sections = ([("", ev.eval)] if ev.eval is not None else []) + [(f"task.{t}.", sec) for t, sec in ev.tasks.items()]
    for prefix, section in sections:
        cand = section.candidates[ev.final]
        out |= {f"{prefix}ppl.{name}": est.value for name, est in section.ppl.items()}
        out[f"{prefix}ppl_ratio"] = cand.ppl_ratio.value
        if cand.retention.defined:
            out[f"{prefix}delta_retention"] = cand.retention.value
        for k in ("mean", "top1_agreement", "mean_dp_correct"):
            if k in cand.kl:
                out[f"{prefix}kl.{k}"] = cand.kl[k].value
        out[f"{prefix}eval_windows"] = float(section.windows)
    weights = ev.weight_retention.get(ev.final) or {}
    if weights.get("aggregate") is not None:
        out["weight_retention"] = weights["aggregate"]
    return {k: float(v) for k, v in out.items() if v is not None and abs(float(v)) != float("inf") and v == v}


def outcome_tags(name: str, verdict: str, reasons: tuple[str, ...], keys: dict[str, str], plan: dict,
                 report: dict, calibration_sha256: str | None) -> dict[str, str]:
    """Tags shared by the run and the version: verdict, reasons, stage keys, input sha256s."""
    tags = {"qmerge.name": name, "qmerge.verdict": verdict, "qmerge.final": report["final"],
            "qmerge.into": report["into"], "qmerge.reasons": "\n".join(reasons)[:TAG_LIMIT]}
    tags |= {f"qmerge.key.{stage}": key for stage, key in keys.items()}
    tags["qmerge.sha256.base"] = plan["base"]["sha256"]
    for i, adapter in enumerate(plan["adapters"]):
        tags[f"qmerge.sha256.adapter.{i}"] = adapter["sha256"]
    if report.get("eval") is not None:
        tags["qmerge.sha256.eval_token_ids"] = report["eval"]["tokens"]["sha256"]
    for task, section in report.get("tasks", {}).items():
        tags[f"qmerge.sha256.task_token_ids.{task}"] = section["tokens"]["sha256"]
    if calibration_sha256:
        tags["qmerge.sha256.calibration_token_ids"] = calibration_sha256
    return tags


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _experiment(client, model: str, uri: str) -> str:
    name = f"qmerge/{model}"
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts next to the database, not in ./mlruns of whatever folder runs us
        location = str(Path(uri[len("sqlite:///"):]).parent / "mlflow-artifacts")
    return client.create_experiment(name, artifact_location=location)


def _find_run(client, experiment: str, outcome: Outcome) -> str | None:
    found = client.search_runs([experiment], filter_string=f"tags.`qmerge.gate_key` = {_quote(outcome.gate_key)}",
                               max_results=1)
    return found[0].info.run_id if found else None


def _find_version(client, model: str, outcome: Outcome) -> str | None:
    found = client.search_model_versions(
        f"name = {_quote(model)} and tag.`qmerge.release_key` = {_quote(outcome.release_key)}")
    return next((str(v.version) for v in found if v.source == outcome.release), None)


def _run(client, experiment: str, outcome: Outcome, report_file: Path) -> tuple[str, bool]:
    """The build's run, found by its gate key or created (metrics, tags, report.json); (run id, created)."""
    found = _find_run(client, experiment, outcome)
    if found is not None:
        return found, False
    run = client.create_run(experiment, run_name=outcome.name, tags={**outcome.tags, "qmerge.gate_key": outcome.gate_key})
    run_id = run.info.run_id
    for k, v in sorted(outcome.metrics.items()):
        client.log_metric(run_id, k, v)
    client.log_artifact(run_id, str(report_file))
    client.set_terminated(run_id)
    return run_id, True


def _version(client, model: str, outcome: Outcome, run_id: str) -> tuple[str, bool]:
    """The release's model version, found by release key and source or created; (version, created)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model, description="Releases built and gated by qmerge")
    found = _find_version(client, model, outcome)
    if found is not None:
        return found, False
    tags = {**outcome.tags, **{k: repr(v) for k, v in outcome.metrics.items()}, "qmerge.gate_key": outcome.gate_key,
            "qmerge.release_key": outcome.release_key}
    version = client.create_model_version(model, source=outcome.release, run_id=run_id, tags=tags,
                                          description=f"qmerge release {outcome.release}")
    return str(version.version), True


def lock_file(uri: str, work: Path) -> Path:
    """One lock per registry: beside a SQLite database, else in the work dir's lock folder."""
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        db = Path(uri[len("sqlite:///"):])
        return db.with_name(db.name + ".lock")
    return work / ".locks" / f"registry-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextmanager
def _client(uri: str, work: Path) -> Iterator:
    """An MLflow client for `uri`, under the registry's lock."""
    from mlflow import MlflowClient

    from qmerge.io.atomic import file_lock

    lock = lock_file(uri, work)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for name in ("mlflow", "alembic", "sqlalchemy"):  # table creation and migrations log at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    with file_lock(lock, timeout=600):
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)


def _result(uri: str, model: str, outcome: Outcome, run_id: str) -> dict:
    return {"registry": uri, "registered_model": model, "verdict": outcome.verdict, "run_id": run_id,
            "version": None, "alias": None}


def recorded(uri: str, model: str, alias: str, outcome: Outcome, work: Path) -> dict | None:
    """What `record` would return when the registry holds `outcome` already (its run, and for a pass its version
    with the alias on it), so recording it would change nothing; else None. Reads only: a SQLite registry that
    does not exist yet is not created."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    from mlflow.exceptions import MlflowException

    with _client(uri, work) as client:
        experiment = client.get_experiment_by_name(f"qmerge/{model}")
        run_id = _find_run(client, experiment.experiment_id, outcome) if experiment is not None else None
        if run_id is None:
            return None
        out = _result(uri, model, outcome, run_id)
        if outcome.verdict not in PROMOTED or outcome.release is None:
            return out | {"status": "unchanged"}
        version = _find_version(client, model, outcome)
        try:
            aliased = str(client.get_model_version_by_alias(model, alias).version)
        except MlflowException:  # no such alias yet
            return None
    return out | {"version": version, "alias": alias, "status": "unchanged"} if version == aliased else None


def record(uri: str, model: str, alias: str, outcome: Outcome, report_file: Path, work: Path) -> dict:
    """Records `outcome` in the registry at `uri` (see the module docstring). Returns what it did; raises
    whatever MLflow raises (the caller keeps the release and reports it)."""
    with _client(uri, work) as client:
        experiment = _experiment(client, model, uri)
        run_id, run_created = _run(client, experiment, outcome, report_file)
        out = _result(uri, model, outcome, run_id)
        if outcome.verdict not in PROMOTED or outcome.release is None:
            return out | {"status": "recorded" if run_created else "unchanged"}
        version, created = _version(client, model, outcome, run_id)
        client.set_registered_model_alias(model, alias, version)  # the alias follows `latest`: the newest promoted
    log.info("registered %s version %s (%s) in %s", model, version, alias, uri)
    return out | {"version": version, "alias": alias, "status": "registered" if created else "unchanged"}
