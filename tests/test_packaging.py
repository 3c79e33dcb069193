"""A built wheel works outside the checkout: it holds the package and nothing of the repository, and the installed
tool runs --version, --help and a --dry-run of a config that names its inputs by absolute path, from another
folder, importing qmerge from the wheel (not the editable checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import make_adapter, write_config

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path, tiny_llama):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    assert "deprecated" not in (build.stdout + build.stderr).lower(), build.stderr
    (wheel,) = (tmp_path / "dist").glob("qmerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qmerge/cli.py" in names and "qmerge/stages/evaluate.py" in names
    assert not [n for n in names if n.startswith(("configs/", "calibration/", "adapters/", "tests/", "benchmarks/"))]

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, capture_output=True, text=True, env=env,
                              timeout=600)

    where = run("-c", "import qmerge; print(qmerge.__file__)")
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    assert run("-m", "qmerge", "--version").stdout.startswith("qmerge ")
    assert "--dry-run" in run("-m", "qmerge", "pipeline", "--help").stdout
    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    (tmp_path / "cfg").mkdir()
    cfg = write_config(tmp_path / "cfg", tiny_llama, [(adapter, 1.0)])
    dry = run("-m", "qmerge", "pipeline", str(cfg), "--dry-run", "--quiet")
    assert dry.returncode == 0, dry.stderr
    assert "qmerge plan" in dry.stdout and "merge" in dry.stdout
    assert not (tmp_path / "cfg" / "work").exists()  # dry: nothing written
