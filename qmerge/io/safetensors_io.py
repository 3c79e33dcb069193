"""Streaming safetensors I/O: headers parsed without loading weights, one tensor loaded at a time, and
a size-capped shard writer that writes the index at the end (after mergekit's tensor_writer.py)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qmerge.errors import BadInputError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 2**20
FIX = "the file is corrupt or truncated: re-download or re-save it"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and validates a safetensors header (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BadInputError("too short to be a safetensors file", path=path, fix=FIX)
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise BadInputError(f"header length {n} does not fit in a {size}-byte file", path=path, fix=FIX)
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise BadInputError("file not found", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"safetensors header is not valid JSON ({e})", path=path, fix=FIX) from None
    if not isinstance(header, dict):
        raise BadInputError("safetensors header is not a JSON object", path=path, fix=FIX)
    data_size = size - 8 - n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"tensor {name!r}: malformed header entry", path=path, fix=FIX) from None
        if dtype not in ITEMSIZE:
            raise BadInputError(f"tensor {name!r}: unknown dtype {dtype!r}", path=path, fix=FIX)
        numel = 1
        for s in shape:
            numel *= s
        if not (0 <= start <= end <= data_size) or end - start != numel * ITEMSIZE[dtype]:
            raise BadInputError(f"tensor {name!r}: data offsets {start}..{end} do not match its shape {list(shape)} "
                                f"{dtype} within {data_size} data bytes", path=path, fix=FIX)
        out[name] = TensorInfo(name, dtype, shape, path, end - start)
    return out


class CheckpointReader:
    """Tensor names and shapes of a model folder from headers; `get` loads exactly one tensor."""

    tensors_loaded = 0  # process-wide count, so tests can prove a dry run loads nothing

    def __init__(self, source: Path | list[Path]):
        files = self._files(source) if not isinstance(source, list) else [Path(p) for p in source]
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise BadInputError(f"tensor {name!r} appears in two shards", path=f, fix=FIX)
                self.tensors[name] = info
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise BadInputError(f"invalid index ({e})", path=index, fix=FIX) from None
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise BadInputError(f"index names missing shard {missing[0].name}", path=index, fix=FIX)
            return files
        single = folder / "model.safetensors"
        if single.is_file():
            return [single]
        if (folder / "pytorch_model.bin").is_file():
            raise BadInputError("only pytorch_model.bin here; qmerge reads safetensors (no pickle)", path=folder,
                                fix="convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
        raise BadInputError("no model.safetensors or model.safetensors.index.json", path=folder)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str, device: str = "cpu") -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device=device)
        CheckpointReader.tensors_loaded += 1
        return handle.get_tensor(name)


class ShardWriter:
    """Buffers tensors up to `max_shard_bytes`, writes numbered shards, then the index (mergekit style)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0
        self.seen: set[str] = set()

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise ValueError(f"tensor {name} written twice")
        self.seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = tensor.detach().to("cpu").contiguous()
        self.buffer_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temp = f"shard-{len(self.shards):05d}.tmp.safetensors"
        save_file(self.buffer, str(self.out_dir / temp), metadata=self.metadata)
        with open(self.out_dir / temp, "rb") as f:
            os.fsync(f.fileno())
        self.shards.append((temp, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return
        if self.buffer or not self.shards:
            self._flush()
        self.finalize()

    def finalize(self) -> dict[str, str]:
        weight_map = {}
        count = len(self.shards)
        for i, (temp, names) in enumerate(self.shards):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / temp, self.out_dir / final)
            weight_map.update({n: final for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self.weight_map = weight_map
        return weight_map
