"""safetensors_io: our header parser agrees with safetensors itself and rejects damaged files by name; the
reader loads nothing until asked; the shard writer's output loads in safetensors and transformers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qmerge.errors import BadInputError
from qmerge.io.safetensors_io import CheckpointReader, ShardWriter, TensorInfo, read_header, read_metadata

ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32",
            torch.uint8: "U8"}


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "w.f16": torch.randn(7, generator=g).half(),
        "w.f32": torch.randn(2, 3, 4, generator=g),
        "ids.i32": torch.arange(-6, 6, dtype=torch.int32).reshape(3, 4),
        "codes.u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


def write_raw(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    """A safetensors file from a hand-made header, to build exactly the damage a test needs."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def good_raw(path: Path) -> tuple[dict, bytes]:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}
    return header, bytes(range(22))


def test_header_agrees_with_safetensors(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    infos = read_header(path)
    assert set(infos) == set(tensors)
    with safe_open(str(path), framework="pt") as f:  # the library's own reading is the slow obvious twin
        for name, t in tensors.items():
            info = infos[name]
            assert info == TensorInfo(name, ST_NAMES[t.dtype], tuple(t.shape), path, t.numel() * t.element_size())
            assert info.shape == tuple(f.get_slice(name).get_shape())
            assert info.dtype == f.get_slice(name).get_dtype()
    assert infos["scalar"].shape == () and infos["scalar"].nbytes == 4
    assert infos["empty"].shape == (0, 4) and infos["empty"].nbytes == 0
    assert read_metadata(path) == {"format": "pt", "note": "x"}


def test_hand_written_file_parses(tmp_path):
    path = write_raw(tmp_path / "ok.safetensors", *good_raw(tmp_path))
    assert {n: (i.dtype, i.shape, i.nbytes) for n, i in read_header(path).items()} == {
        "a": ("F32", (2, 2), 16), "b": ("BF16", (3,), 6)}
    assert load_file(str(path))["a"].shape == (2, 2)  # the hand-made file is valid for safetensors too
    assert read_metadata(path) == {"format": "pt"}
    header, data = good_raw(tmp_path)
    header["__metadata__"] = {"format": 1}
    with pytest.raises(BadInputError, match="__metadata__"):
        read_metadata(write_raw(tmp_path / "meta.safetensors", header, data))


def _damage(kind: str, path: Path) -> None:
    header, data = good_raw(path)
    if kind == "truncated_data":
        write_raw(path, header, data[:-3])
    elif kind == "truncated_header":
        path.write_bytes(write_raw(path, header, data).read_bytes()[:30])
    elif kind == "too_short":
        path.write_bytes(b"\x10\x00\x00")
    elif kind == "huge_length":
        write_raw(path, header, data, length=2**40)
    elif kind == "bad_json":
        raw = bytearray(write_raw(path, header, data).read_bytes())
        raw[8 + 5] = ord("}")
        path.write_bytes(bytes(raw))
    elif kind == "not_object":
        raw = b"[1, 2, 3]"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    elif kind == "offsets_beyond_eof":
        header["b"]["data_offsets"] = [16, 40]
        header["b"]["shape"] = [12]
        write_raw(path, header, data)
    elif kind == "wrong_nbytes":
        header["b"]["shape"] = [4]
        write_raw(path, header, data)
    elif kind == "unknown_dtype":
        header["b"]["dtype"] = "F12"
        write_raw(path, header, data)
    elif kind == "overlap":
        header["b"]["data_offsets"] = [10, 16]  # total still matches the file: only the tiling check sees it
        write_raw(path, header, data[:16])
    elif kind == "gap":
        header["b"]["data_offsets"] = [18, 24]
        write_raw(path, header, bytes(24))
    elif kind == "negative_shape":
        header["a"]["shape"] = [-2, -2]
        write_raw(path, header, data)
    elif kind == "missing_offsets":
        del header["a"]["data_offsets"]
        write_raw(path, header, data)


@pytest.mark.parametrize("kind", ["truncated_data", "truncated_header", "too_short", "huge_length", "bad_json",
                                  "not_object", "offsets_beyond_eof", "wrong_nbytes", "unknown_dtype", "overlap", "gap",
                                  "negative_shape", "missing_offsets"])
def test_corrupt_header_names_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.safetensors"
    _damage(kind, path)
    with pytest.raises(BadInputError) as err:
        read_header(path)
    assert err.value.path == path and path.name in str(err.value)
    assert err.value.exit_code == 2
    if kind not in ("too_short",):  # safetensors agrees the file is broken (the twin of our checks)
        with pytest.raises(Exception):
            load_file(str(path))


def test_missing_file_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        read_header(tmp_path / "nope.safetensors")


def _two_shards(folder: Path) -> dict[str, torch.Tensor]:
    tensors = sample_tensors()
    names = sorted(tensors)
    first, second = names[:3], names[3:]
    save_file({n: tensors[n] for n in first}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in second}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_sharded_reader_loads_nothing_until_get(tmp_path):
    tensors = _two_shards(tmp_path)
    before = CheckpointReader.tensors_loaded
    reader = CheckpointReader(tmp_path)
    assert CheckpointReader.tensors_loaded == before and reader.loaded == 0 and not reader._handles
    assert set(reader.tensors) == set(tensors)
    assert reader.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(reader.files) == 2
    got = reader.get("w.bf16")
    assert torch.equal(got, tensors["w.bf16"]) and got.dtype == torch.bfloat16
    assert CheckpointReader.tensors_loaded == before + 1 and reader.loaded == 1
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t)
    with pytest.raises(KeyError):
        reader.get("absent")


def test_reader_single_file_and_list(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert set(CheckpointReader(tmp_path).tensors) == set(tensors)
    assert set(CheckpointReader(tmp_path / "model.safetensors").tensors) == set(tensors)
    save_file({"w.f32": tensors["w.f32"]}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(BadInputError, match="also in"):
        CheckpointReader([tmp_path / "model.safetensors", tmp_path / "dup.safetensors"])


@pytest.mark.parametrize("damage", ["missing_shard", "tensor_not_in_header", "escaping_path", "bad_json"])
def test_bad_index_is_bad_input(tmp_path, damage):
    _two_shards(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    if damage == "missing_shard":
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
    elif damage == "tensor_not_in_header":
        doc["weight_map"]["w.f32"] = "model-00001-of-00002.safetensors"
        doc["weight_map"]["codes.u8"] = "model-00002-of-00002.safetensors"
    elif damage == "escaping_path":
        doc["weight_map"]["w.f32"] = "../model-00002-of-00002.safetensors"
    if damage == "bad_json":
        index.write_text("{not json")
    else:
        index.write_text(json.dumps(doc))
    with pytest.raises(BadInputError) as err:
        CheckpointReader(tmp_path)
    assert "index" in str(err.value) or "model-0000" in str(err.value)


def test_empty_folder_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


def _varied(n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"layer.{i}.w": torch.randn(8 * (i + 1), 16, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(n)}


def test_writer_round_trip_several_shards(tmp_path):
    tensors = _varied()
    cap = 4096
    with ShardWriter(tmp_path / "out", max_shard_bytes=cap) as w:
        for name, t in tensors.items():
            w.add(name, t)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted(shards + ["model.safetensors.index.json"])  # no temps left
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == w.weight_map and set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        loaded = load_file(str(out / shard))
        assert set(loaded) == {k for k, v in index["weight_map"].items() if v == shard}
        data = sum(t.numel() * t.element_size() for t in loaded.values())
        assert data <= cap or len(loaded) == 1  # only a tensor larger than the cap gets a shard over it
        for k, t in loaded.items():
            assert torch.equal(t, tensors[k]) and t.dtype == tensors[k].dtype
        assert read_metadata(out / shard) == {"format": "pt"}
        assert (out / shard).stat().st_mode & 0o777 == 0o666 & ~_umask()  # not safetensors' 0600
    reader = CheckpointReader(out)
    assert all(torch.equal(reader.get(k), t) for k, t in tensors.items())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_writer_single_shard_has_no_index(tmp_path):
    tensors = _varied(3)
    with ShardWriter(tmp_path, metadata={"format": "pt", "source": "test"}) as w:
        for name, t in tensors.items():
            w.add(name, t)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert set(w.weight_map.values()) == {"model.safetensors"}
    assert read_metadata(tmp_path / "model.safetensors") == {"format": "pt", "source": "test"}
    assert all(torch.equal(load_file(str(tmp_path / "model.safetensors"))[k], t) for k, t in tensors.items())


def test_writer_rejects_duplicates_and_cleans_up_on_error(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        with ShardWriter(tmp_path, max_shard_bytes=64) as w:
            w.add("a", torch.zeros(32))
            w.add("b", torch.zeros(32))  # flushes "a" to a temp shard
            w.add("a", torch.ones(2))
    assert tmp_path.is_dir() and os.listdir(tmp_path) == []
    (tmp_path / "model.safetensors").write_bytes(b"stale")
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path).__enter__()


def test_writer_handles_tied_and_noncontiguous(tmp_path):
    emb = torch.randn(6, 4)
    with ShardWriter(tmp_path) as w:
        w.add("embed", emb)
        w.add("lm_head", emb)  # same storage, as tied weights in a state_dict
        w.add("t", emb.t())
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["embed"], emb) and torch.equal(got["lm_head"], emb) and torch.equal(got["t"], emb.t())


def test_writer_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # make every weight non-default so a silently re-initialised one cannot pass
        for p in model.parameters():
            p.normal_(0, 0.1)
    out = tmp_path / "model"
    with ShardWriter(out, max_shard_bytes=8 * 1024) as w:
        for name, t in model.state_dict().items():
            w.add(name, t)
    config.to_json_file(str(out / "config.json"))
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 3
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    theirs = loaded.state_dict()
    assert set(theirs) == set(model.state_dict())
    assert all(torch.equal(theirs[k], t) for k, t in model.state_dict().items())
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_writer_streams_and_handles_a_header_larger_than_its_reserve(tmp_path, monkeypatch):
    import qmerge.io.safetensors_io as st

    monkeypatch.setattr(st, "HEADER_RESERVE", 64)  # every header overflows: the rewrite path
    tensors = _varied(5)
    with ShardWriter(tmp_path / "a", max_shard_bytes=4096) as w:
        for name, t in tensors.items():
            w.add(name, t)
    reader = CheckpointReader(tmp_path / "a")
    assert all(torch.equal(reader.get(k), t) for k, t in tensors.items())
    assert not list((tmp_path / "a").glob(".*"))  # no temps left
