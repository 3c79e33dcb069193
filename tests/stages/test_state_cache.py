"""evaluate's hidden-state cache (qmerge/io/state_cache.py): a view scored from cached last-layer states gives the
same report bytes as one streamed through its layers; the NF4 base is shared by every adapter of a base; a forced
evaluate and a damaged entry recompute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import gate_config, run_cli, write_text_spec


def _evaluations(work: Path) -> dict[str, tuple[bytes, dict]]:
    """{evaluate key: (report.json bytes, which views were reused or computed on the gate's text)}."""
    out = {}
    for d in (work / "evaluate").iterdir():
        if (d / "done.json").is_file():
            out[d.name] = ((d / "report.json").read_bytes(),
                           json.loads((d / "done.json").read_text())["result"]["states"]["gate"])
    return out


def _run(cfg: Path, work: Path, *args: str) -> tuple[bytes, dict]:
    """Runs `cfg`; the evaluation it made (the one new or rebuilt under `work`)."""
    before = _evaluations(work) if (work / "evaluate").is_dir() else {}
    assert run_cli(cfg, *args) == 0
    changed = [v for k, v in _evaluations(work).items() if before.get(k) != v]
    (only,) = changed
    return only


def _config(folder: Path, gated, adapter: str, work: Path, quantize: bool = False) -> Path:
    folder.mkdir()
    extra = ""
    if quantize:  # after [gate]'s lines: a [quantize] table of its own
        cal = write_text_spec(folder, "cal", "100:140")
        extra = f'[quantize]\ncalibration = "{cal}"\nsamples = 16\nseq_len = 64\ngroup_size = 32\n'
    cfg = gate_config(folder, gated, adapter=gated[adapter], gate=extra)
    cfg.write_text(cfg.read_text().replace(f'work_dir = "{folder / "work"}"', f'work_dir = "{work}"'))
    return cfg


@pytest.fixture(scope="module")
def shared(gated, tmp_path_factory) -> dict:
    """One work dir: the strong adapter's build, then the rslora adapter's build on the same base."""
    root = tmp_path_factory.mktemp("states")
    work = root / "work"
    strong = _config(root / "strong", gated, "adapter", work)
    rslora = _config(root / "rslora", gated, "rslora", work)
    return {"strong": strong, "work": work, "first": _run(strong, work), "rslora": _run(rslora, work)}


def test_a_fresh_evaluate_computes_every_view_and_keeps_its_states(shared):
    _, states = shared["first"]
    assert states == {"reference": "computed", "base": "computed", "merged": "computed"}
    entries = list((shared["work"] / "states").iterdir())
    assert len(entries) == 5  # the strong build's three views, the rslora build's reference and merge
    assert all((e / "states.safetensors").is_file() and (e / "meta.json").is_file() for e in entries)


def test_the_nf4_base_is_shared_across_adapters_bit_for_bit(shared, gated, tmp_path):
    """The rslora build found the strong build's base states: its report equals the one computed alone."""
    report, states = shared["rslora"]
    assert states == {"reference": "computed", "base": "reused", "merged": "computed"}
    alone, states = _run(_config(tmp_path / "alone", gated, "rslora", tmp_path / "work"), tmp_path / "work")
    assert states == {"reference": "computed", "base": "computed", "merged": "computed"}
    assert alone == report


def test_reused_states_give_the_same_report_bytes(shared):
    work = shared["work"]
    for name in ("evaluate", "gate"):  # both builds' evaluations go; the strong build evaluates again, unforced
        shutil.rmtree(work / name)
    report, states = _run(shared["strong"], work)
    assert states == {"reference": "reused", "base": "reused", "merged": "reused"}
    assert report == shared["first"][0]


def test_a_gptq_target_streams_only_its_quantized_model(shared, gated, tmp_path):
    """After the dense build, the GPTQ build of the same adapter in the same work dir reuses the reference, the
    base and the merge, and its report equals the one the same build makes in a fresh work dir."""
    report, states = _run(_config(tmp_path / "gptq", gated, "adapter", shared["work"], quantize=True),
                          shared["work"])
    assert states == {"reference": "reused", "base": "reused", "merged": "reused", "quantized": "computed"}
    alone, states = _run(_config(tmp_path / "alone", gated, "adapter", tmp_path / "work", quantize=True),
                         tmp_path / "work")
    assert set(states.values()) == {"computed"}
    assert alone == report


def test_the_key_holds_the_thread_count_and_the_reader_packages(tmp_path):
    import torch

    from qmerge.io.state_cache import StateCache

    cache = StateCache(tmp_path)
    assert {"torch", "peft", "gguf", "compressed-tensors", "safetensors", "numpy"} <= set(cache.versions)
    threads = torch.get_num_threads()
    first = cache.key({"model": 1}, True, "ids", "cpu")
    try:
        torch.set_num_threads(threads + 1)
        assert cache.key({"model": 1}, True, "ids", "cpu")[0] != first[0]
    finally:
        torch.set_num_threads(threads)
    assert cache.key({"model": 1}, True, "ids", "cpu") == first
    assert cache.key({"model": 1}, False, "ids", "cpu")[0] != first[0]


def test_forced_evaluate_and_damaged_entries_recompute(shared):
    cfg, work = shared["strong"], shared["work"]
    report, states = _run(cfg, work, "--from", "evaluate")
    assert set(states.values()) == {"computed"}
    assert report == shared["first"][0]
    for entry in (work / "states").iterdir():  # one flipped bit in the data: still a valid safetensors file
        data = bytearray((entry / "states.safetensors").read_bytes())
        data[-1] ^= 1
        (entry / "states.safetensors").write_bytes(bytes(data))
    for name in ("evaluate", "gate"):
        shutil.rmtree(work / name)
    again, states = _run(cfg, work)
    assert set(states.values()) == {"computed"}
    assert again == report
    from qmerge.io.paths import sha256_file

    intact = 0
    for entry in (work / "states").iterdir():  # the strong build's three were replaced by intact ones
        recorded = json.loads((entry / "meta.json").read_text())["sha256"]
        intact += sha256_file(entry / "states.safetensors") == recorded
    assert intact == 3  # the other builds' entries stay damaged until those builds read them
