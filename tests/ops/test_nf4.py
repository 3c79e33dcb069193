"""NF4 reproduction: the torch path equals bitsandbytes bit for bit, and both equal what transformers +
bitsandbytes hold after loading a model with BitsAndBytesConfig(nf4, double quant). The fused round trip's tests
check that the C loop answered (`ROUNDTRIP.ran`), not its op-by-op twin."""

from __future__ import annotations

import pytest
import torch

from qmerge.ops.nf4 import (NF4_CODE, ROUNDTRIP, dequantize_nf4, dequantize_nf4_bnb, nf4_state_from_serialized,
                            nf4_weight, quantize_nf4, quantize_nf4_bnb)
from tests.conftest import make_base


def assert_same_state(a, b):
    assert torch.equal(a.packed, b.packed)
    assert torch.equal(a.absmax, b.absmax)
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    if a.nested:
        assert torch.equal(a.nested_absmax, b.nested_absmax) and torch.equal(a.offset, b.offset)


@pytest.mark.parametrize("shape", [(128, 64), (37, 29), (5, 3), (1, 1), (96, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_path_matches_bitsandbytes(shape, dtype, double_quant):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    if w.numel() >= 64:
        w.view(-1)[:64] = 0  # an all-zero block
    ours, bnb = quantize_nf4(w, 64, double_quant), quantize_nf4_bnb(w, 64, double_quant)
    assert_same_state(ours, bnb)
    assert torch.equal(dequantize_nf4(ours), dequantize_nf4_bnb(bnb))


def test_round_trip_error_is_bounded_and_nonzero():
    w = torch.randn(256, 64)
    back = dequantize_nf4(quantize_nf4(w, 64, False))
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    max_gap = float((NF4_CODE[1:] - NF4_CODE[:-1]).max())
    err = (back - w).view(-1, 64).abs()
    assert float(err.max()) > 0
    assert bool((err <= absmax * max_gap / 2 + 1e-6).all())


def test_codes_do_not_depend_on_bf16_vs_float32_upcast():
    w = torch.randn(64, 128).to(torch.bfloat16)
    a, b = quantize_nf4(w), quantize_nf4(w.float())
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32


def test_matches_transformers_load_time_quantization(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = make_base(tmp_path / "base", dtype="bfloat16")
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu", dtype=torch.bfloat16)
    loaded.save_pretrained(tmp_path / "bnb")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "bnb" / "model.safetensors")
    import bitsandbytes.functional as F

    checked, ran = 0, ROUNDTRIP.ran
    for name, module in loaded.named_modules():
        if getattr(getattr(module, "weight", None), "quant_state", None) is None:
            continue
        w = original.get_submodule(name).weight.data
        ours = quantize_nf4(w, 64, True)
        assert torch.equal(ours.packed, module.weight.data)
        assert torch.equal(ours.absmax, module.weight.quant_state.absmax)
        expected = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert torch.equal(nf4_weight(w, 64, True, torch.bfloat16), expected)
        from_disk = nf4_state_from_serialized(saved, name)
        assert torch.equal(dequantize_nf4(from_disk).float(), expected)
        checked += 1
    assert checked == 14  # 7 linears x 2 layers; lm_head and embeddings stay unquantized
    assert ROUNDTRIP.ran == ran + 14


@pytest.mark.parametrize("stored,load,compute", [("float16", "bfloat16", "bfloat16"),
                                                 ("float32", "bfloat16", "bfloat16"),
                                                 ("float32", "float16", "bfloat16")])
def test_cast_chain_matches_bitsandbytes(tmp_path, stored, load, compute):
    """A base stored in one dtype and loaded in another: bitsandbytes quantizes the loaded (rounded) weight,
    dequantizes to that dtype and Linear4bit casts to compute_dtype. `as_trained` (NF4Recipe.seen_dtype_chain)
    must give exactly what bitsandbytes gives, checked against bitsandbytes' own dequantize_4bit."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qmerge.io.base import BaseCheckpoint, NF4Recipe
    from tests.conftest import DTYPES

    base = make_base(tmp_path / "base", dtype=stored)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=DTYPES[compute])
    loaded = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu", dtype=DTYPES[load])
    ours = BaseCheckpoint(base, NF4Recipe(64, True, load, compute, None))
    unloaded = BaseCheckpoint(base, NF4Recipe(64, True, None, compute, None))  # the chain without the load cast
    checked = differs = 0
    for name, module in loaded.named_modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is None:
            continue
        assert qs.dtype == DTYPES[load] and qs.nested and module.compute_dtype == DTYPES[compute]
        expected = F.dequantize_4bit(module.weight.data, qs).to(module.compute_dtype).float()
        assert torch.equal(ours.as_trained(f"{name}.weight"), expected), name
        differs += not torch.equal(unloaded.as_trained(f"{name}.weight"), expected)
        checked += 1
    assert checked == 14
    assert differs == 14  # the load cast changes every weight here: a chain that skipped it would fail above


@pytest.mark.gpu
def test_cuda_and_cpu_codes(capsys):
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cpu = quantize_nf4(w)
    gpu = quantize_nf4_bnb(w.cuda())
    differ = int((cpu.packed != gpu.packed.cpu()).sum())
    dw = (nf4_weight(w) - nf4_weight(w, device="cuda")).abs().max().item()
    print(f"CUDA vs CPU: {differ} of {cpu.packed.numel()} packed bytes differ, max |dW| {dw:.3e}")
    assert differ <= cpu.packed.numel() // 1000


@pytest.mark.parametrize("shape", [(128, 64), (37, 64), (96, 200), (5, 3), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_roundtrip_is_bit_identical_to_slow_twin(shape, dtype, double_quant):
    from qmerge.ops.nf4 import nf4_roundtrip_fused

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    if w.numel() >= 128:
        w.view(-1)[:64] = 0  # an all-zero block
        w.view(-1)[64] = 1e-30  # a block whose absmax is tiny
    if w.numel() >= 256:
        w.view(-1)[128:192] = -0.0  # an all-negative-zero block (absmax +0, as |w|'s maximum)
        w.view(-1)[192:256] = w.view(-1)[192:256].abs().neg()  # a block whose absmax is its minimum's magnitude
    slow = dequantize_nf4(quantize_nf4(w, 64, double_quant), torch.float32)
    ran = ROUNDTRIP.ran
    fast = nf4_roundtrip_fused(w, 64, double_quant)
    assert ROUNDTRIP.ran == ran + (w.numel() % 64 == 0)  # a partial block takes the slow twin
    assert fast.dtype == torch.float32 and torch.equal(fast, slow)


def test_fused_roundtrip_codes_exact_at_midpoints():
    """Values exactly on, and one ulp either side of, every midpoint (after scaling by 1/absmax = 1)."""
    from qmerge.ops.nf4 import NF4_MIDPOINTS, nf4_roundtrip_fused

    m = NF4_MIDPOINTS
    vals = torch.cat([m, torch.nextafter(m, torch.full_like(m, 2.0)), torch.nextafter(m, torch.full_like(m, -2.0))])
    w = torch.cat([vals, torch.tensor([1.0])]).repeat(64)[: 64 * 46].reshape(-1, 64)
    w[:, 0] = 1.0  # absmax 1 in every block: scaled == value
    slow = dequantize_nf4(quantize_nf4(w, 64, False), torch.float32)
    ran = ROUNDTRIP.ran
    assert torch.equal(nf4_roundtrip_fused(w, 64, False), slow)
    assert ROUNDTRIP.ran == ran + 1


def test_fused_roundtrip_falls_back_on_nan():
    from qmerge.ops.nf4 import nf4_roundtrip_fused

    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    slow = dequantize_nf4(quantize_nf4(w, 64, False), torch.float32)
    ran = ROUNDTRIP.ran
    torch.testing.assert_close(nf4_roundtrip_fused(w, 64, False), slow, equal_nan=True, atol=0, rtol=0)
    assert ROUNDTRIP.ran == ran  # NaN semantics only bucketize keeps


def test_nf4_weight_cpu_equals_slow_twin_on_a_llama_sized_layer():
    w = (torch.randn(1024, 4096, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    slow = dequantize_nf4(quantize_nf4(w, 64, True), torch.float32).to(torch.bfloat16).float()
    ran = ROUNDTRIP.ran
    assert torch.equal(nf4_weight(w, 64, True, torch.bfloat16, "cpu"), slow)
    assert ROUNDTRIP.ran == ran + 1


def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _with_graph_break(x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.graph_break()
    return x * 2


def test_what_dynamo_would_run_eagerly_is_a_failure(monkeypatch):
    """Dynamo runs a graph break, or a graph past its recompile limit, as plain Python without a word; a kernel
    makes both a compile failure, so that `ran` counts compiled code only."""
    from qmerge.errors import KernelCompileError
    from qmerge.ops import nf4

    monkeypatch.setenv("QMERGE_COMPILE_STRICT", "1")
    monkeypatch.setattr(nf4, "RECOMPILE_LIMIT", 1)
    kernel, x = nf4.CompiledKernel(_twice), torch.ones(64)
    assert torch.equal(kernel(x), x * 2) and kernel.ran == 1
    with pytest.raises(KernelCompileError, match="_twice"):
        kernel(x.double())  # a second graph
    with pytest.raises(KernelCompileError, match="_with_graph_break"):
        nf4.CompiledKernel(_with_graph_break)(x)
    assert kernel.ran == 1
