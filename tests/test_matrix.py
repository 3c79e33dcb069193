"""`qmerge matrix`: builds expand from bases × adapters × targets, share one work dir (a merge feeding two targets
is built once), run in parallel processes, and report per build and in aggregate; bad entries are exit 2 before
anything runs; a rerun rebuilds nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmerge.errors import EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_INTERNAL, EXIT_OK
from tests.conftest import write_text_spec

ROOT = Path(__file__).resolve().parents[1]


def matrix_head(g: dict, output: str = "") -> str:
    """The defaults, the tiny base and its "strong" adapter: what every test matrix starts with. `output`: more
    lines for [defaults.output]."""
    return f"""
work_dir = "work"
[defaults.merge]
dtype = "float32"
device = "cpu"
[defaults.gate]
eval = "{g['heldout']}"
windows = 24
seq_len = 64
batch_size = 8
[defaults.output]
dir = "releases"
{output}
[[bases]]
name = "tiny"
path = "{g['base']}"
nf4 = {{ load_dtype = "float32", compute_dtype = "float32" }}

[[adapters]]
name = "strong"
path = "{g['adapter']}"
"""


def matrix_file(folder: Path, g: dict, targets: str = "") -> Path:
    cal = write_text_spec(folder, "cal", "100:140")
    text = matrix_head(g) + f"""
[[adapters]]
name = "rslora"
path = "{g['rslora']}"

[[targets]]
name = "dense"

[[targets]]
name = "gptq"
quantize = {{ calibration = "{cal}", samples = 16, seq_len = 64, group_size = 32 }}
{targets}"""
    path = folder / "releases.toml"
    path.write_text(text)
    return path


def run_matrix(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([sys.executable, "-m", "qmerge", "matrix", str(path), "--quiet", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)


def test_matrix_shares_merges_and_a_rerun_rebuilds_nothing(gated, tmp_path):
    path = matrix_file(tmp_path, gated)
    done = run_matrix(path)
    report = json.loads((tmp_path / "work" / "matrix" / "matrix_report.json").read_text())
    builds = {b["build"]: b for b in report["builds"]}
    assert sorted(builds) == ["rslora-dense", "rslora-gptq", "strong-dense", "strong-gptq"], done.stderr
    codes = [b["exit_code"] for b in builds.values()]
    assert set(codes) <= {EXIT_OK, EXIT_GATE_REJECTED}, done.stdout + done.stderr
    assert done.returncode == report["exit_code"] == (EXIT_GATE_REJECTED if EXIT_GATE_REJECTED in codes else EXIT_OK)
    for b in builds.values():  # the verdict each build printed is what its exit code says
        assert b["verdict"] in ("pass", "reject", "inconclusive")
        assert (b["verdict"] == "pass") == (b["exit_code"] == EXIT_OK)
        assert (b["release"] is not None) == (b["verdict"] == "pass")
    for adapter in ("strong", "rslora"):  # one merge per adapter, built by one build, reused by the other
        dense, gptq = builds[f"{adapter}-dense"], builds[f"{adapter}-gptq"]
        assert dense["merge"].split()[0] == gptq["merge"].split()[0]
        assert sorted(b["merge"].split()[1] for b in (dense, gptq)) == ["cached", "ran"]
    merges = [d for d in (tmp_path / "work" / "merge").iterdir() if (d / "done.json").is_file()]
    assert len(merges) == 2
    for line in ("strong-gptq", "verdict", "exit code"):
        assert line in done.stdout

    again = run_matrix(path)
    assert again.returncode == done.returncode
    rerun = json.loads((tmp_path / "work" / "matrix" / "matrix_report.json").read_text())
    assert all(set(b["ran"]) <= {"resolve", "promote"} for b in rerun["builds"]), rerun["builds"]
    assert all(b["release_status"] in (None, "unchanged") for b in rerun["builds"])
    assert sorted(rerun["reused"]) == sorted(builds)  # answered in the matrix process: no pipeline process


def work_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under the work dir and the releases with its mtime and size; the matrix's own folder (configs,
    logs, summaries, report) and lock files left out."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for root in ("work", "releases") for p in (folder / root).rglob("*")
            if p.is_file() and "matrix" not in p.relative_to(folder).parts[:2] and p.suffix != ".lock"}


def test_a_rerun_answers_every_build_as_its_pipeline_would_and_a_change_reruns_only_its_build(gated, tmp_path,
                                                                                              monkeypatch):
    """With nothing changed, a rerun starts no pipeline process: each build is answered from its finished stages,
    its release and its registry record; nothing in the work dir, the releases or the registry changes, and each
    row is the row that build's own `qmerge pipeline` process gives (its timing aside). A new gate threshold for one
    target makes exactly that build run again."""
    from qmerge.matrix import Build, _row, run_builds

    path = tmp_path / "releases.toml"
    path.write_text(matrix_head(gated, output='registry = "mlflow"') + """
[[targets]]
name = "dense"

[[targets]]
name = "strict"
gate = { min_delta_retention = 1.5 }
""")
    report_file = tmp_path / "work" / "matrix" / "matrix_report.json"
    first = run_matrix(path)
    built = json.loads(report_file.read_text())
    assert built["reused"] == []
    assert {b["build"]: b["exit_code"] for b in built["builds"]} == \
        {"strong-dense": EXIT_OK, "strong-strict": EXIT_GATE_REJECTED}, first.stdout + first.stderr
    files = work_files(tmp_path)
    assert any(f.startswith("work/gate/") for f in files) and "releases/mlflow.db" in files

    again = run_matrix(path)
    rerun = json.loads(report_file.read_text())
    assert rerun["reused"] == ["strong-dense", "strong-strict"], again.stderr
    assert again.returncode == first.returncode == rerun["exit_code"] == EXIT_GATE_REJECTED
    assert work_files(tmp_path) == files  # nothing rebuilt, re-promoted or re-registered
    for a, b in zip(built["builds"], rerun["builds"]):  # the outcome of the first run, now unchanged
        assert a["merge"].split()[0] == b["merge"].split()[0] and b["merge"].endswith("cached")
        for k in ("build", "exit_code", "verdict", "retention", "kl_mean", "ppl", "release", "reasons"):
            assert a[k] == b[k], k
    dense, strict = rerun["builds"]
    assert dense["ran"] == ["resolve", "promote", "register"] and dense["release_status"] == "unchanged"
    assert "version 1 @champion (unchanged)" in dense["registry"]
    assert strict["ran"] == ["resolve", "register"] and "reject recorded as run" in strict["registry"]
    for b in rerun["builds"]:  # what the log and summary say is what the pipeline process would have written
        assert "exit code" in Path(b["log"]).read_text()
        assert json.loads(Path(b["config"]).with_suffix(".summary.json").read_text())["exit_code"] == b["exit_code"]

    monkeypatch.chdir(ROOT)  # the build processes, as the matrix starts them
    builds = [Build(b["build"], Path(b["config"])) for b in rerun["builds"]]
    run_builds(builds, jobs=1, budget=2**40, quiet=True)

    def untimed(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "seconds"}

    assert [untimed(_row(b)) for b in builds] == [untimed(r) for r in rerun["builds"]]

    path.write_text(path.read_text().replace("min_delta_retention = 1.5", "min_delta_retention = 1.4"))
    third = run_matrix(path)
    changed = json.loads(report_file.read_text())
    assert changed["reused"] == ["strong-dense"], third.stderr
    dense, strict = changed["builds"]
    assert strict["ran"] == ["resolve", "gate", "register"] and strict["verdict"] == "reject"
    assert strict["merge"] == dense["merge"] == rerun["builds"][0]["merge"]
    assert third.returncode == EXIT_GATE_REJECTED


def test_a_build_with_a_broken_adapter_is_not_started_and_the_others_run(gated, tmp_path):
    """One adapter folder of the nightly is broken: its builds are exit 2 with resolve's message, the others build
    and publish (every build had been stopped before anything ran), and the matrix exits 2."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gated["adapter"], broken)
    (broken / "adapter_config.json").write_text("{ not json")
    path = matrix_file(tmp_path, gated)
    path.write_text(path.read_text() + f'\n[[adapters]]\nname = "broken"\npath = "{broken}"\n')
    done = run_matrix(path)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    summary = json.loads((tmp_path / "work" / "matrix" / "matrix_report.json").read_text())
    rows = {r["build"]: r for r in summary["builds"]}
    assert {b for b, r in rows.items() if r["exit_code"] == EXIT_BAD_INPUT} == {"broken-dense", "broken-gptq"}
    assert all("adapter_config.json" in rows[b]["error"] for b in ("broken-dense", "broken-gptq"))
    assert all(r["exit_code"] == EXIT_OK for b, r in rows.items() if not b.startswith("broken")), rows
    assert "broken-dense not started" in done.stderr


def test_bad_target_is_exit_2_before_anything_runs(gated, tmp_path):
    path = matrix_file(tmp_path, gated, targets='\n[[targets]]\nname = "bad"\nmerge = { dtype = "float8" }\n')
    done = run_matrix(path)
    assert done.returncode == EXIT_BAD_INPUT
    assert "build strong-bad" in done.stderr and "merge.dtype" in done.stderr and str(path) in done.stderr
    assert not (tmp_path / "work" / "merge").exists()


@pytest.mark.parametrize("codes,want", [([0, 0], EXIT_OK), ([0, 3], EXIT_GATE_REJECTED), ([3, 1], EXIT_INTERNAL),
                                        ([1, 2, 3], EXIT_BAD_INPUT), ([0, 130], EXIT_INTERNAL),
                                        ([-9, 3], EXIT_INTERNAL), ([3, 137], EXIT_INTERNAL), ([3, 0], EXIT_GATE_REJECTED)])
def test_aggregate_exit_code(codes, want):
    from qmerge.matrix import aggregate_exit

    assert aggregate_exit(codes) == want


def test_expand_names_paths_and_filters(tmp_path):
    from qmerge.matrix import expand

    (tmp_path / "m.toml").write_text("""
work_dir = "w"
[defaults.gate]
eval = "eval.toml"
[[bases]]
name = "b1"
path = "base1"
[[bases]]
name = "b2"
path = "package:pkg/base.gguf"
[[adapters]]
name = "a"
path = "ad"
bases = ["b2"]
[[targets]]
name = "q"
quantize = { calibration = "cal.toml" }
""")
    work, builds = expand(tmp_path / "m.toml")
    assert work == tmp_path / "w"
    ((name, cfg, shares),) = builds
    assert name == "b2-a-q" and shares == "b2/a" and cfg["base"]["path"] == "package:pkg/base.gguf"
    assert cfg["adapters"] == [{"path": str(tmp_path / "ad")}]
    assert cfg["gate"]["eval"] == str(tmp_path / "eval.toml")
    assert cfg["quantize"]["calibration"] == str(tmp_path / "cal.toml")


def test_builds_whose_names_join_to_one_are_exit_2(tmp_path):
    """Adapters "a-x" and "a" with targets "dense" and "x-dense" both give "a-x-dense": one config file, one release
    folder and one row for two builds (one of them silently never ran). Refused, naming both."""
    from qmerge.errors import ConfigError
    from qmerge.matrix import expand

    (tmp_path / "m.toml").write_text("""
work_dir = "w"
[[bases]]
name = "b"
path = "base"
[[adapters]]
name = "a-x"
path = "ad1"
[[adapters]]
name = "a"
path = "ad2"
[[targets]]
name = "dense"
[[targets]]
name = "x-dense"
""")
    with pytest.raises(ConfigError, match="'a-x-dense'") as e:
        expand(tmp_path / "m.toml")
    assert "b/a-x" in str(e.value) and "b/a" in str(e.value) and str(tmp_path / "m.toml") in str(e.value)


def test_a_partial_builds_row_shows_the_shipped_artifacts_figures(tmp_path):
    """GPTQ rejected, the merged model shipped: the row had taken evaluate's first artifact (the rejected one)."""
    from qmerge.matrix import Build, _row

    evaluate = {"final": "quantized", "retention": 0.4, "kl_mean": 0.3, "ppl": {"quantized": 40.0, "merged": 31.0},
                "artifacts": {"quantized": {"retention": 0.4, "kl_mean": 0.3},
                              "merged": {"retention": 0.99, "kl_mean": 0.001}}}
    gate = {"verdict": "partial", "candidate": "merged", "reasons": ["quantized: KL too high"]}
    row = _row(Build("b", tmp_path / "b.toml", exit_code=3,
                     summary={"results": {"evaluate": evaluate, "gate": gate}}))
    assert (row["artifact"], row["retention"], row["kl_mean"], row["ppl"]) == ("merged", 0.99, 0.001, 31.0)
