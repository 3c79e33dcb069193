"""The numerics every module shares (docs/design.md, "Numerics rules"): one math dtype, the storage dtypes by
name, and the rule that nothing called float32 runs in TF32 on CUDA."""

from __future__ import annotations

import contextlib

import torch

MATH_DTYPE = torch.float32  # all merge, GPTQ and evaluation math; storage dtypes are cast to once, at write
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def no_tf32():
    """TF32 off for the duration: a float32 matmul on CUDA must be float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
