"""The compensation adapter end to end: `[quantize] compensate` writes a PEFT LoRA folder inside the GPTQ
artifact that PEFT itself loads onto the dequantized GPTQ model, reducing each linear's output error; evaluate
scores "quantized" (with it, as served) next to "quantized-alone"; the release ships it and says how to load it.
A tiny llama with a char tokenizer and a random adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qmerge.io.compensation import CompensatedSource, compensation_folder, read_factors
from qmerge.io.gptq_checkpoint import QUANTIZED_SUFFIXES, DequantizedReader, unpack_linear
from qmerge.io.safetensors_io import CheckpointReader
from qmerge.io.sources import artifact_bytes
from qmerge.layerwise import LayerBatch, LayerwiseModel, run_layer
from qmerge.models import load_dequantized
from tests.conftest import logits, run_cli, write_text_spec
from tests.stages.test_quantize import quantize_config, setup, stage_dir  # noqa: F401  (setup: a fixture)

RANK = 4
LENIENT = "max_kl = 10.0\nmax_ppl_increase = 10.0\nmin_delta_retention = -100.0\n"


def compensated_config(folder: Path, s: dict, gate: bool = False, **quantize) -> Path:
    cfg = quantize_config(folder, s, **quantize)
    text = cfg.read_text() + f"compensate = {{ rank = {RANK} }}\n"
    if gate:
        heldout = write_text_spec(folder, "heldout", "200:230")
        text += f'[gate]\neval = "{heldout}"\nwindows = 8\nseq_len = 64\nbatch_size = 8\n{LENIENT}'
    cfg.write_text(text)
    return cfg


@pytest.fixture(scope="module")
def compensated(setup, tmp_path_factory) -> dict:  # noqa: F811
    folder = tmp_path_factory.mktemp("compensated")
    assert run_cli(compensated_config(folder, setup, gate=True)) == 0
    work = folder / "work"
    return {"folder": folder, "out": stage_dir(work, "quantize"), "evaluate": stage_dir(work, "evaluate"),
            "release": (folder / "releases" / "tiny" / "latest").resolve()}


@pytest.fixture(scope="module")
def compensated_asymmetric(setup, tmp_path_factory) -> Path:  # noqa: F811
    """The build README recommends for keeping the fine-tune: zero points per group, GPTAQ, compensation."""
    folder = tmp_path_factory.mktemp("compensated-asym")
    assert run_cli(compensated_config(folder, setup, sym=False, gptaq={"alpha": 1.0})) == 0
    return stage_dir(folder / "work", "quantize")


def test_peft_loads_the_adapter_onto_the_gptq_model_and_matches_the_streamed_model(compensated, tokens):
    assert_served_as_streamed(compensated["out"], tokens)


def test_an_asymmetric_gptaq_build_is_served_as_evaluated(compensated_asymmetric, tokens):
    """Zero points per group (sym = false) reach PEFT's serving path and the streamed evaluation alike."""
    config = json.loads((compensated_asymmetric / "config.json").read_text())["quantization_config"]
    assert config["sym"] is False
    reader = CheckpointReader(compensated_asymmetric)
    zeros = unpack_linear({k: reader.get(f"model.layers.0.self_attn.q_proj.{k}") for k in QUANTIZED_SUFFIXES},
                          config["bits"])[2]
    assert zeros.unique().numel() > 1  # really asymmetric: a symmetric grid has one zero point
    assert_served_as_streamed(compensated_asymmetric, tokens)


def assert_served_as_streamed(out: Path, tokens: torch.Tensor) -> None:
    """PEFT loads the compensation onto the dequantized GPTQ model (as served), where it changes the logits, and
    the layer-by-layer run evaluate uses gives the same logits with the adapter and without."""
    from peft import PeftModel

    folder = compensation_folder(out)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK and config["peft_type"] == "LORA"
    served = load_dequantized(out)
    alone = logits(served, tokens)
    assert len(config["target_modules"]) == 7 * served.config.num_hidden_layers
    model = PeftModel.from_pretrained(served, str(folder)).eval()
    with_adapter = logits(model, tokens)
    assert (with_adapter - alone).abs().max() > 1e-4  # the adapter really changes the outputs

    runner = LayerwiseModel.from_folder(out)
    for on, want in ((True, with_adapter), (False, alone)):
        with runner.adapters(on):
            batches = runner.layer_inputs(tokens, 8)
            for i in range(len(runner.layers)):
                layer = runner.load_layer(i)
                batches = [LayerBatch(run_layer(layer, b), b.kwargs) for b in batches]
                runner.free_layer(i)
            runner.load_head()
            got = torch.cat([runner.logits(b.hidden) for b in batches])
            runner.free_head()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_adapter_reduces_every_linears_output_error(compensated):
    report = json.loads((compensated["out"] / "quantize_report.json").read_text())
    rows = [m for layer in report["layers"].values() for m in layer.values()]
    assert len(rows) > 0 and all(m["compensated_relative"] < m["relative"] for m in rows)
    assert report["mean_compensated_relative_error"] < report["mean_relative_error"]


def test_evaluate_scores_quantized_with_and_without_the_adapter(compensated):
    report = json.loads((compensated["evaluate"] / "report.json").read_text())
    cands = report["eval"]["candidates"]
    assert {"quantized", "quantized-alone"} <= set(cands)
    kl = {c: cands[c]["kl"]["mean"]["value"] for c in ("quantized", "quantized-alone")}
    assert kl["quantized"] < kl["quantized-alone"]
    assert "compensation" in report["protocol"]
    assert report["shipped"] == ["quantized"]  # "alone" is reported, never shipped
    w = report["weight_retention"]  # the weight-space view of "quantized" includes B·A (test below)
    assert w["quantized"]["layers"] != w["quantized-alone"]["layers"]
    done = json.loads((compensated["evaluate"] / "done.json").read_text())
    sizes = done["result"]["bytes"]
    extra = sum(f.stat().st_size for f in compensation_folder(compensated["out"]).iterdir())
    assert sizes["quantized"] - sizes["quantized-alone"] == extra > 0


def test_the_release_ships_the_adapter_and_says_how_to_serve_it(compensated):
    release = compensated["release"]
    out = compensated["out"]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (release / "compensation" / name).read_bytes() == (out / "compensation" / name).read_bytes()
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["artifacts"]["quantized"]["compensation"] == "compensation"
    assert "compensation/adapter_model.safetensors" in manifest["files"]
    assert manifest["artifacts"]["quantized"]["bytes"] == artifact_bytes(out)
    assert 'PeftModel.from_pretrained(model, "compensation")' in (release / "README.md").read_text()


def rerun_elsewhere(first: Path, elsewhere: Path) -> Path:
    """The config of the run in `first`, run again with its work and release dirs in `elsewhere`: the quantize
    stage's folder there."""
    cfg = elsewhere / "qmerge.toml"
    cfg.write_text((first / "qmerge.toml").read_text().replace(str(first / "work"), str(elsewhere / "work"))
                   .replace(str(first / "releases"), str(elsewhere / "releases")))
    assert run_cli(cfg) == 0
    return stage_dir(elsewhere / "work", "quantize")


def test_same_inputs_same_bytes_and_an_own_key(setup, compensated, tmp_path):  # noqa: F811
    again = rerun_elsewhere(compensated["folder"], tmp_path)
    assert again.name == compensated["out"].name
    for name in ("model.safetensors", "compensation/adapter_model.safetensors", "compensation/adapter_config.json"):
        assert (again / name).read_bytes() == (compensated["out"] / name).read_bytes()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_cli(quantize_config(plain, setup)) == 0
    assert stage_dir(plain / "work", "quantize").name != again.name


def test_the_weight_space_view_adds_b_times_a(compensated):
    out = compensated["out"]
    plain, comp = DequantizedReader(out), CompensatedSource(DequantizedReader(out), compensation_folder(out))
    factors = read_factors(compensation_folder(out))
    module, (a, b) = next(iter(factors.items()))
    assert a.dtype == torch.bfloat16 and a.shape[0] == RANK
    name = f"{module}.weight"
    torch.testing.assert_close(comp.get(name), plain.get(name) + b.float() @ a.float(), rtol=0, atol=1e-6)
    other = next(n for n in plain.names if n.endswith("norm.weight"))
    assert torch.equal(comp.get(other), plain.get(other))


@pytest.mark.parametrize("extra,match", [
    ('backend = "gptqmodel"\n', "needs quantize.backend"),
    ("", "compressed-tensors ships the GPTQ weights alone"),
])
def test_impossible_combinations_are_exit_2(setup, tmp_path, capsys, extra, match):  # noqa: F811
    cfg = compensated_config(tmp_path, setup, gate=True)
    text = cfg.read_text().replace("[quantize]\n", f"[quantize]\n{extra}")
    if not extra:
        text = text.replace("[output]\n", '[output]\nformats = ["compressed-tensors"]\n')
    cfg.write_text(text)
    assert run_cli(cfg) == 2
    assert match in capsys.readouterr().err


TRAIN = {"epochs": 3, "lr": 1e-2, "windows": 2}


def _layer_settings(train: dict | None):
    from types import SimpleNamespace

    return SimpleNamespace(bits=4, group_size=32, sym=True, desc_act=True, damp=0.01, calibration="x",
                           scale_search="minmax", gptaq=None, static_groups=False,
                           compensate=SimpleNamespace(rank=RANK, dtype="bfloat16",
                                                      train=SimpleNamespace(seed=0, **train) if train else None))


@pytest.mark.parametrize("lockstep", [False, True])
def test_training_lowers_the_layers_error_and_its_outputs_come_after_it(setup, lockstep):  # noqa: F811
    """One layer quantized with the closed-form fit, then again with training on top: the trained layer's reported
    errors are those its outputs really have against the unquantized outputs (before: the fit's outputs), training
    lowered it, the outputs handed on are the trained layer's, the factors were replaced by trained ones and the
    layer's parameters are frozen or not as before."""
    from qmerge.stages.quantize import quantize_layer

    runner = LayerwiseModel.from_folder(setup["base"], "cpu")
    ids = torch.randint(1, 96, (6, 32), generator=torch.Generator().manual_seed(2))
    batches = runner.layer_inputs(ids, 3)
    layer = runner.load_layer(0)
    target = [run_layer(layer, b) for b in batches]
    grads = {n: p.requires_grad for n, p in layer.named_parameters()}
    results, factors = {}, {}
    for mode, train in (("fit", None), ("trained", TRAIN)):
        factors[mode] = {}
        results[mode] = quantize_layer(layer, batches, _layer_settings(train), "layer0", lockstep=lockstep,
                                       factors=factors[mode], unquantized=batches)
        outputs = [run_layer(layer, b) for b in batches]
        assert all(torch.equal(a, b) for a, b in zip(results[mode].outputs, outputs)), mode
        assert {n: p.requires_grad for n, p in layer.named_parameters()} == grads
        runner.free_layer(0)
        layer = runner.load_layer(0)
    assert results["fit"].training is None

    def mse(outs):
        return float(sum((o - t).square().sum() for o, t in zip(outs, target)) / sum(t.numel() for t in target))

    trained = results["trained"].training
    assert trained["mse_before"] == pytest.approx(mse(results["fit"].outputs), rel=1e-4)
    assert trained["mse_after"] == pytest.approx(mse(results["trained"].outputs), rel=1e-4)
    assert trained["mse_after"] < 0.9 * trained["mse_before"]
    assert trained["steps"] == TRAIN["epochs"] * 2 * 2  # 2 batches of 3 windows, 2 windows per step
    assert set(factors["fit"]) == set(factors["trained"]) and len(factors["fit"]) == 7
    for module, (a, b) in factors["trained"].items():
        assert a.dtype == b.dtype == torch.bfloat16
        assert not torch.equal(a, factors["fit"][module][0]) or not torch.equal(b, factors["fit"][module][1])


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory) -> dict:  # noqa: F811
    folder = tmp_path_factory.mktemp("trained")
    cfg = compensated_config(folder, setup)
    text = cfg.read_text().replace(f"compensate = {{ rank = {RANK} }}",
                                   f"compensate = {{ rank = {RANK}, train = {{ epochs = 3, lr = 0.01, windows = 2 }} }}")
    cfg.write_text(text)
    assert run_cli(cfg) == 0
    return {"folder": folder, "out": stage_dir(folder / "work", "quantize")}


def test_trained_compensation_is_reported_shipped_and_keyed(setup, trained, compensated, tmp_path):  # noqa: F811
    report = json.loads((trained["out"] / "quantize_report.json").read_text())
    layers = report["compensation_training"]
    assert len(layers) == len(report["layers"]) > 0
    assert all(t["mse_after"] < t["mse_before"] for t in layers.values())
    shipped, fit = read_factors(compensation_folder(trained["out"])), read_factors(compensation_folder(compensated["out"]))
    assert set(shipped) == set(fit)
    assert all(not torch.equal(shipped[m][0], fit[m][0]) for m in fit)
    assert trained["out"].name != compensated["out"].name  # its own stage key
    out = rerun_elsewhere(trained["folder"], tmp_path)  # the same config elsewhere: the same bytes
    assert out.name == trained["out"].name
    for name in ("model.safetensors", "compensation/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (trained["out"] / name).read_bytes()


def test_training_enters_the_key_and_untrained_keys_stay_as_they_were(setup, tmp_path):  # noqa: F811
    from qmerge.config import load_config
    from qmerge.pipeline import _quantize_slice

    cfg = compensated_config(tmp_path, setup)
    assert _quantize_slice(load_config(cfg))["compensate"] == {"rank": RANK, "dtype": "bfloat16"}
    cfg.write_text(cfg.read_text().replace(f"compensate = {{ rank = {RANK} }}",
                                           f"compensate = {{ rank = {RANK}, train = {{ epochs = 3 }} }}"))
    assert _quantize_slice(load_config(cfg))["compensate"]["train"] == {"epochs": 3, "lr": 1e-3, "windows": 4,
                                                                       "seed": 0}


def test_the_dry_run_estimate_counts_the_training(setup, tmp_path):  # noqa: F811
    """Training keeps the unquantized stream (unless GPTAQ keeps it already), the served weights and a step's
    backward: the quantize stage's estimated peak grows by them, on Llama-2-7B shapes."""
    from qmerge.config import load_config
    from qmerge.estimate import F32, Shape, stage_estimates

    shape = Shape(hidden=4096, intermediate=11008, vocab=32000, layers=32, heads=32, layer_elements=202_383_360,
                  largest_elements=45_088_768, largest_linear=(11008, 4096), max_in_features=11008,
                  output_bytes=13_476_839_424, linear_widths=77_824)
    peaks = {}
    for label, compensate, gptaq in (("fit", "{ rank = 4 }", ""), ("trained", "{ rank = 4, train = {} }", ""),
                                     ("gptaq fit", "{ rank = 4 }", "gptaq = {}\n"),
                                     ("gptaq trained", "{ rank = 4, train = {} }", "gptaq = {}\n")):
        folder = tmp_path / label.replace(" ", "-")
        folder.mkdir()
        cfg = quantize_config(folder, setup)
        cfg.write_text(cfg.read_text() + f"compensate = {compensate}\n{gptaq}")
        peaks[label] = stage_estimates(load_config(cfg), shape)["quantize"]["peak_bytes"]
    stream = 2 * 16 * 64 * 4096 * F32  # samples × seq_len of quantize_config
    assert peaks["trained"] - peaks["fit"] == peaks["gptaq trained"] - peaks["gptaq fit"] + stream
    assert peaks["gptaq trained"] - peaks["gptaq fit"] >= shape.layer_elements * F32


@pytest.mark.parametrize("train", ["{ epochs = 0 }", "{ lr = -1.0 }", "{ windows = 0 }", "{ steps = 3 }"])
def test_bad_training_settings_are_exit_2_naming_the_key(setup, tmp_path, capsys, train):  # noqa: F811
    cfg = quantize_config(tmp_path, setup)
    cfg.write_text(cfg.read_text() + f"compensate = {{ rank = 4, train = {train} }}\n")
    assert run_cli(cfg) == 2
    assert "quantize.compensate.train." in capsys.readouterr().err
    assert not (tmp_path / "work" / "quantize").exists()
