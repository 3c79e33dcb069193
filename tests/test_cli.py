"""`qmerge` (the console script) and `python -m qmerge` are one entry point: same help, same process defaults."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qmerge

SCRIPT = Path(sys.executable).parent / "qmerge"


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not SCRIPT.is_file(), reason="the console script is not installed beside this python")
def test_console_script_and_module_behave_the_same(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "THP_MEM_ALLOC_ENABLE", "TORCHINDUCTOR_CACHE_DIR")}
    probe = ("import os, sys; from qmerge.cli import main; sys.argv = ['qmerge', '--version'];\n"
             "try: main()\nexcept SystemExit: pass\n"
             "print([os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'THP_MEM_ALLOC_ENABLE')])")
    as_module = _run([sys.executable, "-m", "qmerge", "--help"], env)
    as_script = _run([str(SCRIPT), "--help"], env)
    assert as_module.returncode == as_script.returncode == 0
    assert as_module.stdout == as_script.stdout
    assert as_script.stdout.startswith("usage: qmerge")
    assert "No pipeline logic" not in as_script.stdout and "exit codes" in as_script.stdout.lower()
    # main() itself sets the process defaults (offline, THP), so the console script gets them too.
    out = _run([sys.executable, "-c", probe], env)
    assert "['1', '1', '1']" in out.stdout, out.stdout + out.stderr
    for cmd in ([sys.executable, "-m", "qmerge", "--version"], [str(SCRIPT), "--version"]):
        assert _run(cmd, env).stdout.strip() == f"qmerge {qmerge.__version__}"


NOISE = ("GPT-QModel", "_pytree", "Failed to load", "kernels-community", "Python GIL", "Auto setting")


def test_quiet_run_leaves_stderr_free_of_third_party_noise(gated, tmp_path):
    """A nightly log under --quiet: no GPTQModel banner or environment notes (PEFT imports gptqmodel when it is
    installed), no torch pytree deprecations, no optional-kernel notes from torchao / bitsandbytes."""
    from tests.conftest import gate_config

    cfg = gate_config(tmp_path, gated)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run([sys.executable, "-m", "qmerge", "pipeline", str(cfg), "--quiet"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "verdict: pass" in done.stdout
    found = [marker for marker in NOISE if marker in done.stderr]
    assert not found, done.stderr
    assert "%|" not in done.stderr, done.stderr  # no progress bars under --quiet, qmerge's own included


def test_quiet_import_of_gptqmodel_is_deferred_silent_and_leaves_no_handler_on_a_closed_stream():
    """--quiet does not import GPTQModel itself: when something later does (PEFT wrapping a model, which asks
    find_spec first), its banner and notes are discarded, and that discarded output does not take later log
    records with it: every handler the import created writes to stderr afterwards (a closed stream would turn
    each warning into a 'Logging error' traceback)."""
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed")
    code = ("import logging, sys; from qmerge.runtime import silence_third_party; silence_third_party(); "
            "import importlib.util; assert 'gptqmodel' not in sys.modules; "
            "assert importlib.util.find_spec('gptqmodel'); import gptqmodel; assert gptqmodel.__spec__.origin; "
            "hs = [h for lg in (logging.root, *logging.Logger.manager.loggerDict.values()) "
            "for h in getattr(lg, 'handlers', ()) if isinstance(h, logging.StreamHandler)]; "
            "assert all(not getattr(h.stream, 'closed', False) for h in hs), hs; "
            "logging.getLogger('transformers').error('qmerge-test-marker')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "qmerge-test-marker" in done.stderr and "Logging error" not in done.stderr, done.stderr
    assert not [marker for marker in NOISE if marker in done.stdout + done.stderr], done.stdout + done.stderr
    loud = subprocess.run([sys.executable, "-c", "import gptqmodel"], capture_output=True, text=True, timeout=300)
    assert "GPT-QModel" in loud.stdout + loud.stderr  # without --quiet the banner is there: the check above can fail


def test_a_permission_error_is_bad_input_naming_the_path(monkeypatch, capsys, tmp_path):
    """A file or folder this user may not read or write (an unreadable shard, a read-only output folder) is exit 2
    naming it, not an internal error with a traceback (exit 1)."""
    import qmerge.report
    from qmerge.cli import main

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "model-00001-of-00002.safetensors"))

    monkeypatch.setattr(qmerge.report, "run_pipeline_command", denied)
    assert main(["pipeline", str(tmp_path / "qmerge.toml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model-00001-of-00002.safetensors: permission denied" in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--jobs", "-1"), ("--jobs", "0"), ("--memory-gib", "0"), ("--jobs", "x")])
def test_a_matrix_count_that_cannot_work_is_exit_2(tmp_path, capsys, flag, value):
    """--jobs -1 started no build and looped forever."""
    from qmerge.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["matrix", str(tmp_path / "m.toml"), flag, value])
    assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_a_run_without_a_gate_says_nothing_was_promoted_and_where_the_merge_is(tmp_path, tiny_llama, capsys):
    from tests.conftest import make_adapter, run_cli, write_config

    assert run_cli(write_config(tmp_path, tiny_llama, [(make_adapter(tiny_llama, tmp_path / "a"), 1.0)])) == 0
    out = capsys.readouterr().out
    (merged,) = (tmp_path / "work" / "merge").iterdir()
    assert f"no [gate]: nothing was evaluated or promoted; the merge artifact is {merged}" in out
    assert not (tmp_path / "releases").exists()
