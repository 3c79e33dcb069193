"""Streaming safetensors I/O: headers parsed and validated without touching weights, one tensor loaded at a
time, and a size-capped shard writer that names shards and writes the index at the end (after mergekit's
`mergekit/io/tensor_writer.py`). Format: 8-byte little-endian header length, a JSON header, then a byte
buffer that the tensors' `data_offsets` tile exactly (https://github.com/huggingface/safetensors)."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qmerge.errors import BadInputError
from qmerge.io.atomic import default_file_mode, fsync_dir, write_json_atomic
from qmerge.io.direct import DirectFile

# Bits per element, as the safetensors format defines them (F4/F6 pack sub-byte elements).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32,
              "F32": 32, "U64": 64, "I64": 64, "F64": 64, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8,
              "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER = 100 * 2**20  # safetensors' own limit; a larger length means a damaged or foreign file
# Seconds to pause after each shard (and each file a promotion copies): lets tests kill or race a write
# mid-way. Never set in production.
TEST_THROTTLE = float(os.environ.get("QMERGE_TEST_SLOW_WRITE", "0") or 0)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FIX = "the file is corrupt or truncated: re-download or re-save it"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file's header describes it; nothing of its data is read."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    nbytes: int


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _raw_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header JSON object and the size of the data buffer behind it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BadInputError(f"{size} bytes is too short to be a safetensors file", path=path, fix=FIX)
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise BadInputError(f"header length {n} does not fit in a {size}-byte file", path=path, fix=FIX)
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise BadInputError("file not found", path=path) from None
    except IsADirectoryError:
        raise BadInputError("is a directory, expected a .safetensors file", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"safetensors header is not valid JSON ({e})", path=path, fix=FIX) from None
    if not isinstance(header, dict):
        raise BadInputError("safetensors header is not a JSON object", path=path, fix=FIX)
    return header, size - 8 - n


def _tensor_info(name: str, meta: Any, path: Path) -> tuple[TensorInfo, int, int]:
    try:
        dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"tensor {name!r}: malformed header entry {meta!r}", path=path, fix=FIX) from None
    if dtype not in DTYPE_BITS:
        raise BadInputError(f"tensor {name!r}: unknown dtype {dtype!r}", path=path, fix=FIX)
    ints = (*shape, start, end)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise BadInputError(f"tensor {name!r}: shape {shape} / offsets {start}..{end} are not non-negative "
                            "integers", path=path, fix=FIX)
    bits = _numel(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - start != bits // 8:
        raise BadInputError(f"tensor {name!r}: data offsets {start}..{end} hold {end - start} bytes, but shape "
                            f"{list(shape)} of {dtype} needs {bits / 8:g}", path=path, fix=FIX)
    return TensorInfo(name, dtype, shape, path, end - start), start, end


def read_header(path: Path | str) -> dict[str, TensorInfo]:
    """Parses and validates a safetensors header (no tensor data is read); tensors in header order."""
    path = Path(path)
    header, data_size = _raw_header(path)
    out, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        info, start, end = _tensor_info(name, meta, path)
        out[name] = info
        spans.append((start, end, name))
    # Like safetensors itself: the tensors must tile the data buffer, no gap, no overlap, nothing past EOF.
    pos = 0
    for start, end, name in sorted(spans):
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else f"leaves a gap at byte {pos}"
            raise BadInputError(f"tensor {name!r}: data at {start}..{end} {what}", path=path, fix=FIX)
        pos = end
    if pos != data_size:
        raise BadInputError(f"tensors describe {pos} data bytes but the file holds {data_size} "
                            f"({'truncated' if pos > data_size else 'trailing bytes'})", path=path, fix=FIX)
    return out


def read_metadata(path: Path | str) -> dict[str, str]:
    """The header's `__metadata__` (free-form str -> str; e.g. {"format": "pt"}), {} when absent."""
    path = Path(path)
    meta = _raw_header(path)[0].get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadInputError("__metadata__ must map strings to strings", path=path, fix=FIX)
    return meta


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` (tensor -> shard file name) of a sharded checkpoint's index, validated."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise BadInputError(f"invalid index ({type(e).__name__}: {e})", path=index, fix=FIX) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadInputError("weight_map must map tensor names to shard file names", path=index, fix=FIX)
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):  # never read outside the model folder
            raise BadInputError(f"weight_map names {shard!r}, not a file in this folder", path=index, fix=FIX)
        if not (index.parent / shard).is_file():
            raise BadInputError(f"index names missing shard {shard}", path=index, fix=FIX)
    return weight_map


class CheckpointReader:
    """Tensor names, dtypes and shapes of a checkpoint from headers alone; `get` loads exactly one tensor.

    `source`: a model folder (`model.safetensors`, or shards + `model.safetensors.index.json`), one
    `.safetensors` file, or an explicit list of files."""

    tensors_loaded = 0  # process-wide count, so tests can prove a dry run loads nothing

    def __init__(self, source: Path | str | Sequence[Path | str]):
        self.tensors: dict[str, TensorInfo] = {}
        self.loaded = 0  # this reader's count
        self._handles: dict[Path, Any] = {}
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            self._open_folder(Path(source))
        else:
            files = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
            for f in files:
                for name, info in read_header(f).items():
                    if name in self.tensors:
                        raise BadInputError(f"tensor {name!r} is also in {self.tensors[name].file.name}", path=f,
                                            fix="pass each tensor's file once")
                    self.tensors[name] = info

    def _open_folder(self, folder: Path) -> None:
        index = folder / INDEX_NAME
        if index.is_file():
            weight_map = read_index(index)
            headers = {shard: read_header(folder / shard) for shard in sorted(set(weight_map.values()))}
            for name, shard in weight_map.items():
                if name not in headers[shard]:
                    raise BadInputError(f"index maps {name!r} to {shard}, whose header lacks it", path=index,
                                        fix=FIX)
                self.tensors[name] = headers[shard][name]
        elif (folder / SINGLE_NAME).is_file():
            self.tensors = read_header(folder / SINGLE_NAME)
        elif (folder / "pytorch_model.bin").is_file():
            raise BadInputError("only pytorch_model.bin here; qmerge reads safetensors (no pickle)", path=folder,
                                fix="convert with transformers: model.save_pretrained(dir, safe_serialization=True)")
        else:
            raise BadInputError(f"no {SINGLE_NAME} or {INDEX_NAME}", path=folder,
                                fix="point at a Hugging Face model folder saved with safetensors")

    @property
    def names(self):
        """Tensor names (a live view of `tensors`): a reader is a `qmerge.layerwise.TensorSource` as it is."""
        return self.tensors.keys()

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Loads tensor `name` (and nothing else) from its shard onto `device`."""
        from safetensors import safe_open

        if name not in self.tensors:
            raise KeyError(f"{name!r} is not in this checkpoint ({len(self.tensors)} tensors)")
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:  # one cpu handle per shard, whatever device is asked for: handles stay valid
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        CheckpointReader.tensors_loaded += 1
        self.loaded += 1
        return handle.get_tensor(name).to(device)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ST_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                  torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                  torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
# Room left for the JSON header at the front of each shard; the header is padded with spaces to fill it (the
# format allows trailing whitespace: safetensors itself pads to 8 bytes). A header that outgrows it (a shard
# of thousands of tiny tensors) is handled by rewriting the shard once, kernel-side (copy_file_range).
HEADER_RESERVE = 256 * 1024
SYNC_EVERY = 256 * 2**20


class ShardWriter:
    """Streams each tensor's bytes into the current shard file as it is added (nothing is buffered: memory
    stays at one tensor), starts a new shard when the next tensor would pass `max_shard_bytes`, and at close
    writes each shard's header, names the shards `model-0000i-of-0000N.safetensors` plus the index (one
    shard: `model.safetensors`, no index, as transformers does)."""

    def __init__(self, out_dir: Path | str, max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata) if metadata is not None else {"format": "pt"}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        self.shards: list[tuple[str, list[str]]] = []  # (temp file name, tensor names) in write order
        self.total_size = 0
        self.weight_map: dict[str, str] = {}
        self._seen: set[str] = set()
        self._closed = False
        self._file = None  # the open shard: its header entries and data bytes so far
        # One background thread writes tensor bytes while the caller computes the next tensor (file writes
        # release the GIL), as mergekit's tensor_writer does; `_wait` surfaces its errors in the caller.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmerge-shard-writer")
        self._pending: Future | None = None
        self._entries: dict[str, dict] = {}
        self._data_bytes = 0
        self._unsynced = 0  # bytes written on the writer thread since its last fdatasync

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        clash = sorted(p.name for p in self.out_dir.glob("model*.safetensors*"))
        if clash:  # stale shards would mix with ours into a checkpoint no loader reads correctly
            raise FileExistsError(f"{self.out_dir} already holds {clash[0]}; write into an empty folder")
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Writes `tensor` under `name` into the current shard, on the writer thread: the caller computes the
        next tensor meanwhile (at most one tensor is in flight). Do not modify `tensor` in place afterwards."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._seen:
            raise ValueError(f"tensor {name!r} added twice")
        if tensor.dtype not in ST_DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name here")
        nbytes = tensor.numel() * tensor.element_size()
        if self._file is not None and self._entries and self._data_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._file is None:
            self._open_shard()
        t = tensor.detach().to("cpu").contiguous()
        if nbytes:
            self._wait()  # the previous tensor's bytes are on their way: one in flight bounds memory
            self._pending = self._thread.submit(self._write, self._file, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {"dtype": ST_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
        self._seen.add(name)
        self._data_bytes += nbytes
        self.total_size += nbytes

    def _write(self, f: DirectFile, data: memoryview) -> None:
        """On the writer thread: the bytes (past the page cache, `qmerge/io/direct.py`). Where the filesystem
        refused O_DIRECT, every SYNC_EVERY bytes an fdatasync, so that the disk writes them back while the caller
        computes, not all at once in the fsync that closes the shard."""
        f.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY and not f.direct:
            os.fdatasync(f.fd)
            self._unsynced = 0

    def _open_shard(self) -> None:
        temp = self.out_dir / f".shard-{len(self.shards) + 1:05d}.tmp.safetensors"
        self.shards.append((temp.name, []))
        self._file = DirectFile(temp)
        self._file.write(bytes(HEADER_RESERVE))  # the header's room, written over when the shard closes
        self._entries, self._data_bytes = {}, 0

    def _header(self) -> bytes:
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        return header + b" " * ((-len(header)) % 8)  # data starts 8-byte aligned, as safetensors writes it

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _flush(self) -> None:
        """Closes the current shard: header in front (padded into the reserved room), fsync."""
        self._wait()
        if self._file is None:
            self._open_shard()
        f, temp = self._file, self.out_dir / self.shards[-1][0]
        header = self._header()
        if len(header) <= HEADER_RESERVE - 8:
            header += b" " * (HEADER_RESERVE - 8 - len(header))
            f.finish(head=struct.pack("<Q", len(header)) + header)
            f.close()
        else:
            f.finish()
            f.close()
            _rewrite_with_header(temp, header, self._data_bytes)
        self.shards[-1] = (self.shards[-1][0], list(self._entries))
        self._file, self._entries, self._data_bytes, self._unsynced = None, {}, 0, 0
        if TEST_THROTTLE:
            time.sleep(TEST_THROTTLE)

    def finalize(self) -> dict[str, str]:
        """Closes the last shard, gives shards their final names, writes the index; returns the weight map."""
        if self._closed:
            return self.weight_map
        if self._file is not None or not self.shards:
            self._flush()
        count = len(self.shards)
        mode = default_file_mode()
        for i, (temp, names) in enumerate(self.shards):
            final = SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.chmod(self.out_dir / temp, mode)
            os.replace(self.out_dir / temp, self.out_dir / final)
            self.weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            write_json_atomic(self.out_dir / INDEX_NAME, index)
        fsync_dir(self.out_dir)
        self._closed = True
        self._thread.shutdown(wait=True)
        return self.weight_map

    def abort(self) -> None:
        """Removes the shards written so far (temp names only exist before finalize)."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - aborting anyway: the partial shard is removed below
            pass
        if self._file is not None:
            self._file.close()
        for temp, _ in self.shards:
            (self.out_dir / temp).unlink(missing_ok=True)
        self.shards, self._file, self._closed = [], None, True
        self._thread.shutdown(wait=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.finalize()


def _rewrite_with_header(temp: Path, header: bytes, data_bytes: int) -> None:
    """The rare shard whose header outgrew HEADER_RESERVE: header + data copied into a new file in-kernel."""
    fresh = temp.with_name(temp.name + ".new")
    with open(temp, "rb") as src, open(fresh, "wb") as dst:
        dst.write(struct.pack("<Q", len(header)) + header)
        dst.flush()
        offset, left = HEADER_RESERVE, data_bytes
        while left:
            n = os.copy_file_range(src.fileno(), dst.fileno(), left, offset)
            if n == 0:
                raise OSError(f"{temp}: short copy, {left} bytes left")
            offset, left = offset + n, left - n
        os.fsync(dst.fileno())
    os.replace(fresh, temp)
