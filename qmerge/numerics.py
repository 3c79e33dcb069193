"""The numerics every module shares (docs/design.md, "Numerics rules"): one math dtype, the storage dtypes by
name, and the rule that nothing called float32 runs in TF32 on CUDA."""

from __future__ import annotations

import contextlib

import torch

MATH_DTYPE = torch.float32  # all merge, GPTQ and evaluation math; storage dtypes are cast to once, at write
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cast_as_trained(w: torch.Tensor, casts) -> torch.Tensor:
    """The casts the trained model applied to the float32 NF4 product code·absmax (`NF4Recipe.seen_dtype_chain`),
    each back to float32: the one definition of "the weight as trained" that the fused merge kernel, its eager
    twin, the evaluation reference and the weight-space retention all use."""
    for dtype in casts:
        w = w.to(dtype).to(MATH_DTYPE)
    return w


@contextlib.contextmanager
def no_tf32():
    """TF32 off for the duration: a float32 matmul on CUDA must be float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
