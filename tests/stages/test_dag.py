"""Stage runner: --dry-run loads nothing and prints the plan; resume after a kill gives identical bytes;
--force/--only; weight-space retention reports a bf16-rounded tiny delta."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import make_adapter, make_base, run_cli, write_config

ROOT = Path(__file__).resolve().parents[2]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "done.json"}


def merge_dir(work: Path) -> Path:
    (d,) = [d for d in (work / "merge").iterdir() if (d / "done.json").is_file()]
    return d


def test_dry_run_loads_no_weights_and_prints_plan(tmp_path, tiny_llama, capsys):
    from qmerge.io.safetensors_io import CheckpointReader

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    before = CheckpointReader.tensors_loaded
    assert run_cli(cfg, "--dry-run") == 0
    assert CheckpointReader.tensors_loaded == before
    out = capsys.readouterr().out
    assert "dry run" in out and "quantized linears: 14;" in out
    assert "6 LoRA modules" in out and "merge" in out and "planned" in out
    assert not (tmp_path / "work").exists()


def test_resume_after_kill_gives_identical_output(tmp_path):
    base = make_base(tmp_path / "big", dtype="bfloat16")
    adapter = make_adapter(base, tmp_path / "a")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    cfg_ref = write_config(ref_dir, base, [(adapter, 1.0)], merge={"max_shard_size": 20000})
    assert run_cli(cfg_ref) == 0
    expected = tree_digest(merge_dir(ref_dir / "work"))
    assert len([n for n in expected if n.startswith("model-")]) > 2  # several shards

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = write_config(run_dir, base, [(adapter, 1.0)], merge={"max_shard_size": 20000})
    env = {**os.environ, "QMERGE_TEST_SLOW_WRITE": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "qmerge", "pipeline", str(cfg), "--quiet"], cwd=ROOT, env=env)
    merge_root = run_dir / "work" / "merge"
    deadline = time.time() + 60
    while time.time() < deadline and not (merge_root.exists() and any(merge_root.glob(".*tmp-*/.shard-*"))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(merge_root.glob("*/done.json")), "killed run must not leave a finished merge"
    assert run_cli(cfg) == 0
    assert tree_digest(merge_dir(run_dir / "work")) == expected
    assert not list(merge_root.glob(".*tmp-*"))  # the dead run's temp dir was cleaned


def test_rerun_uses_cache_and_force_redoes(tmp_path, tiny_llama, capsys):
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert run_cli(cfg) == 0
    capsys.readouterr()
    assert run_cli(cfg) == 0
    assert "cached" in capsys.readouterr().out
    assert run_cli(cfg, "--force") == 0
    out = capsys.readouterr().out
    assert "merge" in out and "cached" not in out


def test_reuse_only_answers_a_finished_run_and_stops_at_work(tmp_path, tiny_llama):
    """A reuse-only run (qmerge matrix's check) gives a finished pipeline's records and exit code and writes
    nothing; before the first run, or after a config change, it stops (exit code None) where work starts."""
    from qmerge.config import load_config
    from qmerge.dag import Options, Runner
    from qmerge.pipeline import STAGES

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    records, code = Runner(load_config(cfg), STAGES, Options(reuse_only=True)).run()
    assert code is None and [r.name for r in records] == ["resolve"]
    assert not (tmp_path / "work").exists()
    assert run_cli(cfg) == 0
    real, _ = Runner(load_config(cfg), STAGES, Options()).run()
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*")}
    records, code = Runner(load_config(cfg), STAGES, Options(reuse_only=True)).run()
    assert code == 0 and [(r.name, r.key, r.status, r.result) for r in records] == \
        [(r.name, r.key, r.status, r.result) for r in real]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*")} == files
    changed = write_config(tmp_path, tiny_llama, [(adapter, 1.0)], merge={"dtype": "bfloat16"})
    records, code = Runner(load_config(changed), STAGES, Options(reuse_only=True)).run()
    assert code is None and [r.name for r in records] == ["resolve"]


def test_bf16_storage_reports_lost_tiny_delta(tmp_path):
    base = make_base(tmp_path / "b", dtype="bfloat16")
    # A delta of ~0.05 bf16 ulp: bf16 storage of W_nf4 (on the bf16 grid) + ΔW rounds most of it away.
    adapter = make_adapter(base, tmp_path / "a", b_std=1e-5)
    cfg = write_config(tmp_path, base, [(adapter, 1.0)], merge={"dtype": "bfloat16"},
                       nf4={"load_dtype": "bfloat16", "compute_dtype": "bfloat16"})
    assert run_cli(cfg) == 0
    layers = json.loads((merge_dir(tmp_path / "work") / "merge_report.json").read_text())["layers"]
    assert layers and all(v["retention"] < 0.5 for v in layers.values())

    exact = tmp_path / "exact"
    exact.mkdir()
    cfg = write_config(exact, base, [(adapter, 1.0)], merge={"dtype": "float32"},
                       nf4={"load_dtype": "bfloat16", "compute_dtype": "bfloat16"})
    assert run_cli(cfg) == 0
    layers = json.loads((merge_dir(exact / "work") / "merge_report.json").read_text())["layers"]
    assert all(abs(v["retention"] - 1) < 1e-3 for v in layers.values())


def test_only_redoes_one_stage_and_stops(tmp_path, tiny_llama):
    import shutil

    from tests.conftest import save_char_tokenizer

    base = tmp_path / "base"  # a tokenizer: resolve checks the gate's text can be cut into windows
    shutil.copytree(tiny_llama, base)
    save_char_tokenizer(base)
    tiny_llama = base
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    text = ('[gate]\neval = "heldout.toml"\nwindows = 2\nseq_len = 16\n')
    (tmp_path / "heldout.toml").write_text('[source]\npath = "package:gensim/test/test_data/lee_background.cor"\n'
                                          '[split]\ndocuments = "265:300"\n')
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)], extra=text)
    assert run_cli(cfg, "--only", "evaluate") == 2  # its input, merge, has no finished artifact yet
    assert not (tmp_path / "work" / "merge").exists() or not any((tmp_path / "work" / "merge").iterdir())
    assert run_cli(cfg, "--only", "merge") == 0  # runs merge, then stops: evaluate/gate/promote untouched
    assert any((tmp_path / "work" / "merge").iterdir())
    assert not (tmp_path / "work" / "evaluate").exists()
    before = merge_dir(tmp_path / "work").stat().st_mtime_ns
    assert run_cli(cfg, "--only", "merge") == 0  # redone, even though finished
    assert merge_dir(tmp_path / "work").stat().st_mtime_ns != before
    for flag in ("--only", "--from"):  # a stage this config does not run: exit 2, not exit 0 having done nothing
        assert run_cli(cfg, flag, "quantize") == 2
    assert not (tmp_path / "work" / "quantize").exists()


def _stage_status(stdout: str, stage: str) -> tuple[str, str]:
    """(key, status) of `stage` in a pipeline summary."""
    line = next(ln for ln in stdout.splitlines() if ln.split()[:1] == [stage])
    return line.split()[1], line.split()[2]


def _pipelines(*configs: Path) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {"OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "qmerge", "pipeline", str(c)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in configs]


def test_runs_sharing_a_work_dir_build_each_key_once(tmp_path, tiny_llama):
    """Two runs of one config on one work dir: while one builds the merge the other waits for it and reuses
    it (never rebuilt, never replaced under a reader); a third config with another merge key is not held up."""
    from qmerge.io.atomic import file_lock

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    other = tmp_path / "other"
    other.mkdir()
    cfg_other = write_config(other, tiny_llama, [(adapter, 1.0)], merge={"dtype": "bfloat16"})
    cfg_other.write_text(cfg_other.read_text().replace(str(other / "work"), str(tmp_path / "work")))
    key = _stage_status(subprocess.run([sys.executable, "-m", "qmerge", "pipeline", str(cfg), "--dry-run"],
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout, "merge")[0]
    with file_lock(tmp_path / "work" / ".locks" / f"merge-{key}.lock"):  # both runs must arrive while it is held
        a, b = _pipelines(cfg, cfg)
        (c,) = _pipelines(cfg_other)
        assert c.wait(timeout=300) == 0  # another key: builds while the first key is locked
        deadline = time.monotonic() + 120
        waiting = []
        while len(waiting) < 2 and time.monotonic() < deadline:  # both runs blocked on the key
            time.sleep(0.5)
            waiting = [p for p in (a, b) if p.poll() is None]
        assert len(waiting) == 2
        time.sleep(3)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert [p.returncode for p in (a, b)] == [0, 0], [e for _, e in outs]
    statuses = sorted(_stage_status(out, "merge")[1] for out, _ in outs)
    assert statuses == ["cached", "ran"]  # one built it, the other reused it
    assert any("is being built by process" in err for _, err in outs)
    finished = sorted(d.name for d in (tmp_path / "work" / "merge").iterdir() if (d / "done.json").is_file())
    assert len(finished) == 2 and key in finished  # this key once, and the other config's key


def test_an_input_replaced_during_the_run_fails_it_and_publishes_nothing(tmp_path, tiny_llama, monkeypatch, capsys):
    """The adapter swapped after resolve hashed it (a training job saving again): the merge read the new file under
    the old hash's key; the release named one adapter and held another, and the key kept the wrong merge."""
    import qmerge.stages.merge as merge_stage
    from tests.conftest import make_adapter, run_cli, write_config

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    other = make_adapter(tiny_llama, tmp_path / "other", seed=7)
    real = merge_stage.run_merge

    def swapped_first(*args, **kwargs):
        (adapter / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes())
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_stage, "run_merge", swapped_first)
    assert run_cli(write_config(tmp_path, tiny_llama, [(adapter, 1.0)])) == 2
    err = capsys.readouterr().err
    assert "changed while this run was using it" in err and "adapter_model.safetensors" in err
    assert not list((tmp_path / "work" / "merge").glob("*/done.json"))
    assert not (tmp_path / "releases").exists() or not any((tmp_path / "releases").rglob("manifest.json"))


def test_a_file_changing_while_it_is_hashed_is_exit_2(tmp_path, tiny_llama, monkeypatch, capsys):
    import qmerge.stages.resolve as resolve
    from tests.conftest import make_adapter, run_cli, write_config

    adapter = make_adapter(tiny_llama, tmp_path / "adapter")
    real = resolve.sha256_file

    def appended_meanwhile(path, *args, **kwargs):
        digest = real(path, *args, **kwargs)
        if path.name == "adapter_config.json":
            with open(path, "a") as f:
                f.write("\n")
        return digest

    monkeypatch.setattr(resolve, "sha256_file", appended_meanwhile)
    assert run_cli(write_config(tmp_path, tiny_llama, [(adapter, 1.0)])) == 2
    assert "changed while qmerge hashed it" in capsys.readouterr().err


def test_the_configs_digest_is_of_the_bytes_the_run_read(tmp_path, tiny_llama):
    """The manifest's config_sha256 was read from the file at promote time: a config edited mid-run was recorded
    as the one the release was built from."""
    import hashlib

    from qmerge.config import load_config
    from tests.conftest import make_adapter, write_config

    path = write_config(tmp_path, tiny_llama, [(make_adapter(tiny_llama, tmp_path / "adapter"), 1.0)])
    read = path.read_bytes()
    cfg = load_config(path)
    path.write_text(path.read_text().replace('dtype = "float32"', 'dtype = "bfloat16"'))
    assert path.read_bytes() != read and cfg.source_sha256 == hashlib.sha256(read).hexdigest()
    assert "source_sha256" not in cfg.model_dump()  # not a key's input
