"""Bad input -> exit 2 with a message naming the file, and nothing written under the work dir's stages."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_adapter, run_cli, write_config


@pytest.fixture
def adapter(tmp_path, tiny_llama) -> Path:
    return make_adapter(tiny_llama, tmp_path / "adapter")


def assert_exit_2(cfg: Path, capsys, *needles: str) -> None:
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    work = cfg.parent / "work"
    finished = list(work.glob("*/*/done.json")) if work.exists() else []
    assert not [p for p in finished if p.parent.parent.name != "resolve"], finished
    assert not list(work.glob("*/.*tmp-*")) if work.exists() else True


def test_unknown_config_key(tmp_path, tiny_llama, adapter, capsys):
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)], extra="[gate]\neval = 'x.toml'\nmax_kll = 0.1\n")
    assert_exit_2(cfg, capsys, str(cfg), "unknown key `gate.max_kll`")


def test_mistyped_value(tmp_path, tiny_llama, adapter, capsys):
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)], merge={"dtype": "float8"})
    assert_exit_2(cfg, capsys, str(cfg), "merge.dtype")


def test_missing_base(tmp_path, adapter, capsys):
    cfg = write_config(tmp_path, tmp_path / "nope", [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "base.path", "does not exist")


def test_corrupt_safetensors_header(tmp_path, tiny_llama, adapter, capsys):
    import shutil

    base = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(struct.pack("<Q", 10**7) + data[8:])
    cfg = write_config(tmp_path, base, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, str(base / "model.safetensors"), "header")


def _rewrite_adapter(adapter: Path, fn) -> None:
    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_adapter_shape_mismatch(tmp_path, tiny_llama, adapter, capsys):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite_adapter(adapter, lambda t: t.__setitem__(key, torch.zeros(32, 4)))
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "adapter_model.safetensors", "shape mismatch at model.layers.0.self_attn.q_proj")


def test_adapter_target_missing_from_base(tmp_path, tiny_llama, adapter, capsys):
    def add(t):
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)

    _rewrite_adapter(adapter, add)
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "adapter_model.safetensors", "model.layers.7.self_attn.q_proj, which is not in the base")


def test_nan_in_adapter(tmp_path, tiny_llama, adapter, capsys):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    _rewrite_adapter(adapter, lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "adapter_model.safetensors", "NaN or Inf")


def test_finite_factors_whose_product_overflows(tmp_path, tiny_llama, adapter, capsys):
    """Every factor finite, their product out of float32's range: the merged weight cannot be stored, exit 2 naming
    the tensor and the adapter (it wrote inf and NaN weights)."""
    prefix = "base_model.model.model.layers.1.mlp.down_proj"

    def overflow(t):
        t[f"{prefix}.lora_A.weight"][:, 0] = 3e38
        t[f"{prefix}.lora_B.weight"].fill_(1.0)

    _rewrite_adapter(adapter, overflow)
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, str(adapter), "model.layers.1.mlp.down_proj.weight", "not finite")


@pytest.mark.parametrize("field,value,needle", [
    ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
    ("use_qalora", True, "use_qalora"),
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("init_lora_weights", "pissa", "pissa"),
    ("some_future_field", 1, "unknown to the installed peft"),
    # PEFT reads an empty sub-config as a default one, which switches the variant on (KaSA also cuts the base)
    ("kasa_config", {}, "kasa_config"),
    ("velora_config", {}, "velora_config"),
    # the flags PEFT follows, against the tensors the file holds (PEFT ignores the tensors, without a warning)
    ("use_dora", True, "use_dora = true in adapter_config.json but the adapter file holds no DoRA magnitude"),
    # two alpha_pattern keys on one module with other values: which one training took is not known
    ("alpha_pattern", {"down_proj": 3, "layers.1.mlp.down_proj": 32}, "all match model.layers.1.mlp.down_proj"),
])
def test_unsupported_peft_config(tmp_path, tiny_llama, adapter, capsys, field, value, needle):
    f = adapter / "adapter_config.json"
    config = json.loads(f.read_text())
    config[field] = value
    f.write_text(json.dumps(config))
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, str(f), needle)


def test_base_sha256_mismatch(tmp_path, tiny_llama, adapter, capsys):
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    text = cfg.read_text().replace("[base.nf4]", f'sha256 = "{"0" * 64}"\n[base.nf4]')
    cfg.write_text(text)
    assert_exit_2(cfg, capsys, str(cfg), "sha256 mismatch")


def _pinned(cfg: Path, base_pin: str | None = None, adapter_pin: str | None = None) -> Path:
    text = cfg.read_text()
    if base_pin:
        text = text.replace("[base.nf4]", f'sha256 = "{base_pin}"\n[base.nf4]')
    if adapter_pin:
        text = text.replace("weight = 1.0", f'weight = 1.0\nsha256 = "{adapter_pin}"')
    cfg.write_text(text)
    return cfg


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _combined(*files: Path) -> str:
    """The documented pin, computed independently: hex digests in file-name order, concatenated, hashed."""
    import hashlib

    return hashlib.sha256("".join(_sha(f) for f in sorted(files, key=lambda f: f.name)).encode()).hexdigest()


def test_pins_are_the_combined_digests(tmp_path, tiny_llama, adapter):
    from qmerge.config import load_config
    from qmerge.stages.resolve import resolve

    base_files = [p for p in tiny_llama.iterdir() if p.suffix in (".json", ".safetensors")]
    pins = (_combined(*base_files), _combined(adapter / "adapter_model.safetensors", adapter / "adapter_config.json"))
    plan = resolve(load_config(_pinned(write_config(tmp_path, tiny_llama, [(adapter, 1.0)]), *pins)), progress=False)
    assert (plan.base.sha256, plan.adapters[0].sha256) == pins


def test_adding_the_pins_keeps_every_stage_key(tmp_path, tiny_llama, adapter, capsys):
    """A pin verifies inputs (resolve hashes them on every run); it changes no byte. Adding the pins --dry-run
    prints to a finished run's config reuses every stage; a wrong pin is still exit 2 with every stage cached."""
    base_files = [p for p in tiny_llama.iterdir() if p.suffix in (".json", ".safetensors")]
    pins = (_combined(*base_files), _combined(adapter / "adapter_model.safetensors", adapter / "adapter_config.json"))
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert run_cli(cfg) == 0
    capsys.readouterr()
    text = cfg.read_text()
    _pinned(cfg, *pins)
    assert run_cli(cfg) == 0
    out = capsys.readouterr().out
    assert "merge " in out and not [ln for ln in out.splitlines() if " ran " in ln and not ln.split()[0] == "resolve"]
    cfg.write_text(text)
    assert run_cli(_pinned(cfg, base_pin="0" * 64)) == 2  # a wrong pin is still refused, cache or not
    assert "sha256 mismatch" in capsys.readouterr().err


@pytest.mark.parametrize("pin", ["model.safetensors", "config.json"])
def test_base_pin_of_one_file_is_refused(tmp_path, tiny_llama, adapter, capsys, pin):
    """A pin must cover every file: one of them alone would let the rest change unnoticed."""
    cfg = _pinned(write_config(tmp_path, tiny_llama, [(adapter, 1.0)]), base_pin=_sha(tiny_llama / pin))
    assert_exit_2(cfg, capsys, str(cfg), "sha256 mismatch", "combined over")


def test_adapter_pin_covers_its_config(tmp_path, tiny_llama, adapter, capsys):
    """Pinning the weights alone is refused, and so is a pinned adapter whose alpha changed."""
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    cfg = _pinned(write_config(tmp_path, tiny_llama, [(adapter, 1.0)]), adapter_pin=_sha(weights))
    assert_exit_2(cfg, capsys, str(adapter), "sha256 mismatch for adapters[0]", "adapter_config.json")
    pin = _combined(weights, config)
    cfg = _pinned(write_config(tmp_path, tiny_llama, [(adapter, 1.0)]), adapter_pin=pin)
    assert run_cli(cfg, "--dry-run") == 0
    assert pin in capsys.readouterr().out  # the plan prints the pin to copy
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 3}))
    assert_exit_2(cfg, capsys, "sha256 mismatch for adapters[0]")


def test_dora_with_two_adapters(tmp_path, tiny_llama, capsys):
    a1 = make_adapter(tiny_llama, tmp_path / "a1", use_dora=True)
    a2 = make_adapter(tiny_llama, tmp_path / "a2")
    cfg = write_config(tmp_path, tiny_llama, [(a1, 1.0), (a2, 1.0)])
    assert_exit_2(cfg, capsys, "DoRA is not additive", str(a1))


def test_lora_bias_on_layer_without_bias(tmp_path, tiny_llama, capsys):
    adapter = make_adapter(tiny_llama, tmp_path / "a", lora_bias=True)
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "adapter_model.safetensors", "lora_bias on model.layers.0.", "which has no bias")


def test_base_config_json_not_json(tmp_path, tiny_llama, adapter, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    (base / "config.json").write_text("{not json")
    cfg = write_config(tmp_path, base, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, str(base / "config.json"), "cannot read config.json")


def test_text_spec_source_unreadable(tmp_path, gated, capsys):
    (tmp_path / "bad.bz2").write_bytes(b"not bz2 at all")
    (tmp_path / "spec.toml").write_text('[source]\npath = "bad.bz2"\nformat = "mediawiki"\n')
    cfg = write_config(tmp_path, gated["base"], [(gated["adapter"], 1.0)], extra='[gate]\neval = "spec.toml"\n')
    assert run_cli(cfg) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "spec.toml") in err and "cannot read mediawiki text" in err, err


def test_gate_without_a_tokenizer(tmp_path, tiny_llama, adapter, capsys):
    (tmp_path / "spec.toml").write_text('[source]\npath = "package:gensim/test/test_data/lee_background.cor"\n')
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)], extra='[gate]\neval = "spec.toml"\n')
    assert run_cli(cfg) == 2
    assert "no usable tokenizer" in capsys.readouterr().err


def test_release_version_bad_placeholder(tmp_path, capsys, gated):
    from tests.conftest import gate_config

    cfg = gate_config(tmp_path, gated)
    cfg.write_text(cfg.read_text().replace("[output]", '[output]\nversion = "{date}-{build}"'))
    assert run_cli(cfg) == 2
    assert "bad placeholder" in capsys.readouterr().err
    assert not (tmp_path / "releases" / "tiny").exists() or not any(
        p for p in (tmp_path / "releases" / "tiny").iterdir() if not p.name.startswith("."))


def test_weighted_adapter_with_a_replaced_tensor(tmp_path, tiny_llama, capsys):
    """modules_to_save saves lm_head whole: a weight of 0.5 would be silently ignored for it, so it is refused."""
    a1 = make_adapter(tiny_llama, tmp_path / "a1", modules_to_save=["lm_head"])
    cfg = write_config(tmp_path, tiny_llama, [(a1, 0.5)])
    assert_exit_2(cfg, capsys, str(cfg), "has weight 0.5", "lm_head.weight", "cannot be weighted")


def test_replacement_and_a_delta_on_the_same_module(tmp_path, tiny_llama, capsys):
    a1 = make_adapter(tiny_llama, tmp_path / "a1", target_modules=["v_proj"], modules_to_save=["q_proj"])
    a2 = make_adapter(tiny_llama, tmp_path / "a2", target_modules=["q_proj"], seed=2)
    cfg = write_config(tmp_path, tiny_llama, [(a1, 1.0), (a2, 1.0)])
    assert_exit_2(cfg, capsys, "replaces model.layers.0.self_attn.q_proj.weight whole", "no exact merge exists")


def test_empty_skip_modules_means_no_default_skips(tmp_path, tiny_llama):
    """`skip_modules = []` replaces transformers' default skips with nothing (lm_head is quantized too), as
    `llm_int8_skip_modules=[]` does in transformers; "auto" keeps the defaults (lm_head skipped)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qmerge.io.architecture import describe_architecture

    untied = tmp_path / "untied"
    from tests.conftest import make_base

    make_base(untied, tied=False)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[])
    oracle = AutoModelForCausalLM.from_pretrained(untied, quantization_config=q, device_map="cpu")
    want = {n for n, m in oracle.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "lm_head" in want
    assert set(describe_architecture(untied, ()).quantized) == want
    assert "lm_head" not in describe_architecture(untied, None).quantized


def test_a_base_missing_a_parameter_is_refused_before_the_merge(tmp_path, tiny_llama, adapter, capsys):
    """A shard without model.norm.weight (or an index that leaves it out) was merged without it, exit 0: the
    release then loaded a freshly initialised norm."""
    import shutil

    base = tmp_path / "incomplete"
    shutil.copytree(tiny_llama, base)
    tensors = load_file(base / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path, base, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, str(base), "lacks 1 of the", "model.norm.weight", "re-download")


@pytest.mark.parametrize("stray", ["base_model.model.model.layers.0.self_attn.q_proj.weight",
                                   "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"])
def test_a_whole_tensor_no_adapter_setting_explains_is_refused(tmp_path, tiny_llama, adapter, capsys, stray):
    """A stray q_proj.weight in the adapter file replaced the base's q_proj (PEFT's loader ignores it: its merge
    keeps the base's); a raw state_dict's `.lora_A.default.weight` was taken for a replacement too."""
    _rewrite_adapter(adapter, lambda t: t.__setitem__(stray, torch.zeros(64, 64) if "lora" not in stray
                                                      else torch.zeros(4, 64)))
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "adapter_model.safetensors", f"holds {stray} whole", "modules_to_save")


def _edited_base(tmp_path, tiny_llama, edit) -> Path:
    import shutil

    base = tmp_path / "edited"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(edit(config)))
    return base


@pytest.mark.parametrize("edit,needle", [
    (lambda c: [c], "config.json is not a JSON object"),
    (lambda c: {**c, "quantization_config": "nf4"}, "quantization_config is not an object"),
    (lambda c: {**c, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                             "bnb_4bit_quant_type": "fp4"}}, "bnb_4bit_quant_type = 'fp4'"),
    (lambda c: {**c, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"]},
     "not a causal language model"),
])
def test_a_malformed_or_unsupported_base_config_is_exit_2(tmp_path, tiny_llama, adapter, capsys, edit, needle):
    """Each was a traceback (exit 1): a list for config.json, a string quantization_config, an FP4 bnb base
    (read as NF4 until a quant-state key was missing), a model transformers cannot build as a causal LM."""
    cfg = write_config(tmp_path, _edited_base(tmp_path, tiny_llama, edit), [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, needle)


def test_only_the_files_the_checkpoint_reads_are_hashed(tmp_path, tiny_llama, adapter):
    """A repository's other .safetensors (consolidated.safetensors beside the shards; here a dangling link) was
    hashed too: a traceback, and for a real one twice the hashing."""
    base = _edited_base(tmp_path, tiny_llama, lambda c: c)
    (base / "consolidated.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    cfg = write_config(tmp_path, base, [(adapter, 1.0)])
    assert run_cli(cfg, "--dry-run") == 0


@pytest.mark.parametrize("field,value", [("rank_pattern", ["q_proj"]), ("alpha_pattern", 8),
                                         ("init_lora_weights", ["gaussian"])])
def test_a_mistyped_adapter_config_field_is_exit_2(tmp_path, tiny_llama, adapter, capsys, field, value):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, "adapter_config.json", f"{field}")


def test_a_package_path_under_a_missing_package_is_exit_2(tmp_path, adapter, capsys):
    cfg = write_config(tmp_path, Path("package:no_such_pkg_qm.sub/model"), [(adapter, 1.0)])
    cfg.write_text(cfg.read_text().replace(f'path = "{Path("package:no_such_pkg_qm.sub/model")}"',
                                           'path = "package:no_such_pkg_qm.sub/model"'))
    assert_exit_2(cfg, capsys, "no_such_pkg_qm.sub", "not installed")


@pytest.mark.parametrize("which", ["work_dir", "output.dir"])
def test_a_file_where_qmerge_writes_a_folder_is_exit_2_before_anything_runs(tmp_path, tiny_llama, adapter, capsys,
                                                                            which):
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    (tmp_path / ("work" if which == "work_dir" else "releases")).write_text("a file")
    assert run_cli(cfg) == 2
    assert f"{which} " in capsys.readouterr().err and not list(tmp_path.glob("work/*/*/done.json"))


def test_summary_json_into_a_missing_folder_is_exit_2_before_the_run(tmp_path, tiny_llama, adapter, capsys):
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert run_cli(cfg, "--summary-json", tmp_path / "nope" / "s.json") == 2
    assert "--summary-json" in capsys.readouterr().err and not (tmp_path / "work").exists()


@pytest.mark.parametrize("gate,needle", [
    ('eval = "missing.toml"', "missing.toml"),                  # was found after the merge
    ("seq_len = 4096", "longer than the model's context"),     # an IndexError in evaluate
    ("windows = 100000", "100000 are needed"),                  # found after the merge
])
def test_eval_text_problems_are_exit_2_before_the_merge(tmp_path, gated, capsys, gate, needle):
    from tests.conftest import gate_config

    cfg = gate_config(tmp_path, gated)
    text = cfg.read_text()
    key = gate.split(" = ")[0]
    lines = [line for line in text.splitlines() if not line.startswith(f"{key} = ")]
    cfg.write_text("\n".join(lines).replace("[gate]", f"[gate]\n{gate}") + "\n")
    if key == "seq_len":  # a context the tiny llama has: 2048 by default
        base = json.loads((gated["base"] / "config.json").read_text())
        assert base["max_position_embeddings"] < 4096
    assert_exit_2(cfg, capsys, needle)


def test_a_bad_release_name_is_exit_2_before_the_merge(tmp_path, gated, capsys):
    from tests.conftest import gate_config

    cfg = gate_config(tmp_path, gated)
    cfg.write_text(cfg.read_text().replace("[output]", '[output]\nversion = "nightly/{date}"'))
    assert_exit_2(cfg, capsys, "not a plain folder name")


@pytest.mark.parametrize("section,line,needle", [
    ("[gate]", 'windows = "24"', "`windows` = '24' is a string"),
    ("[base.nf4]", 'double_quant = "no"', "`double_quant` = 'no' is a string"),
    ("[gate]", "min_delta_retention = nan", "min_delta_retention"),
    ("[merge]", "seed = true", "`seed` = true is a flag"),
])
def test_a_value_of_the_wrong_kind_is_not_coerced(tmp_path, tiny_llama, adapter, capsys, section, line, needle):
    """pydantic's lax mode read "no" as False, "24" as 24, true as 1, and took NaN (after which no gate passes)."""
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    text = cfg.read_text()
    if section not in text:
        text += f"{section}\neval = 'x.toml'\n"
    cfg.write_text(text.replace(section, f"{section}\n{line}", 1))
    assert_exit_2(cfg, capsys, str(cfg), needle)


def _record(adapter: Path, nf4: dict) -> None:
    (adapter / "qmerge_training.json").write_text(json.dumps({"nf4": nf4}))


TRAINED = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "load_dtype": "auto", "compute_dtype": "float32"}


@pytest.mark.parametrize("field,trained", [("blocksize", 128), ("double_quant", False), ("load_dtype", "float32")])
def test_a_config_unlike_the_adapters_training_record_is_exit_2(tmp_path, tiny_llama, adapter, capsys, field, trained):
    """The record beside an adapter says which W_nf4 it learned against; a config that quantizes the base otherwise
    merges onto another base, silently, unless it is refused."""
    _record(adapter, TRAINED | {field: trained})
    cfg = write_config(tmp_path, tiny_llama, [(adapter, 1.0)])
    assert_exit_2(cfg, capsys, f"[base.nf4] {field} = {json.dumps(trained)}", "qmerge_training.json")


@pytest.mark.parametrize("named", [{}, {"load_dtype": "bfloat16"}, {"dequant_dtype": "bfloat16"}])
def test_a_config_matching_the_training_record_merges(tmp_path, tiny_llama, adapter, named):
    """Matching means the same W_nf4: on this bfloat16 checkpoint, "auto" loads bfloat16, and the product cast to
    bfloat16 then float32 is the product cast to bfloat16."""
    _record(adapter, TRAINED | named)
    assert run_cli(write_config(tmp_path, tiny_llama, [(adapter, 1.0)])) == 0
    (tmp_path / "spelled").mkdir()
    assert run_cli(write_config(tmp_path / "spelled", tiny_llama, [(adapter, 1.0)], nf4=TRAINED | named)) == 0

    def merged(root: Path) -> list[bytes]:
        return [f.read_bytes() for f in sorted((root / "work" / "merge").glob("*/*.safetensors"))]

    assert merged(tmp_path) and merged(tmp_path) == merged(tmp_path / "spelled")


@pytest.mark.parametrize("text", ["{not json", '{"recipe": {}}'])
def test_an_unreadable_training_record_is_exit_2(tmp_path, tiny_llama, adapter, capsys, text):
    (adapter / "qmerge_training.json").write_text(text)
    assert_exit_2(write_config(tmp_path, tiny_llama, [(adapter, 1.0)]), capsys, "qmerge_training.json")


def test_dora_or_lora_bias_tensors_the_config_turns_off_are_exit_2(tmp_path, tiny_llama, capsys):
    """use_dora / lora_bias switched off in the config while the file holds their tensors: PEFT ignores the tensors,
    qmerge had merged them (logits 0.1 and 0.9 relative off what PEFT runs)."""
    for flag, needle in (("use_dora", "holds DoRA magnitude vectors"), ("lora_bias", "holds lora_B biases")):
        folder = tmp_path / flag
        folder.mkdir()
        adapter = make_adapter(tiny_llama, folder / "adapter", **{flag: True})
        f = adapter / "adapter_config.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {flag: False}))
        assert_exit_2(write_config(folder, tiny_llama, [(adapter, 1.0)]), capsys, needle)


@pytest.mark.parametrize("init", ["orthogonal", "Gaussian", "eva"])
def test_inits_that_only_set_a_and_b_merge(tmp_path, tiny_llama, adapter, init):
    """They leave the base as it was; they had been refused as rewriting it."""
    f = adapter / "adapter_config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | {"init_lora_weights": init}))
    assert run_cli(write_config(tmp_path, tiny_llama, [(adapter, 1.0)])) == 0
