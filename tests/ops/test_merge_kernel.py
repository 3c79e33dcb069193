"""`nf4_merge` (one C loop per weight) against its op-by-op twin `nf4_merge_reference`: the stored bits identical, the
retention sums equal to float64 rounding, for every weight dtype, storage dtype and cast chain the merge stage can
ask for, on each CPU kind of the loop (plain, AVX2, AVX-512); and the merge stage writes the same checkpoint with or
without the fused path. Each fused case also checks that the C loop answered (`MERGE.ran`): the suite runs with
QMERGE_COMPILE_STRICT, and a silent fallback would compare the twin with itself."""

from __future__ import annotations

import json

import pytest
import torch

from qmerge.ops import merge_kernel
from qmerge.ops.lora import lora_delta
from qmerge.ops.merge_kernel import nf4_merge, nf4_merge_reference
from tests.conftest import make_adapter, run_cli, write_config

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CHAINS = [(F32,), (BF16,), (F16,), (BF16, F16), ()]  # NF4Recipe.seen_dtype_chain's shapes


def _inputs(shape=(192, 128), delta_scale=1e-5, seed=0, dtype=BF16):
    """A bf16 weight and a LoRA product small enough (1e-5 against weights ~0.02) that bf16 rounding of the
    dequantized weight or of the stored sum visibly changes the result."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    a = torch.randn(8, shape[1], generator=g)
    b = torch.randn(shape[0], 8, generator=g) * delta_scale
    return w, a, b


@pytest.mark.parametrize("storage", [F32, BF16, F16])
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_fused_equals_op_by_op(storage, chain, double_quant, dtype):
    w, a, b = _inputs(dtype=dtype)
    scale = 16 / 8 ** 0.5  # rslora: not a power of two, so the float32 product rounds
    ba = b @ a
    assert torch.equal(ba * scale, lora_delta(a, b, scale))  # the factor/scale split is lora_delta's product
    ran = merge_kernel.MERGE.ran
    stored, metrics = nf4_merge(w, ba, scale, 64, double_quant, chain, storage)
    assert merge_kernel.MERGE.ran == ran + 1
    ref_stored, ref_metrics = nf4_merge_reference(w, ba, scale, 64, double_quant, chain, storage)
    assert stored.dtype == storage and stored.shape == w.shape
    assert torch.equal(stored, ref_stored)
    assert metrics == pytest.approx(ref_metrics, rel=1e-12, abs=0)


def test_the_casts_matter_on_this_input():
    """The test above can fail: on its input a kernel that skipped the bf16 cast of W_nf4 (what inductor does
    without emulate_precision_casts) or the storage rounding would give other bits or other retention."""
    w, a, b = _inputs()
    ba = b @ a
    f32_chain = nf4_merge_reference(w, ba, 2.0, 64, True, (F32,), BF16)
    bf16_chain = nf4_merge_reference(w, ba, 2.0, 64, True, (BF16,), BF16)
    assert not torch.equal(f32_chain[0], bf16_chain[0])
    assert abs(f32_chain[1][0] - bf16_chain[1][0]) > 0.05  # measured 0.988 vs 0.908
    kept_f32 = nf4_merge_reference(w, ba, 2.0, 64, True, (BF16,), F32)[1][0]
    assert kept_f32 == pytest.approx(1.0, abs=1e-12) and bf16_chain[1][0] < 0.95


@pytest.mark.parametrize("shape", [(37, 29), (3, 64)])
def test_partial_blocks_and_eager_fallback(shape, monkeypatch):
    w, a, b = _inputs(shape)
    ba = b @ a
    ran = merge_kernel.MERGE.ran
    fused = nf4_merge(w, ba, 2.0, 64, True, (BF16,), BF16)
    assert merge_kernel.MERGE.ran == ran + (w.numel() % 64 == 0)  # a partial block takes the op-by-op path
    monkeypatch.setenv("QMERGE_NO_COMPILE", "1")
    eager = nf4_merge(w, ba, 2.0, 64, True, (BF16,), BF16)
    assert merge_kernel.MERGE.ran == ran + (w.numel() % 64 == 0)
    ref = nf4_merge_reference(w, ba, 2.0, 64, True, (BF16,), BF16)
    for got in (fused, eager):
        assert torch.equal(got[0], ref[0])
        assert got[1] == pytest.approx(ref[1], rel=1e-12, abs=0)


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["plain", "avx2", "avx512"])
def test_every_cpu_kind_of_the_loop_gives_the_op_by_op_bits(monkeypatch, kind):
    """The C loop is built for plain x86, AVX2 and AVX-512 and one is chosen at run time: the other two never run
    on this machine by themselves, so each is called here and must give the op-by-op twin's bits and sums on the
    widest mix of dtypes (f16 weight, a bf16 then f16 cast chain, bf16 storage)."""
    import functools

    from qmerge.ops import native

    w, a, b = _inputs(shape=(256, 192), dtype=F16)
    ba = b @ a
    ref = nf4_merge_reference(w, ba, 3.0, 64, True, (BF16, F16), BF16)
    lib = native._helper()
    loop = functools.partial(lib.qmerge_nf4_merge_kind, kind)
    one_kind = type("OneKind", (), {"qmerge_nf4_merge": staticmethod(loop)})
    monkeypatch.setattr(native, "_helper", lambda: one_kind)
    ran = merge_kernel.MERGE.ran
    got = nf4_merge(w, ba, 3.0, 64, True, (BF16, F16), BF16)
    if merge_kernel.MERGE.ran == ran:  # -2: no such loop in this build or CPU, so the twin answered
        pytest.skip(f"this CPU has no {['plain', 'avx2', 'avx512'][kind]} loop")
    assert torch.equal(got[0], ref[0]) and got[1] == pytest.approx(ref[1], rel=1e-12, abs=0)


def test_non_finite_merged_values_take_the_exact_path():
    """A ΔW that overflows the sum (or is NaN) stops the C loop: torch's own NaN and infinity bits are stored."""
    w, a, b = _inputs()
    ba = b @ a
    ba[7, 9], ba[100, 3] = float("inf"), float("nan")
    ran = merge_kernel.MERGE.ran
    got, ref = nf4_merge(w, ba, 2.0, 64, True, (BF16,), BF16), nf4_merge_reference(w, ba, 2.0, 64, True, (BF16,), BF16)
    assert merge_kernel.MERGE.ran == ran
    torch.testing.assert_close(got[0], ref[0], equal_nan=True, atol=0, rtol=0)


def test_non_finite_weight_takes_the_exact_path():
    w, a, b = _inputs()
    w[3, 5] = float("nan")
    ba = b @ a
    got, ref = nf4_merge(w, ba, 2.0, 64, False, (F32,), F32), nf4_merge_reference(w, ba, 2.0, 64, False, (F32,), F32)
    torch.testing.assert_close(got[0], ref[0], equal_nan=True, atol=0, rtol=0)


def test_unchanged_weight_has_no_metrics():
    w, a, b = _inputs()
    assert nf4_merge(w, torch.zeros(w.shape), 2.0, 64, True, (F32,), F32)[1] is None


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_merge_stage_same_checkpoint_with_and_without_fusion(tmp_path, tiny_llama, monkeypatch, storage):
    """The stage's fused route (quantized linears with a plain LoRA) against its op-by-op route, on two adapters
    with weights (the summed-delta case) over a bf16 base loaded as float32."""
    from safetensors.torch import load_file

    import qmerge.merging as merge

    first = make_adapter(tiny_llama, tmp_path / "a1", seed=1, b_std=1e-3)
    second = make_adapter(tiny_llama, tmp_path / "a2", seed=2, b_std=1e-3, target_modules=["q_proj", "up_proj"])
    outputs, reports, fused_calls = {}, {}, []
    real = merge._fused_merge

    def counting(*args):
        out = real(*args)
        fused_calls.append(out is not None)
        return out

    ran = merge_kernel.MERGE.ran
    for route in ("fused", "op-by-op"):
        monkeypatch.setattr(merge, "_fused_merge", counting if route == "fused" else lambda *args: None)
        folder = tmp_path / route
        folder.mkdir()
        cfg = write_config(folder, tiny_llama, [(first, 1.0), (second, 0.5)], merge={"dtype": storage},
                           nf4={"load_dtype": "float32", "compute_dtype": "bfloat16"})
        assert run_cli(cfg) == 0
        out = next((folder / "work" / "merge").iterdir())
        outputs[route] = load_file(out / "model.safetensors")
        reports[route] = json.loads((out / "merge_report.json").read_text())["layers"]
    assert sum(fused_calls) == 8  # q, v, down (first adapter) and up (second), in both layers
    assert merge_kernel.MERGE.ran == ran + 8  # each by compiled code
    assert outputs["fused"].keys() == outputs["op-by-op"].keys()
    for name, t in outputs["fused"].items():
        assert torch.equal(t, outputs["op-by-op"][name]), name
    assert reports["fused"].keys() == reports["op-by-op"].keys()
    for name, m in reports["fused"].items():
        assert m == pytest.approx(reports["op-by-op"][name], rel=1e-12, abs=0), name
