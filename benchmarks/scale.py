"""A full 7B-shaped QLoRA through the whole pipeline on this machine, stage by stage, against the dry-run estimates.

    .venv/bin/python benchmarks/scale.py [--windows 4] [--seq-len 128] [--quantize] [--samples 8] [--70b]

Builds once (cached, benchmarks/workloads.py `7b-full`) a Llama-2-7B-shaped random bf16 base (32 layers, ~2 GB
shards, SmolLM2's tokenizer) and a random r=16 LoRA on all 7 projections, then runs each stage in its own
process (`python -m qmerge pipeline cfg --only STAGE`, benchmarks/measure.py: wall, peak anonymous RSS sampled
every 20 ms, bytes written) and prints them beside `--dry-run`'s per-stage estimates. `--quantize` adds GPTQ 4-bit
g128 on a small calibration set. `--70b` writes a Llama-2-70B-shaped header-only checkpoint (valid safetensors
headers, sparse holes for data: nothing is read) and prints its dry-run estimates.

PEFT's exact path cannot run here for a 7B (it builds whole float32 models); its need is computed, not
measured: params × 4 bytes per float32 model copy (reference + merged candidate for a gate), next to the 2.8×
checkpoint that the merge benchmark measured for its merge alone. Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from measure import run_measured  # noqa: E402
from workloads import CACHE, full7b  # noqa: E402

PY = sys.executable
EVAL_SPEC = REPO / "calibration" / "news-heldout.toml"
CAL_SPEC = REPO / "calibration" / "news.toml"


def write_config(run: Path, base: Path, adapter: Path, args) -> Path:
    lines = ['name = "scale7b"', f'work_dir = "{run / "work"}"', "[base]", f'path = "{base}"', "[base.nf4]",
             'load_dtype = "bfloat16"', 'compute_dtype = "bfloat16"', "[[adapters]]", f'path = "{adapter}"',
             "[merge]", 'dtype = "float16"',
             "[gate]", f'eval = "{EVAL_SPEC}"', f"windows = {args.windows}", f"seq_len = {args.seq_len}",
             f"batch_size = {args.windows}", "extra_eval = []"]
    if args.quantize:
        lines += ["[quantize]", "bits = 4", "group_size = 128", f'calibration = "{CAL_SPEC}"',
                  f"samples = {args.samples}", f"seq_len = {args.seq_len}"]
    lines += ["[output]", f'dir = "{run / "releases"}"']
    path = run / "scale.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def estimates(cfg_path: Path) -> dict:
    from qmerge.config import load_config
    from qmerge.stages.resolve import resolve

    return resolve(load_config(cfg_path), dry_run=True, progress=False).estimate["stages"]


def matmul_gflops() -> float:
    """float32 GEMM throughput of this machine (4096² @ 4096×2048, best of 3): the compute floor evaluate is held to."""
    import torch

    a, b = torch.randn(2048, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * 4096 * 4096 / best / 1e9


def evaluate_flops(params_per_layer: int, layers: int, vocab: int, hidden: int, tokens: int, passes: int) -> float:
    """Forward FLOPs of evaluate: 2 per weight per token for every forward pass's layers and head (attention
    scores, small at these lengths, and the LoRA branch, r/hidden of a layer, left out)."""
    return 2.0 * tokens * passes * (params_per_layer * layers + vocab * hidden)


def run_stage(cfg: Path, stage: str, log) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    m = run_measured([PY, "-m", "qmerge", "pipeline", str(cfg), "--only", stage, "--quiet"], env=env, log=log)
    return m.to_dict()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def header_only_70b(folder: Path) -> Path:
    """Llama-2-70B shapes as safetensors files whose data regions are holes (sparse): headers are real."""
    from transformers import LlamaConfig

    from workloads import _slice_tensors

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, dtype="bfloat16")
    tensors = _slice_tensors(cfg)
    kv = 8192 // 64 * 8  # grouped-query attention: k/v project to 8 heads
    tensors = [(n, (kv, 8192) if n.endswith(("k_proj.weight", "v_proj.weight")) else s) for n, s in tensors]
    weight_map, per_shard, shards = {}, 40, []
    for k in range(0, len(tensors), per_shard):
        shards.append(tensors[k:k + per_shard])
    for k, group in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for tname, shape in group:
            n = 2
            for s in shape:
                n *= s
            header[tname] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[tname] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no data written, no disk used
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(str(folder))
    return folder


def dry_run_70b(args) -> None:
    base = header_only_70b(CACHE / "llama2-70b-headers")
    from workloads import random_adapter

    adapter = random_adapter(base, CACHE / "llama2-70b-headers-r16", r=16, alpha=32, seed=70)
    run = CACHE / "scale70b-run"
    run.mkdir(parents=True, exist_ok=True)
    args.quantize = True
    cfg = write_config(run, base, adapter, args)
    est = estimates(cfg)
    print("\n### Llama-2-70B shapes, `--dry-run` estimates (header-only checkpoint, nothing loaded)\n")
    print("| stage | est. peak anon GiB | est. disk written GiB |\n|---|---:|---:|")
    for stage, e in est.items():
        print(f"| {stage} | {gib(e['peak_bytes'])} | {gib(e['disk_bytes'])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quantize", action="store_true")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--70b", dest="b70", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results" / "scale-7b.json")
    args = p.parse_args()
    if args.b70:
        dry_run_70b(args)
        return
    w = full7b()
    run = CACHE / ("scale7b-run-q" if args.quantize else "scale7b-run")
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True)
    cfg = write_config(run, w.base, w.adapter, args)
    est = estimates(cfg)
    stages = ["merge", *(["calibrate", "quantize"] if args.quantize else []), "evaluate", "gate", "promote"]
    rows = {}
    with open(run / "stages.log", "w") as log:
        for stage in stages:
            rows[stage] = run_stage(cfg, stage, log)
            print(f"{stage}: rc {rows[stage]['rc']}, {rows[stage]['wall_s']:.1f} s, "
                  f"anon peak {rows[stage]['anon_peak_mb'] / 1024:.2f} GiB", flush=True)
            if rows[stage]["rc"] not in (0, 3):
                break
    cfg_json = json.loads((w.base / "config.json").read_text())
    h, inter, layers, vocab = (cfg_json[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "vocab_size"))
    per_layer = 4 * h * h + 3 * h * inter
    params = layers * per_layer + 2 * vocab * h
    passes = 4 if args.quantize else 3  # reference, base, merged (, quantized): one forward each
    flops = evaluate_flops(per_layer, layers, vocab, h, args.windows * args.seq_len, passes)
    gflops = matmul_gflops()
    print(f"\n### {w.note}\n\n{args.windows} eval windows × {args.seq_len} tokens"
          + (f"; GPTQ 4-bit g128 on {args.samples} × {args.seq_len} calibration tokens" if args.quantize else ""))
    print("\n| stage | rc | wall s | peak anon GiB | est. peak GiB | est./measured | written GiB | est. disk GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for stage, m in rows.items():
        e = est.get(stage, {"peak_bytes": 0, "disk_bytes": 0})
        ratio = e["peak_bytes"] / (m["anon_peak_mb"] * 2**20) if m["anon_peak_mb"] else float("nan")
        print(f"| {stage} | {m['rc']} | {m['wall_s']:.1f} | {m['anon_peak_mb'] / 1024:.2f} | {gib(e['peak_bytes'])} "
              f"| {ratio:.2f} | {m['write_mb'] / 1024:.2f} | {gib(e['disk_bytes'])} |")
    if "evaluate" in rows:
        floor = flops / (gflops * 1e9)
        print(f"\nevaluate: {flops / 1e12:.1f} TFLOP of float32 forward ({passes} forward passes), this machine's GEMM "
              f"{gflops:.0f} GFLOP/s → compute floor {floor:.0f} s; measured {rows['evaluate']['wall_s']:.0f} s "
              f"= {rows['evaluate']['wall_s'] / floor:.2f}× the floor (includes imports, hashing in resolve, "
              f"re-deriving W_nf4 and reading every checkpoint).")
    print(f"\nPEFT's exact path for the same gate: whole float32 models, {params / 1e9:.2f} B params × 4 B = "
          f"{params * 4 / 2**30:.1f} GiB per copy, ×2 (reference + merged) = {2 * params * 4 / 2**30:.1f} GiB "
          "(computed, not run: more than this machine's 24 GiB).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": w.note, "args": {k: str(v) for k, v in vars(args).items()},
                                    "stages": rows, "estimates": est, "eval_flops": flops, "gemm_gflops": gflops,
                                    "params": params}, indent=2) + "\n")


if __name__ == "__main__":
    main()
