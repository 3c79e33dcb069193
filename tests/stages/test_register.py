"""register: gated builds recorded in a real MLflow registry (a SQLite file in tmp_path). A pass becomes a version
whose source is the release and takes the alias; a reject is a run with its reasons and never moves the alias; a
rerun with unchanged inputs records nothing new; a registry that fails after a promote keeps the release (exit 1),
and a rerun registers it. Config: the registry keys are validated, and a registry without mlflow is exit 2 naming
the extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qmerge.errors import EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_INTERNAL, EXIT_OK, ConfigError
from tests.conftest import gate_config, run_cli


def registry_config(folder: Path, g: dict, gate: str = "", output: str = 'registry = "mlflow"\n') -> Path:
    path = gate_config(folder, g, gate=gate)
    path.write_text(path.read_text().replace("[output]\n", f"[output]\n{output}", 1))
    return path


def client(folder: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder / 'releases' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_result(folder: Path) -> dict:
    """The newest register stage result of the run in `folder`."""
    done = sorted((folder / "work" / "register").glob("*/done.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(done[-1].read_text())["result"]


def runs(c, verdict: str) -> list:
    exp = c.get_experiment_by_name("qmerge/tiny")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`qmerge.verdict` = '{verdict}'")


def test_pass_moves_the_alias_reject_is_recorded_and_reruns_add_nothing(gated, tmp_path):
    passing = registry_config(tmp_path, gated)
    assert run_cli(passing) == EXIT_OK
    c = client(tmp_path)
    (v1,) = c.search_model_versions("name = 'tiny'")
    release = (tmp_path / "releases" / "tiny" / "latest").resolve()
    assert v1.source == str(release)
    assert str(c.get_model_version_by_alias("tiny", "champion").version) == str(v1.version)
    manifest = json.loads((release / "manifest.json").read_text())
    assert v1.tags["qmerge.verdict"] == "pass" and v1.tags["qmerge.release_key"] == manifest["key"]
    assert v1.tags["qmerge.key.gate"] == manifest["provenance"]["stage_keys"]["gate"]
    assert v1.tags["qmerge.sha256.base"] == manifest["provenance"]["base"]["sha256"]
    assert v1.tags["qmerge.sha256.adapter.0"] == manifest["provenance"]["adapters"][0]["sha256"]
    assert v1.tags["qmerge.sha256.eval_token_ids"] == manifest["provenance"]["eval_token_ids_sha256"]
    ppl = manifest["metrics"]["ppl"]
    assert float(v1.tags["ppl.reference"]) == ppl["reference"]["value"]
    (run,) = runs(c, "pass")
    assert v1.run_id == run.info.run_id
    assert run.data.metrics["ppl.merged"] == ppl["merged"]["value"]
    assert abs(run.data.metrics["delta_retention"] - 1) < 0.01 and "kl.mean" in run.data.metrics
    assert [a.path for a in c.list_artifacts(run.info.run_id)] == ["report.json"]

    assert run_cli(passing) == EXIT_OK  # unchanged inputs: no second version, no second run
    assert len(c.search_model_versions("name = 'tiny'")) == 1 and len(runs(c, "pass")) == 1
    assert register_result(tmp_path)["status"] == "unchanged"

    # A new passing release (another gate threshold, so another gate key): version 2 takes the alias.
    assert run_cli(registry_config(tmp_path, gated, gate="max_kl = 0.04\n")) == EXIT_OK
    assert len(c.search_model_versions("name = 'tiny'")) == 2
    assert str(c.get_model_version_by_alias("tiny", "champion").version) == "2"

    rejecting = registry_config(tmp_path, gated, gate="min_delta_retention = 1.5\n")
    assert run_cli(rejecting) == EXIT_GATE_REJECTED
    (reject,) = runs(c, "reject")
    assert "delta retention" in reject.data.tags["qmerge.reasons"] and "weight_retention" in reject.data.metrics
    assert len(c.search_model_versions("name = 'tiny'")) == 2  # never a version, never the alias
    assert str(c.get_model_version_by_alias("tiny", "champion").version) == "2"
    result = register_result(tmp_path)
    assert result["verdict"] == "reject" and result["version"] is None and result["status"] == "recorded"
    assert run_cli(rejecting) == EXIT_GATE_REJECTED
    assert len(runs(c, "reject")) == 1 and register_result(tmp_path)["status"] == "unchanged"
    # --only register after a rejected gate: the stage still follows the stop, and still adds nothing.
    assert run_cli(rejecting, "--only", "register") == EXIT_GATE_REJECTED
    assert len(runs(c, "reject")) == 1 and register_result(tmp_path)["status"] == "unchanged"
    assert str(c.get_model_version_by_alias("tiny", "champion").version) == "2"


def test_registry_failure_keeps_the_release_and_a_rerun_registers_it(gated, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = 'registry = "mlflow"\nregistry_uri = "http://127.0.0.1:1"\n'
    cfg = registry_config(tmp_path, gated, output=down)
    assert run_cli(cfg) == EXIT_INTERNAL
    result = register_result(tmp_path)
    release = Path(result["release"])
    assert result["status"] == "failed" and "published and kept" in result["error"]
    assert (release / "manifest.json").is_file() and (release.parent / "latest").resolve() == release
    assert "published and kept" in capsys.readouterr().err

    assert run_cli(registry_config(tmp_path, gated)) == EXIT_OK  # registry back (the default SQLite file)
    (version,) = client(tmp_path).search_model_versions("name = 'tiny'")
    assert version.source == str(release)
    assert len([p for p in release.parent.iterdir() if p.name != "latest" and not p.name.startswith(".")]) == 1


@pytest.mark.parametrize("output,message", [
    ('registry = "mlflow"\nalias = "latest"\n', "output.alias"),
    ('registry_uri = "sqlite:///x.db"\n', "output.registry is not"),
    ('registry = "wandb"\n', "output.registry"),
])
def test_bad_registry_keys_are_exit_2(gated, tmp_path, output, message):
    from qmerge.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(registry_config(tmp_path, gated, output=output))
    assert message in str(e.value) and e.value.exit_code == EXIT_BAD_INPUT


def test_registry_needs_a_gate_and_the_mlflow_extra(gated, tmp_path, monkeypatch):
    from qmerge.config import load_config

    cfg = registry_config(tmp_path, gated)
    text = cfg.read_text()
    loaded = load_config(cfg)
    assert loaded.registry_uri == f"sqlite:///{tmp_path / 'releases' / 'mlflow.db'}"
    assert loaded.registered_model == "tiny" and loaded.output.alias == "champion"
    cfg.write_text(text.replace('registry = "mlflow"\n', 'registry = "mlflow"\nregistry_uri = "sqlite:///db/r.db"\n'))
    assert load_config(cfg).registry_uri == f"sqlite:///{tmp_path / 'db' / 'r.db'}"  # relative to the config
    cfg.write_text(text[:text.index("[gate]")])
    with pytest.raises(ConfigError, match="no \\[gate\\]"):
        load_config(cfg)
    cfg.write_text(text)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert "pip install 'qmerge[mlflow]'" in str(e.value) and e.value.exit_code == EXIT_BAD_INPUT
    assert run_cli(cfg) == EXIT_BAD_INPUT
    assert not (tmp_path / "work").exists()  # refused before anything ran


def test_a_partial_release_is_a_version_and_takes_the_alias_as_latest_does(gated, tmp_path):
    """2-bit GPTQ rejected, the merged model passed: promote ships the merged model and moves `latest`; the
    registry had recorded a run only, so `latest` and the alias named different releases."""
    quantize = f'[quantize]\nbits = 2\ngroup_size = 32\ncalibration = "{gated["select"]}"\nsamples = 8\nseq_len = 64\n'
    cfg = registry_config(tmp_path, gated, gate="max_kl = 0.0001\nmax_ppl_increase = 0.001\n",
                          output='registry = "mlflow"\nformats = ["gptq", "safetensors"]\n')
    cfg.write_text(cfg.read_text() + quantize)
    assert run_cli(cfg) == EXIT_GATE_REJECTED
    result = register_result(tmp_path)
    assert result["verdict"] == "partial" and result["status"] == "registered", result
    c = client(tmp_path)
    (version,) = c.search_model_versions("name = 'tiny'")
    assert version.source == str((tmp_path / "releases" / "tiny" / "latest").resolve())
    assert str(c.get_model_version_by_alias("tiny", "champion").version) == str(version.version)
    assert run_cli(cfg) == EXIT_GATE_REJECTED  # nothing new the second time
    assert len(c.search_model_versions("name = 'tiny'")) == 1 and register_result(tmp_path)["status"] == "unchanged"
