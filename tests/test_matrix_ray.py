"""`qmerge matrix --ray`: the same builds as Ray tasks on a real Ray instance give the same table, report, verdicts,
exit codes and release bytes as the local scheduler; a task that raises or whose worker dies fails its build
(exit 1) and no other; a missing Ray, an unreachable address or a GPU build on a cluster without GPUs is exit 2
before anything runs.

One Ray instance serves the whole module (starting one takes seconds on 2 cores): it is started by qmerge's own
`ray_session` (the path `--ray` without an address takes), and the matrix subprocesses connect to it by address."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmerge.errors import EXIT_BAD_INPUT, EXIT_GATE_REJECTED, EXIT_INTERNAL, EXIT_OK, BadInputError
from tests.test_matrix import ROOT, matrix_file, matrix_head

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address():
    from qmerge.ray_scheduler import ray_session

    with ray_session(None, num_cpus=2, memory=4 * 2**30) as ray:
        yield ray.get_runtime_context().gcs_address
    assert not ray.is_initialized()


def small_matrix(folder: Path, g: dict) -> Path:
    """One adapter, three targets sharing its merge and evaluate: a pass, a reject (a retention bar no model
    reaches) and a build that fails at run time, in promote (its release version is taken by a folder already
    there, which nothing before promote looks at), after its gate passed.
    Every build records itself in the default SQLite registry."""
    folder.mkdir()
    path = folder / "releases.toml"
    path.write_text(matrix_head(g, output='registry = "mlflow"') + """
[[targets]]
name = "dense"

[[targets]]
name = "strict"
gate = { min_delta_retention = 1.5 }

[[targets]]
name = "badver"
output = { version = "taken" }
""")
    (folder / "releases" / "strong-badver" / "taken").mkdir(parents=True)
    return path


def run_matrix(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "qmerge", "matrix", str(path), "--quiet", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)


def release_bytes(folder: Path, build: str) -> dict[str, str]:
    latest = folder / "releases" / build / "latest"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(latest.iterdir())
            if f.name not in ("manifest.json", "README.md")}


@pytest.mark.slow
def test_ray_builds_match_the_local_scheduler(gated, tmp_path, ray_address):
    local, on_ray = small_matrix(tmp_path / "local", gated), small_matrix(tmp_path / "ray", gated)
    done_local = run_matrix(local)
    done_ray = run_matrix(on_ray, "--ray", ray_address)
    reports = [json.loads((p.parent / "work" / "matrix" / "matrix_report.json").read_text()) for p in (local, on_ray)]
    assert reports[0]["scheduler"] == "local" and reports[1]["scheduler"] == f"ray {ray_address}"
    rows = [{b["build"]: b for b in r["builds"]} for r in reports]
    assert sorted(rows[1]) == ["strong-badver", "strong-dense", "strong-strict"], done_ray.stderr
    for name in rows[0]:
        a, b = rows[0][name], rows[1][name]
        assert (a["exit_code"], a["verdict"], a["retention"], a["kl_mean"]) == \
               (b["exit_code"], b["verdict"], b["retention"], b["kl_mean"]), (name, done_ray.stdout, done_ray.stderr)
    ray_rows = rows[1]
    assert ray_rows["strong-dense"]["exit_code"] == EXIT_OK and ray_rows["strong-dense"]["verdict"] == "pass"
    assert ray_rows["strong-strict"]["exit_code"] == EXIT_GATE_REJECTED
    assert ray_rows["strong-badver"]["exit_code"] == EXIT_BAD_INPUT and "never overwritten" in ray_rows["strong-badver"]["error"]
    assert done_local.returncode == done_ray.returncode == reports[1]["exit_code"] == EXIT_BAD_INPUT
    # The same release bytes, hashed by the manifest and by us, whichever scheduler built them.
    hashes = [release_bytes(p.parent, "strong-dense") for p in (local, on_ray)]
    assert hashes[0] == hashes[1] and "model.safetensors" in hashes[0]
    manifests = [json.loads((p.parent / "releases" / "strong-dense" / "latest" / "manifest.json").read_text())
                 for p in (local, on_ray)]
    assert manifests[0]["files"] == manifests[1]["files"] and manifests[0]["key"] == manifests[1]["key"]
    # The registry rows: the pass is version 1 with the alias, the reject a run only.
    assert ray_rows["strong-dense"]["registry"].startswith("strong-dense version 1 @champion (registered)")
    assert "reject recorded as run" in ray_rows["strong-strict"]["registry"]
    for line in ("strong-dense", "registry:", "exit code 2"):
        assert line in done_ray.stdout
    # A rerun answers the builds with nothing to do before scheduling; only the failing one goes to Ray again.
    again = run_matrix(on_ray, "--ray", ray_address)
    rerun = json.loads((on_ray.parent / "work" / "matrix" / "matrix_report.json").read_text())
    assert rerun["reused"] == ["strong-dense", "strong-strict"] and rerun["scheduler"] == f"ray {ray_address}"
    assert again.returncode == done_ray.returncode
    rows = {b["build"]: b for b in rerun["builds"]}
    for name, row in ray_rows.items():
        assert (row["exit_code"], row["verdict"], row["release"]) == \
               (rows[name]["exit_code"], rows[name]["verdict"], rows[name]["release"]), (name, again.stderr)
    assert "never overwritten" in rows["strong-badver"]["error"]


def test_a_raising_or_crashing_task_fails_its_build_only(ray_address, tmp_path):
    import ray

    from qmerge.matrix import Build
    from qmerge.ray_scheduler import run_in_order

    @ray.remote(max_retries=0, num_cpus=0)
    def ok():
        return {"exit_code": 0, "seconds": 1.0, "summary": json.dumps({"results": {"gate": {"verdict": "pass"}}}),
                "log_tail": "", "node": "n"}

    @ray.remote(max_retries=0, num_cpus=0)
    def raises():
        raise ValueError("broken build")

    @ray.remote(max_retries=0, num_cpus=0)
    def dies():
        os._exit(7)

    builds = [Build(n, tmp_path / f"{n}.toml") for n in ("ok", "raises", "dies")]
    tasks = {"ok": ok, "raises": raises, "dies": dies}
    run_in_order(ray, builds, lambda b: tasks[b.name].remote(), slots=3, quiet=True)
    assert builds[0].exit_code == EXIT_OK and builds[0].summary["results"]["gate"]["verdict"] == "pass"
    assert builds[0].error is None
    assert builds[1].exit_code == EXIT_INTERNAL and "broken build" in builds[1].error
    assert builds[2].exit_code == EXIT_INTERNAL and builds[2].error.startswith("Ray task failed")


def test_builds_start_in_their_order_with_at_most_slots_in_flight(ray_address, tmp_path):
    """Ray, given every task at once, starts tasks of different resource shapes round-robin over the shapes; the
    scheduler therefore submits in the matrix's order and only as many as run at once. Here the tasks ask for
    nothing (Ray would run all four at once) and for different memory (different shapes): each records when it
    ran, and with 2 slots the third starts only after one of the first two ended, the fourth after another."""
    import time

    import ray

    from qmerge.matrix import Build

    @ray.remote(max_retries=0, num_cpus=0)
    def timed(name):
        start = time.time()
        time.sleep(0.5)
        return {"exit_code": 0, "seconds": 0.5, "log_tail": "", "node": "n",
                "summary": json.dumps({"name": name, "start": start, "end": time.time()})}

    from qmerge.ray_scheduler import run_in_order

    builds = [Build(f"b{i}", tmp_path / f"b{i}.toml") for i in range(4)]
    started = []

    def start(b):
        started.append(b.name)
        return timed.options(memory=(int(b.name[1:]) + 1) * 2**20).remote(b.name)

    run_in_order(ray, builds, start, slots=2, quiet=True)
    assert started == ["b0", "b1", "b2", "b3"]
    spans = [(b.summary["start"], b.summary["end"]) for b in builds]
    for i in (2, 3):  # at most two in flight: each later build starts after some earlier one ended
        ended_before = [j for j in range(i) if spans[j][1] <= spans[i][0]]
        assert len(ended_before) >= i - 1, spans
    assert spans[1][0] < spans[0][1]  # and two did run at once


def test_task_resources_share_cpus_cap_memory_and_refuse_a_gpu_build(ray_address, tmp_path):
    import ray

    from qmerge.matrix import Build
    from qmerge.ray_scheduler import slots, task_resources

    def build(name: str, device: str, estimate: int) -> Build:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'name = "{name}"\nwork_dir = "w"\n[base]\npath = "b"\n[[adapters]]\npath = "a"\n'
                       f'[merge]\ndevice = "{device}"\n')
        return Build(name, cfg, estimate_bytes=estimate)

    small, huge = build("small", "auto", 2**20), build("huge", "cpu", 2**50)
    res = task_resources([small, huge], ray, jobs=None)
    assert res["small"] == {"num_cpus": 1, "num_gpus": 0, "memory": 2**20}  # 2 CPUs over 2 builds
    assert res["huge"]["memory"] == 4 * 2**30  # capped at the node's: it runs alone there
    assert task_resources([small], ray, jobs=1)["small"]["num_cpus"] == 2
    assert slots(res, ray, jobs=None) == 2 and slots(res, ray, jobs=1) == 1
    assert slots(task_resources([small], ray, jobs=1), ray, jobs=1) == 1
    with pytest.raises(BadInputError, match="no Ray node has a GPU"):
        task_resources([build("gpu", "cuda", 2**20)], ray, jobs=None)


def test_unreachable_address_and_missing_ray_are_exit_2_before_anything_runs(gated, tmp_path, monkeypatch, capsys):
    from qmerge.cli import main

    path = matrix_file(tmp_path, gated)
    assert main(["matrix", str(path), "--quiet", "--ray", "127.0.0.1:1"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "127.0.0.1:1 is not reachable" in err and "ray start --head" in err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # --ray alone takes $RAY_ADDRESS
    assert main(["matrix", str(path), "--quiet", "--ray"]) == EXIT_BAD_INPUT
    assert "127.0.0.1:1 is not reachable" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["matrix", str(path), "--quiet", "--ray"]) == EXIT_BAD_INPUT
    assert "pip install 'qmerge[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "work" / "merge").exists()


def test_a_build_that_quantizes_or_gates_reserves_a_gpu_on_a_gpu_cluster(tmp_path):
    """quantize and evaluate run on CUDA wherever torch sees one, whatever merge.device says: such a build reserves a
    GPU when the cluster has one (it reserved none with merge.device = "cpu")."""
    from qmerge.ray_scheduler import uses_cuda

    def config(name: str, device: str, extra: str = "") -> Path:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'name = "{name}"\nwork_dir = "w"\n[base]\npath = "b"\n[[adapters]]\npath = "a"\n'
                       f'[merge]\ndevice = "{device}"\n' + extra)
        return cfg

    gated = config("gated", "cpu", '[gate]\neval = "e.toml"\n')
    quantized = config("quantized", "cpu", '[quantize]\ncalibration = "c.toml"\n')
    plain = config("plain", "cpu")
    assert uses_cuda(gated, 1) and uses_cuda(quantized, 1) and not uses_cuda(plain, 1)
    assert not uses_cuda(gated, 0) and uses_cuda(config("cuda", "cuda"), 0)
