"""Multi-adapter releases end to end: every merge method's stored weights equal the float64 transcription of its
paper (tests/ops/test_combine.py `oracle`) on the adapters' exact ΔWᵢ, the same seed gives the same bytes,
combinations qmerge cannot define exactly are refused, and the gate decides task by task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qmerge.ops.combine import dare_mask
from tests.conftest import make_adapter, make_base, run_cli, scaled_adapter, write_config
from tests.ops.test_combine import oracle
from tests.stages.test_merge_exact import finished

EPS32 = torch.finfo(torch.float32).eps


def _merged(folder: Path, base: Path, adapters, **merge) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = write_config(folder, base, adapters, merge={"dtype": "float32", **merge})
    assert run_cli(cfg) == 0
    return load_file(finished(folder / "work", "merge") / "model.safetensors")


def _delta64(adapter: Path, module: str) -> torch.Tensor | None:
    tensors = load_file(adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    key = f"base_model.model.{module}.lora_A.weight"
    if key not in tensors:
        return None
    a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
    return cfg["lora_alpha"] / cfg["r"] * (b @ a)


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("three")
    return [make_adapter(tiny_llama, root / "a1", seed=1),
            make_adapter(tiny_llama, root / "a2", seed=2, target_modules=["q_proj", "o_proj", "down_proj"]),
            make_adapter(tiny_llama, root / "a3", seed=3, b_std=0.02)]


@pytest.fixture(scope="module")
def w_nf4(tmp_path_factory, tiny_llama, three) -> dict[str, torch.Tensor]:
    """The base as trained, stored exactly: a linear merge with every weight 0 (W_nf4 + 0 in float32 is W_nf4)."""
    return _merged(tmp_path_factory.mktemp("zero"), tiny_llama, [(a, 0.0) for a in three])


@pytest.mark.parametrize("method,density,sign", [("ties", 0.5, "total"), ("ties", 0.3, "frequency"),
                                                 ("magnitude_prune", 0.4, "total"), ("dare_linear", 0.5, "total"),
                                                 ("dare_ties", 0.6, "total")])
def test_every_method_equals_its_oracle(tmp_path, tiny_llama, three, w_nf4, method, density, sign):
    weights = [1.0, 0.6, 1.5]
    merged = _merged(tmp_path, tiny_llama, list(zip(three, weights)), method=method, density=density,
                     majority_sign_method=sign, seed=7)
    checked = 0
    for name, w in w_nf4.items():
        module = name.removesuffix(".weight")
        deltas = [_delta64(a, module) for a in three]
        if all(d is None for d in deltas):
            assert torch.equal(merged[name], w), f"{name} changed though no adapter touches it"
            continue
        deltas = [torch.zeros(w.shape, dtype=torch.float64) if d is None else d for d in deltas]
        keep = [dare_mask(w.shape, density, 7, i, name) for i in range(3)] \
            if method.startswith("dare") else None
        want = oracle(deltas, weights, method, density, sign, keep)
        got = merged[name].double() - w.double()
        tol = 1e-6 * float(want.abs().max()) + 2 * EPS32 * float(w.abs().max())
        assert float((got - want).abs().max()) <= tol, name
        assert float(want.abs().max()) > 100 * tol  # the delta is far above the tolerance: a lost delta fails
        checked += 1
    assert checked >= 6


PRUNING = (("ties", 0.4, "total"), ("ties", 0.3, "frequency"), ("magnitude_prune", 0.3, "total"),
           ("dare_ties", 0.5, "total"), ("dare_linear", 0.4, "total"))


def _few_valued(src: Path, dst: Path) -> Path:
    """A copy of adapter `src` whose factors take 7 values each: its products BA repeat values, so its top-k
    thresholds fall on ties of which only some are kept, and the bracket pass counts them block by block."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    shutil.copyfile(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: torch.round(v / v.abs().max() * 3) / 3 * v.abs().max() for k, v in tensors.items()},
              str(dst / "adapter_model.safetensors"))
    return dst


def _products_and_scales_change_no_byte(tmp_path: Path, base: Path, adapters) -> None:
    """For every pruning method, the merge (each product BᵢAᵢ handed to `combine` with its scale, thresholds from
    `scaled_threshold`) stores the bytes of thresholds found by `combine` and of ΔWᵢ formed first by `lora_delta`;
    the fused threshold pass runs for the top-k methods."""
    from qmerge import merging
    from qmerge.ops import combine as combine_module

    real, each_delta = combine_module.scaled_threshold, merging._each_delta
    adapters = [(_few_valued(adapters[0][0], tmp_path / "few"), adapters[0][1]), *adapters[1:]]

    def formed_first(*args, unscaled=False, density=None, **kwargs):  # ΔWᵢ = lora_delta's, no scales
        return each_delta(*args, **kwargs)

    for method, density, sign in PRUNING:
        settings = {"method": method, "density": density, "majority_sign_method": sign, "seed": 5}
        calls = []  # whether ties at each threshold were counted per block
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(merging, "scaled_threshold",
                          lambda *args: calls.append((found := real(*args)) and found.by_block is not None) or found)
            fused = _merged(tmp_path / f"{method}-{sign}-fused", base, adapters, **settings)
        with pytest.MonkeyPatch.context() as patch:  # `combine` finds the thresholds itself
            patch.setattr(merging, "scaled_threshold", lambda *args: None)
            plain = _merged(tmp_path / f"{method}-{sign}-plain", base, adapters, **settings)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(merging, "_each_delta", formed_first)
            first = _merged(tmp_path / f"{method}-{sign}-first", base, adapters, **settings)
        assert (len(calls) >= 6 and any(calls)) == (not method.startswith("dare"))
        assert fused.keys() == plain.keys() == first.keys()
        for other in (plain, first):
            assert all(torch.equal(fused[k].view(torch.int32), other[k].view(torch.int32)) for k in fused), method


def test_products_and_scales_change_no_byte(tmp_path, tiny_llama, three, monkeypatch):
    """The merge hands `combine` each adapter's product BᵢAᵢ and its scale (ΔWᵢ formed in the combination's loop,
    never written out) and, for TIES and magnitude_prune, the top-k thresholds found from the products
    (`scaled_threshold`, the sampled bracket forced onto the tiny model's tensors): the stored bytes equal those of
    thresholds found by `combine` and of ΔWᵢ formed first by `lora_delta`, for every pruning method."""
    from qmerge.ops import combine as combine_module

    monkeypatch.setattr(combine_module, "SAMPLE", 64)
    monkeypatch.setattr(combine_module, "BLOCK", 999)
    _products_and_scales_change_no_byte(tmp_path, tiny_llama, list(zip(three, [1.0, 0.6, 1.5])))


def test_fan_in_fan_out_weights_take_the_products_and_their_scales(tmp_path, monkeypatch):
    """The same on GPT-2's Conv1D weights, whose ΔW is (BA)ᵀ: a threshold found on the product holds for it (its
    per-block tie counts, in the product's order, are dropped there)."""
    from qmerge.ops import combine as combine_module

    monkeypatch.setattr(combine_module, "SAMPLE", 64)
    monkeypatch.setattr(combine_module, "BLOCK", 999)
    base = make_base(tmp_path / "gpt2", arch="gpt2", dtype="float32")
    adapters = [(make_adapter(base, tmp_path / f"a{i}", seed=i, target_modules=["c_attn", "c_proj"],
                              fan_in_fan_out=True), weight) for i, weight in ((1, 1.0), (2, 0.6), (3, 1.5))]
    _products_and_scales_change_no_byte(tmp_path, base, adapters)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_llama, three):
    runs = [_merged(tmp_path / f"run{i}", tiny_llama, [(a, 1.0) for a in three], method="dare_ties", density=0.5,
                    seed=seed) for i, seed in enumerate((3, 3, 4))]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_refused_combinations(tmp_path, tiny_llama, three, capsys):
    for sub in "dsn":
        (tmp_path / sub).mkdir()
    dora = make_adapter(tiny_llama, tmp_path / "dora", use_dora=True)
    cfg = write_config(tmp_path / "d", tiny_llama, [(three[0], 1.0), (dora, 1.0)])
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and str(dora) in err  # names the adapter
    (tmp_path / "dp").mkdir()
    cfg = write_config(tmp_path / "dp", tiny_llama, [(dora, 1.0)], merge={"method": "ties", "density": 0.5})
    assert run_cli(cfg) == 2  # one DoRA adapter, pruned: no exact meaning either
    err = capsys.readouterr().err
    assert "DoRA" in err and str(dora) in err and "prune" in err
    saved = make_adapter(tiny_llama, tmp_path / "saved", modules_to_save=["lm_head"])
    cfg = write_config(tmp_path / "s", tiny_llama, [(three[0], 1.0), (saved, 1.0)], merge={"method": "ties",
                                                                                           "density": 0.5})
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert "saves whole tensors" in err and "saved" in err
    cfg = write_config(tmp_path / "n", tiny_llama, [(three[0], 1.0), (three[1], -1.0)], merge={"method": "ties"})
    assert run_cli(cfg) == 2
    assert "non-negative" in capsys.readouterr().err
    for weight in ("nan", "inf", "-inf"):  # a weight that is not a number would write non-finite weights
        (tmp_path / weight).mkdir()
        cfg = write_config(tmp_path / weight, tiny_llama, [(three[0], 1.0), (three[1], weight)])
        assert run_cli(cfg) == 2
        err = capsys.readouterr().err
        assert "weight" in err and str(cfg) in err and "finite" in err
        assert not (tmp_path / weight / "work" / "merge").exists()


# --- the per-task gate ------------------------------------------------------------------------------------------

def _tasks_config(folder: Path, g: dict, weight_strong: float, strong_required: bool = True) -> Path:
    """Two tasks: the trained adapter ("strong") and its ×0.03 copy ("faint"), each scored on held-out text against
    the NF4 base + itself alone."""
    faint = g["root"] / "adapter-faint"
    if not faint.exists():
        scaled_adapter(g["adapter"], faint, 0.03)
    lines = ['name = "tasks"', f'work_dir = "{folder / "work"}"', "[base]", f'path = "{g["base"]}"', "[base.nf4]",
             'load_dtype = "float32"', 'compute_dtype = "float32"',
             "[[adapters]]", f'path = "{g["adapter"]}"', f"weight = {weight_strong}", 'name = "strong"',
             f'eval = "{g["heldout"]}"', f"required = {'true' if strong_required else 'false'}",
             "[[adapters]]", f'path = "{faint}"', 'name = "faint"', f'eval = "{g["heldout"]}"',
             "[merge]", 'dtype = "float32"', 'device = "cpu"',
             "[gate]", "windows = 24", "seq_len = 64", "batch_size = 8", "[output]", f'dir = "{folder / "rel"}"']
    path = folder / "tasks.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _report(folder: Path) -> dict:
    return json.loads((finished(folder / "work", "gate") / "report.json").read_text())


def test_gate_rejects_the_task_that_did_not_survive_and_names_it(tmp_path, gated, capsys):
    """The release drops the strong adapter (weight 0): the faint task survives exactly, the strong one does not."""
    assert run_cli(_tasks_config(tmp_path, gated, 0.0)) == 3
    out = capsys.readouterr().out
    report = _report(tmp_path)
    strong, faint = report["tasks"]["strong"], report["tasks"]["faint"]
    assert strong["candidates"]["merged"]["retention"]["value"] < 0.5  # measured 0.28: the faint copy's share
    assert faint["candidates"]["merged"]["retention"]["value"] == pytest.approx(1.0, abs=0.05)
    assert faint["candidates"]["merged"]["kl"]["mean"]["value"] < 1e-6
    failed = [c["name"] for c in report["gate"]["checks"] if c["outcome"] == "fail"]
    assert failed and all(name.startswith("task strong:") for name in failed)
    assert "task strong" in out
    weights = report["weight_retention"]["merged"]["tasks"]
    assert weights["faint"] == pytest.approx(1.0, abs=1e-4)
    assert weights["strong"] == pytest.approx(0.03, abs=1e-4)  # the faint delta is 0.03 × the strong one


def test_a_task_not_required_is_reported_not_gated(tmp_path, gated):
    assert run_cli(_tasks_config(tmp_path, gated, 0.0, strong_required=False)) == 0
    report = _report(tmp_path)
    assert report["gate"]["verdict"] == "pass"
    assert any(n.startswith("not required: task strong:") and n.endswith("fail") for n in report["gate"]["notes"])
    manifest = json.loads((tmp_path / "rel" / "tasks" / "latest" / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"strong", "faint"}


def test_a_gate_with_no_required_task_and_no_eval_text_is_exit_2(tmp_path, gated, capsys):
    """Every task reported only and no gate.eval: nothing on eval text would decide (the merge's own weight-space
    retention is exact by construction), so the config is refused before anything runs."""
    cfg = _tasks_config(tmp_path, gated, 1.0, strong_required=False)
    text = cfg.read_text().replace('name = "faint"', 'name = "faint"\nrequired = false')
    cfg.write_text(text)
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert "every task is required = false" in err and str(cfg) in err
    assert not (tmp_path / "work").exists()


def test_a_release_gated_on_its_tasks_alone_is_registered_with_each_tasks_figures(tmp_path, gated):
    """No gate.eval, every figure on the tasks' own texts: the registry records the run with each task's figures
    (task.<name>.<metric>) and its token ids' sha256."""
    from mlflow import MlflowClient

    cfg = _tasks_config(tmp_path, gated, 1.0)
    cfg.write_text(cfg.read_text().replace("[output]\n", '[output]\nregistry = "mlflow"\n'))
    assert run_cli(cfg) in (0, 3)
    uri = f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = c.search_runs([c.get_experiment_by_name("qmerge/tasks").experiment_id])
    report = _report(tmp_path)
    strong = report["tasks"]["strong"]["candidates"]["merged"]
    assert run.data.metrics["task.strong.kl.mean"] == pytest.approx(strong["kl"]["mean"]["value"])
    assert {"task.faint.ppl_ratio", "task.strong.eval_windows", "weight_retention"} <= set(run.data.metrics)
    assert run.data.tags["qmerge.sha256.task_token_ids.faint"] == report["tasks"]["faint"]["tokens"]["sha256"]
