"""llama.cpp itself on the GGUF files qmerge released, against qmerge's own figures for the same files.

    pip install llama-cpp-python      # compiles llama.cpp (minutes); never part of qmerge's install or CI
    python -m qmerge pipeline configs/demo-formats.toml
    python benchmarks/llama_cpp_gguf.py releases/smollm2-demo-formats/latest --export-dir runs/demo/export/<key>

For every GGUF artifact in the release's manifest (shipped ones from the release, rejected ones from
`--export-dir`, where the export stage left them), this rebuilds the gate's eval windows (checked against the
manifest's token sha256), runs each window through llama.cpp (llama-cpp-python, all logits) and compares its
per-window mean NLL with the one qmerge's evaluate computed from the same file (qmerge's own GGUF reader and
dequantizer, float32 forward). Also checks that llama.cpp's tokenizer, reading the vocabulary, merges and
pre-tokenizer name qmerge wrote, splits the eval text into the same token ids as the source tokenizer.
llama.cpp's quantized matmuls also quantize the activations (Q8 for Q8_0/Q4_0 weights), so its figures differ a
little by design; a wrong tensor, permutation or scale would differ by far more. Prints one table and writes
benchmarks/results/llama_cpp_gguf.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("release", type=Path, help="a release folder (holds manifest.json)")
    p.add_argument("--export-dir", type=Path, help="the export stage's folder, for GGUF artifacts the gate rejected")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "llama_cpp_gguf.json")
    return p.parse_args(argv)


def window_nll(llm, ids: list[int]):
    """Mean next-token NLL of one window under llama.cpp's logits (float64 log-softmax); also gguf_write.py's."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (compiles llama.cpp)", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from qmerge.io.textset import build_windows, load_documents, load_text_spec

    manifest = json.loads((args.release / "manifest.json").read_text())
    tokens = manifest["metrics"]["tokens"]
    folder = next(args.release / a["folder"] for a in manifest["artifacts"].values()
                  if a["shipped"] and (args.release / a["folder"] / "tokenizer.json").is_file())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = load_text_spec(Path(tokens["spec_path"]))
    windows = build_windows(tokenizer, spec, tokens["seq_len"], tokens["windows"])
    if windows.sha256 != tokens["sha256"]:
        print(f"eval windows differ from the release's (sha256 {windows.sha256[:16]} vs {tokens['sha256'][:16]})",
              file=sys.stderr)
        return 2
    text = "\n".join(load_documents(spec))
    hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = {}
    for name, art in manifest["artifacts"].items():
        if not name.startswith("gguf-"):
            continue
        where = args.release if art["shipped"] else args.export_dir
        path = where / art["folder"] / "model.gguf" if where else None
        if path is None or not path.is_file():
            print(f"{name}: {path or 'not in the release'}: no model.gguf (rejected artifacts live in the export stage: "
                  "--export-dir)", file=sys.stderr)
            continue
        start = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=tokens["seq_len"], n_batch=tokens["seq_len"],
                              logits_all=True, verbose=False, n_threads=os.cpu_count())
        cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        mismatch = next((i for i, (a, b) in enumerate(zip(cpp_ids, hf_ids)) if a != b),
                        None if len(cpp_ids) == len(hf_ids) else min(len(cpp_ids), len(hf_ids)))
        cpp = [window_nll(llm, w.tolist()) for w in windows.ids]
        seconds = time.perf_counter() - start
        ours = manifest["metrics"]["per_window"]["nll"][name]
        diffs = [a - b for a, b in zip(cpp, ours)]
        rows[name] = {
            "file": str(path), "verdict": art["verdict"],
            "ppl_qmerge": math.exp(sum(ours) / len(ours)), "ppl_llama_cpp": math.exp(sum(cpp) / len(cpp)),
            "mean_abs_window_nll_diff": sum(abs(d) for d in diffs) / len(diffs),
            "max_abs_window_nll_diff": max(abs(d) for d in diffs),
            "tokenizer_ids_equal": mismatch is None, "first_token_mismatch": mismatch,
            "tokens_compared": len(hf_ids), "seconds": seconds, "per_window_nll_llama_cpp": cpp,
        }
        del llm

    print(f"eval text: {tokens['spec']} ({tokens['windows']} x {tokens['seq_len']} tokens, sha256 "
          f"{tokens['sha256'][:16]}); reference ppl {manifest['metrics']['ppl']['reference']['value']:.3f}")
    print("| artifact | gate | ppl, qmerge readback | ppl, llama.cpp | ratio | mean / max abs Δnll per window | "
          "llama.cpp tokenizer = source tokenizer |")
    print("|---|---|---:|---:|---:|---|---|")
    for name, r in rows.items():
        same = "yes" if r["tokenizer_ids_equal"] else f"no (first difference at token {r['first_token_mismatch']})"
        print(f"| {name} | {r['verdict']} | {r['ppl_qmerge']:.3f} | {r['ppl_llama_cpp']:.3f} | "
              f"{r['ppl_llama_cpp'] / r['ppl_qmerge']:.4f} | {r['mean_abs_window_nll_diff']:.4f} / "
              f"{r['max_abs_window_nll_diff']:.4f} | {same} ({r['tokens_compared']} tokens) |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "release": str(args.release), "manifest_key": manifest.get("key"), "tokens": tokens,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "host": platform.platform(),
        "cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
