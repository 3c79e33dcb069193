"""Tiny models and adapters built on the fly (seconds, CPU), plus helpers to write pipeline configs."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A fused kernel that fails to compile raises (also in the pipeline subprocesses) instead of handing over to its
# eager twin, which would make the fused-vs-twin tests compare the twin with itself. Set 0 to run without a C++
# compiler; the tests that count compiled calls then fail, as they should.
os.environ.setdefault("QMERGE_COMPILE_STRICT", "1")
warnings.filterwarnings("ignore", module="transformers|peft|bitsandbytes")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_config(arch: str = "llama", tied: bool = True, bias: bool = False):
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0,
                          eos_token_id=0, tie_word_embeddings=tied)
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                       attention_bias=bias, mlp_bias=bias, bos_token_id=0, eos_token_id=0, pad_token_id=None)


def make_base(folder: Path, arch: str = "llama", dtype: str = "bfloat16", tied: bool = True, bias: bool = False,
              seed: int = 0) -> Path:
    """A randomly initialised tiny causal LM saved as an HF folder in `dtype`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied, bias))
    with torch.no_grad():  # larger-than-init weights so NF4 error and deltas are visible in logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif bias:
                p.add_(torch.randn_like(p) * 0.02)
    model.to(DTYPES[dtype]).save_pretrained(folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int = 1, b_std: float = 0.05, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (B is zero at init, so we draw it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, b_std)
            elif "lora_embedding_A" in name:  # PEFT inits embedding A to zero (and B randomly)
                p.normal_(0, 1.0)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand_like(p))
            elif "modules_to_save" in name or ("bias" in name and "lora" not in name and p.requires_grad):
                p.add_(torch.randn_like(p) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(folder)
    return folder


def write_config(folder: Path, base: Path, adapters: list[tuple[Path, float]], *, merge: dict | None = None,
                 nf4: dict | None = None, extra: str = "") -> Path:
    merge = {"dtype": "float32", "device": "cpu", **(merge or {})}
    nf4 = {"load_dtype": "auto", "compute_dtype": "float32", **(nf4 or {})}
    lines = ['name = "tiny"', f'work_dir = "{folder / "work"}"', "[base]", f'path = "{base}"', "[base.nf4]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in nf4.items()]
    for path, weight in adapters:
        lines += ["[[adapters]]", f'path = "{path}"', f"weight = {weight}"]
    lines += ["[merge]"] + [f"{k} = {json.dumps(v)}" for k, v in merge.items()]
    lines += ["[output]", f'dir = "{folder / "releases"}"']
    path = folder / "qmerge.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run_cli(*args: str) -> int:
    from qmerge.cli import main

    return main(["pipeline", *map(str, args), "--quiet"])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(1, 96, (3, 24), generator=g)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "llama")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CHARS = [chr(c) for c in range(32, 127)]  # 95 printable ASCII characters + [UNK] = vocab 96


def save_char_tokenizer(folder: Path) -> None:
    """A character-level tokenizer over printable ASCII (vocab 96) saved into an HF folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def write_text_spec(folder: Path, name: str, documents: str) -> Path:
    """A text spec over gensim's lee news corpus (installed with gensim; nothing copied into the repo)."""
    path = folder / f"{name}.toml"
    path.write_text('[source]\npath = "package:gensim/test/test_data/lee_background.cor"\n'
                    f'[split]\ndocuments = "{documents}"\n')
    return path


def train_tiny_adapter(base: Path, folder: Path, steps: int = 60, **lora_kwargs) -> Path:
    """A tiny LoRA adapter trained QLoRA-style (against W_nf4, float32) on lee documents 0:40, so that
    on held-out lee text it measurably helps: delta retention is then defined."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from qmerge.io.textset import build_windows, load_text_spec
    from qmerge.models import base_model_as_trained

    model = base_model_as_trained(BaseCheckpoint(base, NF4Recipe(64, True, None, "float32", None)))
    for p in model.parameters():
        p.requires_grad_(False)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora_kwargs))
    spec = load_text_spec(write_text_spec(folder.parent, "tiny-train", "0:40"))
    ids = build_windows(AutoTokenizer.from_pretrained(base), spec, 64, None).ids
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = ids[(step * 8) % (len(ids) - 8):][:8]
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(folder)
    return folder


def scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    """A copy of adapter `src` with every lora_B multiplied by `factor`: the same direction, a smaller ΔW."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    shutil.copyfile(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(src / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"))
    return dst


# On a random tiny base the trained adapter is huge (‖ΔW‖/‖W‖ ≈ 1.5; real QLoRA deltas are ~1e-2 and
# below): NF4 re-quantization or bf16 rounding barely dents it. Scaled down it is the fragile kind the
# gate exists for — measured: ×0.03 gives mean |ΔW| 0.0025 (below the ~0.02 NF4 step of these weights)
# and still a 0.33 ± 0.01 nat held-out effect; ×0.002 puts ΔW below half a bf16 ulp of most weights.
FRAGILE = 0.03
SUB_BF16 = 0.002


@pytest.fixture(scope="session")
def gated(tmp_path_factory) -> dict:
    """A tiny llama with a char tokenizer, trained adapters (strong, fragile, sub-bf16-ulp, rslora), and
    held-out lee text specs."""
    root = tmp_path_factory.mktemp("gated")
    base = make_base(root / "base", dtype="float32")
    save_char_tokenizer(base)
    adapter = train_tiny_adapter(base, root / "adapter")
    rs_adapter = train_tiny_adapter(base, root / "adapter-rslora", use_rslora=True)
    return {"root": root, "base": base, "adapter": adapter, "rslora": rs_adapter,
            "fragile": scaled_adapter(adapter, root / "adapter-fragile", FRAGILE),
            "sub_bf16": scaled_adapter(adapter, root / "adapter-sub-bf16", SUB_BF16),
            "heldout": write_text_spec(root, "heldout", "200:260"), "select": write_text_spec(root, "select", "150:200")}


def gate_config(folder: Path, g: dict, adapter: Path | None = None, merge: dict | None = None, gate: str = "") -> Path:
    extra = (f'[gate]\neval = "{g["heldout"]}"\nwindows = 24\nseq_len = 64\nbatch_size = 8\n{gate}')
    return write_config(folder, g["base"], [(adapter or g["adapter"], 1.0)], merge=merge,
                        nf4={"load_dtype": "float32", "compute_dtype": "float32"}, extra=extra)
