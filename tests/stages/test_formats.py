"""Release formats end to end: each artifact of `output.formats` is written by the export stage, scored by evaluate
from its written bytes, gated on its own, and only the passing ones ship; impossible combinations are exit 2
before anything runs. A tiny random llama with SmolLM2's real tokenizer (the GGUF writer needs a BPE vocab
llama.cpp knows), a random adapter, lee news text."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from qmerge.io.paths import sha256_file
from tests.conftest import make_adapter, run_cli, write_config, write_text_spec
from tests.io.test_gguf_writer import _tiny_smol
from tests.stages.test_merge_exact import finished


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> dict:
    from tests.io.test_gguf_writer import GGUF
    from qmerge.io.gguf import gguf_to_hf

    root = tmp_path_factory.mktemp("formats")
    base = _tiny_smol(root / "base", gguf_to_hf(GGUF, progress=False))
    return {"root": root, "base": base, "adapter": make_adapter(base, root / "adapter", b_std=0.02),
            "heldout": write_text_spec(root, "heldout", "200:230")}


def _config(folder: Path, s: dict, formats: list[str], gate: str = "", quantize: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    extra = f'[gate]\neval = "{s["heldout"]}"\nwindows = 8\nseq_len = 64\nbatch_size = 8\n{gate}\n{quantize}\n'
    cfg = write_config(folder, s["base"], [(s["adapter"], 1.0)], merge={"dtype": "bfloat16"}, extra=extra)
    text = cfg.read_text().replace("[output]\n", f"[output]\nformats = {json.dumps(formats)}\n")
    cfg.write_text(text)
    return cfg


def _gate_report(folder: Path) -> dict:
    """The report of the last gate run (a changed threshold makes a new gate key beside the old one)."""
    done = sorted((folder / "work" / "gate").glob("*/done.json"), key=lambda p: p.stat().st_mtime)
    return json.loads((done[-1].parent / "report.json").read_text())


def test_every_format_is_gated_on_its_written_bytes_and_ships_only_if_it_passed(tmp_path, smol):
    formats = ["safetensors", "gguf-f16", "gguf-q8_0", "gguf-q4_0"]
    assert run_cli(_config(tmp_path / "open", smol, formats, gate="max_kl = 10.0\nmax_ppl_increase = 10.0\n"
                                                                  "min_delta_retention = -100.0")) == 0
    report = _gate_report(tmp_path / "open")
    kl = {a: report["eval"]["candidates"][a]["kl"]["mean"]["value"] for a in ("merged", "gguf-F16", "gguf-Q8_0",
                                                                              "gguf-Q4_0")}
    # bf16 -> f16 is exact but for the values under f16's normal range (|w| < 6.1e-5), which lose bits
    assert kl["gguf-F16"] == pytest.approx(kl["merged"], rel=1e-2)
    assert kl["merged"] < kl["gguf-Q8_0"] < kl["gguf-Q4_0"]
    release = tmp_path / "open" / "releases" / "tiny" / "latest"
    manifest = json.loads((release / "manifest.json").read_text())
    export = finished(tmp_path / "open" / "work", "export")
    packages = manifest["provenance"]["packages"]  # the writers' versions, which are in the export key, too
    assert packages["gguf"] == version("gguf") and packages["qmerge"].startswith(f"{version('qmerge')}+src.")
    for artifact in ("gguf-F16", "gguf-Q8_0", "gguf-Q4_0"):  # the release holds the very bytes evaluate read back
        assert sha256_file(release / artifact / "model.gguf") == sha256_file(export / artifact / "model.gguf")
        assert manifest["artifacts"][artifact]["verdict"] == "pass" and manifest["artifacts"][artifact]["shipped"]
    assert (release / "merged" / "model.safetensors").is_file()

    # The same evaluation, a gate strict enough that 4-bit fails: Q4_0 is left out, the rest ships, exit 3.
    limit = (kl["gguf-Q8_0"] * kl["gguf-Q4_0"]) ** 0.5
    strict = f"max_kl = {limit}\nmax_ppl_increase = 10.0\nmin_delta_retention = -100.0"
    cfg = _config(tmp_path / "open", smol, formats, gate=strict)
    assert run_cli(cfg) == 3
    report = _gate_report(tmp_path / "open")
    assert report["gate"]["verdict"] == "partial"
    assert report["gate"]["artifacts"]["gguf-Q4_0"]["verdict"] != "pass"
    release = (tmp_path / "open" / "releases" / "tiny" / "latest").resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    assert not (release / "gguf-Q4_0").exists() and not manifest["artifacts"]["gguf-Q4_0"]["shipped"]
    assert (release / "gguf-Q8_0" / "model.gguf").is_file()
    card = (release / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["quantized_by"].startswith("qmerge")
    assert "base_model" not in meta and "base_model_relation" not in meta  # no adapter names a Hub id: none given
    names = {m["name"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert "kl_divergence (gguf-Q8_0)" in names and "kl_divergence (gguf-Q4_0)" not in names

    # Renamed, nothing else changed: a GGUF file holds the name (general.name), so the export runs again and the
    # release's files carry the new one
    from qmerge.io.gguf_reader import open_gguf

    cfg.write_text(cfg.read_text().replace('name = "tiny"', 'name = "renamed"'))
    assert run_cli(cfg) == 3
    release = (tmp_path / "open" / "releases" / "renamed" / "latest").resolve()
    assert open_gguf(release / "gguf-Q8_0" / "model.gguf").fields["general.name"].contents() == "renamed"
    assert len(list((tmp_path / "open" / "work" / "export").glob("*/done.json"))) == 2

    # The rejected Q4_0 listed first: the release's final artifact (its card, report.json's top level, the
    # manifest) is the first listed that passed, not the one left out
    text = cfg.read_text().replace(json.dumps(formats), json.dumps(["gguf-q4_0", "safetensors", "gguf-q8_0"]))
    cfg.write_text(text)
    assert run_cli(cfg) == 3
    report = _gate_report(tmp_path / "open")
    assert report["final"] == "merged" and report["gate"]["candidate"] == "merged" and report["gate"]["passed"]
    assert report["gate"]["verdict"] == "partial" and report["gate"]["artifacts"]["gguf-Q4_0"]["verdict"] != "pass"
    release = (tmp_path / "open" / "releases" / "renamed" / "latest").resolve()
    assert json.loads((release / "manifest.json").read_text())["final"] == "merged"
    card = (release / "README.md").read_text()
    assert "final artifact: merged." in card and "final artifact: gguf-Q4_0" not in card


@pytest.mark.parametrize("formats,quantize,message", [
    (["compressed-tensors"], "", "needs a [quantize] section"),
    (["gptq"], "", "needs a [quantize] section"),
    (["gguf-q4_k"], "", "unknown format"),
    (["compressed-tensors"], "[quantize]\ncalibration = \"x.toml\"\ndesc_act = true\ngroup_size = 32",
     "set quantize.static_groups = true"),
])
def test_impossible_combinations_are_exit_2_before_anything_runs(tmp_path, smol, capsys, formats, quantize, message):
    cfg = _config(tmp_path, smol, formats, quantize=quantize)
    assert run_cli(cfg) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work" / "merge").exists()


def test_a_tokenizer_the_gguf_writer_cannot_take_is_exit_2_before_the_merge(tmp_path, smol, capsys):
    """A character-level (WordLevel) tokenizer: GGUF output writes byte-level BPE vocabularies only. resolve checks
    the tokenizer the merged checkpoint will hold, as the export would, before anything runs."""
    import shutil

    from tests.conftest import save_char_tokenizer

    base = tmp_path / "base"
    shutil.copytree(smol["base"], base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    save_char_tokenizer(base)
    cfg = _config(tmp_path / "run", {**smol, "base": base}, ["safetensors", "gguf-q8_0"])
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert "byte-level BPE tokenizers only" in err and str(base / "tokenizer.json") in err
    assert not (tmp_path / "run" / "work" / "merge").exists()
    assert run_cli(_config(tmp_path / "plain", {**smol, "base": base}, ["safetensors"]), "--dry-run") == 0


def test_act_order_with_static_groups_can_ship_compressed_tensors(tmp_path, smol):
    from qmerge.config import load_config

    quantize = "[quantize]\ncalibration = \"x.toml\"\ndesc_act = true\ngroup_size = 32\nstatic_groups = true"
    cfg = load_config(_config(tmp_path, smol, ["compressed-tensors"], quantize=quantize))
    assert cfg.quantize.desc_act and cfg.quantize.static_groups


def test_the_export_key_follows_the_name_in_a_gguf_and_the_writers_versions(monkeypatch):
    """The export stage's config slice: the config's name where a GGUF (whose general.name holds it) is written,
    and the versions of the packages that write the files (an upgraded `gguf` exports again)."""
    from types import SimpleNamespace

    from qmerge import pipeline

    def key(exports, name="a"):
        return pipeline._export_slice(SimpleNamespace(exports=exports, name=name))

    assert key(("gguf-Q8_0",), "a") != key(("gguf-Q8_0",), "b")
    assert key(("compressed-tensors",), "a") == key(("compressed-tensors",), "b")
    before = key(("gguf-Q8_0",))
    monkeypatch.setattr(pipeline, "package_versions",
                        lambda names: {n: "9.9" for n in names})
    assert key(("gguf-Q8_0",)) != before


def test_the_evaluate_key_follows_the_artifacts_it_scores(tmp_path, smol):
    """Evaluate scores the artifacts output.formats lists and names them in its report: another list is another
    evaluate (with [quantize] and no export stage, nothing upstream of it changes). A cached evaluate of
    ["gptq"] gated for ["safetensors", "gptq"] shipped one artifact, and the reverse placed two into one folder."""
    from qmerge import pipeline
    from qmerge.config import load_config

    quantize = '[quantize]\ncalibration = "x.toml"'
    keys = {tuple(f): pipeline._evaluate_slice(load_config(_config(tmp_path / "-".join(f), smol, f, quantize=quantize)))
            for f in (["gptq"], ["safetensors", "gptq"], ["gptq", "safetensors"])}
    assert len({json.dumps(k, sort_keys=True, default=str) for k in keys.values()}) == 3


def test_a_release_file_is_never_placed_onto_an_existing_name(tmp_path):
    """`_place` hardlinks or copies a gated file into a release; a name that exists already (another artifact's
    file, or a hardlink to an earlier release's inode) is an error, never overwritten."""
    from qmerge.stages.promote import _place

    src, dst = tmp_path / "src.bin", tmp_path / "rel" / "model.bin"
    dst.parent.mkdir()
    src.write_bytes(b"new")
    dst.write_bytes(b"published")
    with pytest.raises(FileExistsError, match="same file"):
        _place(src, dst)
    assert dst.read_bytes() == b"published"
    other = tmp_path / "rel" / "fresh.bin"
    assert _place(src, other) and other.read_bytes() == b"new"  # same filesystem: a hardlink


def test_the_estimates_count_every_exported_artifact(tmp_path):
    """Evaluate streams each exported artifact as one more model: its estimate grew with none of them; export and
    calibrate had no estimate at all."""
    from qmerge.config import load_config
    from qmerge.estimate import Shape, stage_estimates

    shape = Shape(hidden=4096, intermediate=11008, vocab=32000, layers=32, heads=32, layer_elements=202_383_360,
                  largest_elements=45_088_768, largest_linear=(11008, 4096), max_in_features=11008,
                  output_bytes=13_476_839_424, linear_widths=77_824)

    def estimates(formats: list[str]) -> dict:
        sections = '[gate]\neval = "e.toml"\n[quantize]\ncalibration = "c.toml"\nsamples = 16\nseq_len = 64\n'
        cfg = write_config(tmp_path, tmp_path, [(tmp_path, 1.0)], extra=sections)
        cfg.write_text(cfg.read_text().replace("[output]\n", f"[output]\nformats = {json.dumps(formats)}\n"))
        return stage_estimates(load_config(cfg), shape)

    alone, more = estimates(["gptq"]), estimates(["gptq", "gguf-q8_0", "gguf-q4_0"])
    assert more["evaluate"]["peak_bytes"] > alone["evaluate"]["peak_bytes"] and "export" not in alone
    params = 32 * 202_383_360 + 32000 * 4096
    assert more["export"]["disk_bytes"] == int(params * 34 / 32) + int(params * 18 / 32)
    assert alone["calibrate"]["disk_bytes"] == 16 * 64 * 8


def test_the_merge_estimate_counts_the_selection_pass_of_into_auto(tmp_path):
    """into = "auto" scores both candidates and the reference layer by layer after merging (three layers, heads and
    logits at once): its merge estimate was a plain merge's (751 MB estimated, 1319 MB measured on a small model)."""
    from qmerge.config import load_config
    from qmerge.estimate import Shape, evaluate_peak, stage_estimates

    shape = Shape(hidden=4096, intermediate=11008, vocab=32000, layers=32, heads=32, layer_elements=202_383_360,
                  largest_elements=131_072_000, largest_linear=(11008, 4096), max_in_features=11008,
                  output_bytes=13_476_839_424, linear_widths=77_824)
    nf4 = stage_estimates(load_config(write_config(tmp_path, tmp_path, [(tmp_path, 1.0)])), shape)
    auto = stage_estimates(load_config(write_config(tmp_path, tmp_path, [(tmp_path, 1.0)],
                                                    merge={"into": "auto", "select": "s.toml"})), shape)
    assert auto["merge"]["peak_bytes"] == evaluate_peak(shape, 3, 3, 8, 256, 4) > nf4["merge"]["peak_bytes"] + 2**31
    assert auto["merge"]["disk_bytes"] == 2 * nf4["merge"]["disk_bytes"]
