"""promote: concurrent promotions of one name in two processes (one key; two versions at once), an interrupted
promotion, versions never overwritten, and merge.into = "original" / "auto" (chosen on the select split, never
the gate's)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmerge.io.atomic import TEMP_MARK
from tests.conftest import gate_config, run_cli, write_config

ROOT = Path(__file__).resolve().parents[2]


def cli(cfg: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qmerge", "pipeline", str(cfg), "--quiet", *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_complete(release: Path) -> dict:
    manifest = json.loads((release / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == digest, name
    return manifest


def visible(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def _config(folder: Path, gated: dict, releases: Path) -> Path:
    folder.mkdir()
    cfg = gate_config(folder, gated)
    cfg.write_text(cfg.read_text().replace(f'dir = "{folder / "releases"}"', f'dir = "{releases}"'))
    return cfg


def test_two_processes_promote_the_same_name(gated, tmp_path):
    releases = tmp_path / "releases"
    cfgs = [_config(tmp_path / f"run{i}", gated, releases) for i in (1, 2)]
    procs = [cli(cfg, "--release-version", f"v{i}", env={"QMERGE_TEST_SLOW_WRITE": "0.1"})
             for i, cfg in enumerate(cfgs, 1)]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read().decode() for p in procs]
    root = releases / "tiny"
    # Both runs hold the same inputs, so they have the same key; each asked for its own version by name, so each
    # publishes it (a deploy step waits for that name), one after the other under the lock. Neither may corrupt
    # the other, and `latest` ends on a complete one.
    assert codes == [0, 0], errors
    assert visible(root) == {"v1", "v2", "latest"}, visible(root)
    manifests = [assert_complete(root / v) for v in ("v1", "v2")]
    assert manifests[0]["key"] == manifests[1]["key"]
    manifest = assert_complete(root / "latest")
    assert (root / "latest").resolve().name == manifest["version"]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_an_asked_for_version_is_published_even_when_nothing_changed(gated, tmp_path):
    """--release-version V on unchanged inputs: V was not created (exit 0, "unchanged"), and a deploy step waiting
    for V broke. Without the flag an unchanged rerun still publishes nothing."""
    cfg = gate_config(tmp_path, gated)
    root = tmp_path / "releases" / "tiny"
    assert run_cli(cfg) == 0
    first = visible(root)
    assert run_cli(cfg) == 0 and visible(root) == first
    assert run_cli(cfg, "--release-version", "1.4.0") == 0
    assert visible(root) == first | {"1.4.0"} and (root / "latest").resolve().name == "1.4.0"
    assert assert_complete(root / "1.4.0")["key"] == assert_complete(root / sorted(first - {"latest"})[0])["key"]
    assert run_cli(cfg, "--release-version", "1.4.0") == 0 and visible(root) == first | {"1.4.0"}


def _promoting(folder: Path) -> bool:
    """Whether the run in `folder` is inside its promote stage (the stage's temp dir exists)."""
    stage = folder / "work" / "promote"
    return stage.is_dir() and any(TEMP_MARK in p.name for p in stage.iterdir())


def _latest_seen(root: Path) -> str | None:
    """What a reader of `latest` finds now: nothing before the first release, else a whole published version."""
    latest = root / "latest"
    if not latest.is_symlink():
        assert not latest.exists()
        return None
    version = os.readlink(latest)  # versions are immutable once published: read through the name, not the link
    manifest = json.loads((root / version / "manifest.json").read_text())
    assert manifest["version"] == version
    assert all((root / version / name).is_file() for name in manifest["files"])
    return version


def test_two_processes_promote_two_versions_at_once(gated, tmp_path):
    """Two different releases (two adapters, so two keys) of one name, promoted by two processes at once: the
    test holds the name's lock until both wait for it inside their promote stage. Both publish, and `latest`
    is never missing once set, never dangling, never a half-written folder; it ends at one of the two."""
    from qmerge.io.atomic import file_lock

    releases = tmp_path / "releases"
    root = releases / "tiny"
    folders, cfgs = [tmp_path / "run1", tmp_path / "run2"], []
    for folder, adapter in zip(folders, (gated["adapter"], gated["fragile"])):
        folder.mkdir()
        cfg = gate_config(folder, gated, adapter)
        assert run_cli(cfg) == 0  # merge to gate finished (and released elsewhere): below, promote alone runs
        cfg.write_text(cfg.read_text().replace(f'dir = "{folder / "releases"}"', f'dir = "{releases}"'))
        cfgs.append(cfg)
    root.mkdir(parents=True)
    procs, seen = [], set()
    try:
        with file_lock(root / ".lock"):
            procs = [cli(cfg, "--release-version", f"v{i}", env={"QMERGE_TEST_SLOW_WRITE": "0.2"})
                     for i, cfg in enumerate(cfgs, 1)]
            deadline = time.time() + 240
            while not all(_promoting(f) for f in folders):
                assert time.time() < deadline and all(p.poll() is None for p in procs), \
                    [p.stderr.read().decode() for p in procs if p.poll() is not None]
                time.sleep(0.05)
            assert _latest_seen(root) is None
        while any(p.poll() is None for p in procs):
            now = _latest_seen(root)
            assert now is not None or not seen, f"latest vanished after pointing at {seen}"
            seen |= {now} - {None}
            time.sleep(0.01)
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], [p.stderr.read().decode() for p in procs]
    assert visible(root) == {"v1", "v2", "latest"}, visible(root)
    manifests = [assert_complete(root / v) for v in ("v1", "v2")]
    assert [m["version"] for m in manifests] == ["v1", "v2"] and manifests[0]["key"] != manifests[1]["key"]
    for folder, manifest in zip(folders, manifests):  # each run says it promoted its own version
        done = [json.loads((d / "done.json").read_text())["result"] for d in (folder / "work" / "promote").iterdir()
                if (d / "done.json").is_file()]
        assert {"status": "promoted", "release": str(root / manifest["version"]), "key": manifest["key"]} in \
            [{k: r.get(k) for k in ("status", "release", "key")} for r in done], done
    final = _latest_seen(root)
    assert final in {"v1", "v2"} and seen <= {"v1", "v2"}, seen
    assert assert_complete(root / "latest")["version"] == final
    assert not [p for p in root.iterdir() if TEMP_MARK in p.name]


def test_interrupted_promotion_keeps_previous_latest(gated, tmp_path):
    cfg = gate_config(tmp_path, gated)
    assert run_cli(cfg, "--release-version", "v1") == 0
    root = tmp_path / "releases" / "tiny"
    before = assert_complete(root / "latest")
    # Another adapter (new key) so the second run really promotes; kill it while it copies files.
    cfg.write_text(cfg.read_text().replace(str(gated["adapter"]), str(gated["fragile"])))
    proc = cli(cfg, "--release-version", "v2", env={"QMERGE_TEST_SLOW_WRITE": "0.5"})
    deadline = time.time() + 240
    while time.time() < deadline and not [p for p in root.iterdir() if p.name.startswith(".v2.tmp-")]:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert visible(root) == {"v1", "latest"}
    assert (root / "latest").resolve().name == "v1"
    assert assert_complete(root / "latest") == before
    # A rerun reclaims the dead process's temp dir and publishes v2.
    assert run_cli(cfg, "--release-version", "v2") == 0
    assert visible(root) == {"v1", "v2", "latest"}
    assert assert_complete(root / "latest")["version"] == "v2"
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]  # the killed run's half release is gone


def test_a_promotion_stopped_before_latest_moved_is_finished_by_a_rerun(gated, tmp_path, monkeypatch):
    """The release folder published, then the run stopped before `latest` was swapped: a rerun with the same inputs
    (the default version, which names the key) finishes the swap instead of refusing the existing version."""
    from qmerge.stages import promote

    cfg = gate_config(tmp_path, gated)
    assert run_cli(cfg) == 0
    root = tmp_path / "releases" / "tiny"
    first = (root / "latest").resolve().name
    cfg.write_text(cfg.read_text().replace(str(gated["adapter"]), str(gated["fragile"])))
    real = promote.swap_symlink

    def stop(*args):
        raise OSError("disk went away")

    monkeypatch.setattr(promote, "swap_symlink", stop)
    assert run_cli(cfg) == 1
    (published,) = visible(root) - {first, "latest"}
    assert (root / "latest").resolve().name == first
    monkeypatch.setattr(promote, "swap_symlink", real)
    assert run_cli(cfg) == 0
    assert (root / "latest").resolve().name == published
    assert assert_complete(root / "latest")["version"] == published


def test_existing_version_is_never_overwritten(gated, tmp_path, capsys):
    cfg = gate_config(tmp_path, gated)
    assert run_cli(cfg, "--release-version", "v1") == 0
    root = tmp_path / "releases" / "tiny"
    before = {p.name: p.read_bytes() for p in (root / "v1").iterdir()}
    cfg.write_text(cfg.read_text().replace(str(gated["adapter"]), str(gated["fragile"])))
    assert run_cli(cfg, "--release-version", "v1") == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (root / "v1").iterdir()} == before


def _merge_result(work: Path) -> dict:
    (d,) = [d for d in (work / "merge").iterdir() if (d / "done.json").is_file()]
    return json.loads((d / "done.json").read_text())["result"]


def test_into_original_reports_kl_but_gates_on_ppl_and_retention(gated, tmp_path):
    cfg = gate_config(tmp_path, gated, merge={"into": "original"})
    code = run_cli(cfg)
    (d,) = [d for d in (tmp_path / "work" / "gate").iterdir() if (d / "done.json").is_file()]
    report = json.loads((d / "report.json").read_text())
    assert report["into"] == "original"
    names = [c["name"] for c in report["gate"]["checks"]]
    assert "kl" not in names and "ppl_ratio" in names
    assert report["eval"]["candidates"]["merged"]["kl"]["mean"]["value"] > 0
    assert any("different model by design" in n for n in report["gate"]["notes"])
    # weight-space retention against the base the merge added ΔW to (the original weights here, not W_nf4, which
    # moved every tensor's figure by ⟨W_orig − W_nf4, ΔW⟩/‖ΔW‖²): only the bf16 storage rounding is left
    per_tensor = report["weight_retention"]["merged"]["layers"].values()
    assert per_tensor and max(abs(r - 1) for r in per_tensor) < 2e-4, sorted(per_tensor)[:3]
    # The adapter is strong (‖ΔW‖/‖W‖ ≈ 1.5): NF4's error costs ~1 % perplexity against a 2 % limit (measured
    # 1.009, upper bound 1.012) and retention stays ~0.99. So the gate passes and the release is published.
    assert report["gate"]["passed"], report["gate"]
    assert code == 0


def test_into_auto_scores_both_on_the_select_split(gated, tmp_path):
    cfg = gate_config(tmp_path, gated, merge={"into": "auto", "select": str(gated["select"])})
    code = run_cli(cfg)
    sel = _merge_result(tmp_path / "work")["selection"]
    assert set(sel["mean_nll"]) == {"nf4", "original"}
    assert sel["chosen"] == min(sel["mean_nll"], key=sel["mean_nll"].get)
    # The adapter was trained on W_nf4 and is merged in float32: into "nf4" is the model as trained, which
    # "original" (no NF4 error) cannot beat on held-out text (measured 3.570 vs 3.575 nats).
    assert sel["chosen"] == "nf4"
    (d,) = [d for d in (tmp_path / "work" / "gate").iterdir() if (d / "done.json").is_file()]
    report = json.loads((d / "report.json").read_text())
    assert report["into"] == sel["chosen"] and report["selection"]["mean_nll"] == sel["mean_nll"]
    assert report["gate"]["passed"], report["gate"]
    assert code == 0


@pytest.mark.parametrize("select,windows,needle", [("heldout", 8, "share documents 200:260"), ("select", 100000, "are needed")])
def test_auto_refuses_a_select_text_it_cannot_use_before_merging(gated, tmp_path, capsys, select, windows, needle):
    """The gate's own eval split, or too few windows: exit 2 from resolve (both were found after the two merges)."""
    merge = {"into": "auto", "select": str(gated[select]), "select_windows": windows}
    assert run_cli(gate_config(tmp_path, gated, merge=merge)) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "work" / "merge").exists()


def test_auto_without_a_gate_checks_its_selection_windows_fit_the_context(tmp_path, capsys):
    """Without [gate] the selection windows are 256 tokens: a model of 64 positions is exit 2 from resolve (it
    crashed in the position embedding after both merges, exit 1)."""
    from tests.conftest import make_adapter, make_base, save_char_tokenizer, write_text_spec

    base = make_base(tmp_path / "gpt2", arch="gpt2")
    save_char_tokenizer(base)
    adapter = make_adapter(base, tmp_path / "a", target_modules=["c_attn"], fan_in_fan_out=True)
    merge = {"into": "auto", "select": str(write_text_spec(tmp_path, "select", "150:200"))}
    assert run_cli(write_config(tmp_path, base, [(adapter, 1.0)], merge=merge)) == 2
    err = capsys.readouterr().err
    assert "the selection windows' length (gate.seq_len; without [gate]) = 256 is longer than the model's context " \
           "(64 positions)" in err and "add a [gate] with seq_len = 64 or less" in err
    assert not (tmp_path / "work" / "merge").exists()


def test_original_on_prequantized_base_is_bad_input(tmp_path, tiny_llama, capsys):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.conftest import make_adapter

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=q, device_map="cpu").save_pretrained(
        tmp_path / "bnb")
    adapter = make_adapter(tiny_llama, tmp_path / "a")
    cfg = write_config(tmp_path, tmp_path / "bnb", [(adapter, 1.0)], merge={"into": "original"})
    assert run_cli(cfg) == 2
    assert "pre-quantized" in capsys.readouterr().err


def _released(tmp_path: Path, gated: dict) -> tuple[Path, Path]:
    cfg = gate_config(tmp_path, gated)
    return cfg, tmp_path / "releases" / "tiny"


def test_release_hardlinks_the_gated_artifact_on_one_filesystem(gated, tmp_path):
    cfg, root = _released(tmp_path, gated)
    assert run_cli(cfg) == 0
    release = root / "latest"
    manifest = assert_complete(release)
    merged = next(d for d in (tmp_path / "work" / "merge").iterdir() if (d / "done.json").is_file())
    shard = release / "model.safetensors"
    assert shard.stat().st_ino == (merged / "model.safetensors").stat().st_ino  # one inode, no second copy
    assert not shard.stat().st_mode & 0o222  # read-only: neither name can be edited in place
    assert "model.safetensors" in manifest["files"]


def test_release_copies_when_it_cannot_link(gated, tmp_path, monkeypatch):
    import qmerge.stages.promote as promote

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(promote.os, "link", no_link)
    cfg, root = _released(tmp_path, gated)
    assert run_cli(cfg) == 0
    merged = next(d for d in (tmp_path / "work" / "merge").iterdir() if (d / "done.json").is_file())
    shard = root / "latest" / "model.safetensors"
    assert shard.stat().st_ino != (merged / "model.safetensors").stat().st_ino
    assert shard.read_bytes() == (merged / "model.safetensors").read_bytes()
    assert_complete(root / "latest")


def test_release_without_room_is_exit_2_and_publishes_nothing(gated, tmp_path, monkeypatch, capsys):
    import collections

    import qmerge.stages.promote as promote

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(promote.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 1024))
    cfg, root = _released(tmp_path, gated)
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert "GiB free" in err and "fix:" in err
    assert not [p for p in root.iterdir() if not p.name.startswith(".")]


def test_card_names_a_hub_base_only_where_an_adapter_gives_one(tmp_path: Path) -> None:
    """The Hub takes `base_model` for a repository id only: an adapter's "org/name" goes there; a base known by
    its file or folder alone is named in the card's text, not in its metadata (an invalid card otherwise)."""
    import yaml

    from qmerge.stages.promote import front_matter, model_card

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    manifest = {"artifacts": {}, "final": "merged", "qmerge_version": "0.1.0", "name": "rel", "version": "v1",
                "into": "nf4", "gate": {"verdict": "pass"},
                "provenance": {"adapters": [{"path": str(adapter)}], "base_gguf": None,
                               "base": {"folder": str(tmp_path / "Llama-3.1-8B")}}}
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/data/llama-3.1-8b"}))
    meta = yaml.safe_load("\n".join(front_matter(manifest)).split("---")[1])
    assert "base_model" not in meta and "base_model_relation" not in meta and meta["library_name"] == "transformers"
    assert "base `Llama-3.1-8B`" in model_card(manifest)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    meta = yaml.safe_load("\n".join(front_matter(manifest)).split("---")[1])
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B" and meta["base_model_relation"] == "finetune"
    assert "base `meta-llama/Llama-3.1-8B`" in model_card(manifest)


def test_a_promotion_waits_for_another_of_the_name_however_long_it_takes(tmp_path: Path, monkeypatch) -> None:
    """No deadline on the release lock (a 600 s one made a run that waited behind a long cross-filesystem copy exit
    1): the waiter takes the lock when the holder lets go, and a holder that dies lets go (flock)."""
    import qmerge.io.atomic as atomic
    from qmerge.stages.promote import release_lock

    def deadline(*args):
        raise AssertionError("the release lock waited with a deadline")

    monkeypatch.setattr(atomic, "_flock_with_deadline", deadline)
    root = tmp_path / "rel"
    root.mkdir()
    hold = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
            "print('held', flush=True)\ntime.sleep(1.5)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(root / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with release_lock(root):
        waited = time.monotonic() - start
    assert holder.wait(timeout=10) == 0 and waited > 1.0
