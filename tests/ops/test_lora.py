"""LoRA math against its slow twins."""

from __future__ import annotations

import torch

from qmerge.ops.lora import dora_weight, dora_weight_reference, embedding_delta, lora_delta, lora_scale


def test_dora_weight_matches_its_row_by_row_float64_twin():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g) * 0.05
    delta = torch.randn(48, 32, generator=g) * 1e-3
    magnitude = w.norm(dim=1) * (1 + 0.1 * torch.rand(48, generator=g))
    fast = dora_weight(w, delta, magnitude)
    slow = dora_weight_reference(w, delta, magnitude)
    assert torch.allclose(fast.double(), slow, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(fast, w + delta, rtol=1e-4)  # the magnitude really rescales rows


def test_scales_and_layouts():
    assert lora_scale(16, 4, False) == 4.0 and lora_scale(16, 4, True) == 8.0
    a, b = torch.randn(4, 10), torch.randn(6, 4)
    assert lora_delta(a, b, 2.0).shape == (6, 10)
    assert torch.equal(embedding_delta(a, b, 2.0), (b @ a * 2.0).T)


def test_delta_into_a_kept_buffer_is_the_same_product():
    """The merge forms ΔW into buffers it keeps from one tensor to the next (merging.Scratch): the same bits as a
    fresh product, written into the buffer given, for shapes that differ from the buffer's first use."""
    from qmerge.merging import Scratch

    g = torch.Generator().manual_seed(2)
    scratch = Scratch()
    for out_features, in_features, r in ((96, 64, 8), (40, 24, 4), (200, 64, 16)):
        a = torch.randn(r, in_features, generator=g, dtype=torch.bfloat16)
        b = torch.randn(out_features, r, generator=g)
        into = scratch.take(("delta", 0), (out_features, in_features))
        got = lora_delta(a, b, 0.37, out=into)
        assert got.data_ptr() == into.data_ptr()
        assert torch.equal(got, lora_delta(a, b, 0.37))
    assert scratch.take(("delta", 0), (10, 10)).data_ptr() == into.data_ptr()  # kept, not reallocated
    scratch.make_room(200 * 64)  # a tensor no larger than the buffer: kept
    assert scratch.take(("delta", 0), (10, 10)).data_ptr() == into.data_ptr()
    scratch.make_room(200 * 64 + 1)  # a larger one merged without them: all let go
    assert scratch._buffers == {}
    for k in range(4):
        scratch.take(("delta", k), (3, 3))
    scratch.drop(keep=2)  # what TIES/DARE hold through the merge kernel: the first two
    assert sorted(scratch._buffers) == [("delta", 0), ("delta", 1)]
