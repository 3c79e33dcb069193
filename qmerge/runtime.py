"""Process-wide settings qmerge's command line makes before torch is imported (so: no torch import here).

- `THP_MEM_ALLOC_ENABLE=1`: c10 reads it once, at torch's first allocation. CPU tensors of 2 MB and more are
  then allocated 2 MB-aligned and madvise'd as transparent huge pages. The merge makes a few 100 MB tensors per
  weight; on 4 KB pages each is hundreds of thousands of page faults (the 7B-shaped benchmark: 8.2 M faults,
  27 s of system time on 2 cores). `THP_MEM_ALLOC_ENABLE=0` opts out; a kernel with THP "never" ignores it.
- `TORCHINDUCTOR_CACHE_DIR=<qmerge cache>/inductor`: the fused merge kernel is built by torch.compile, and
  inductor keeps what it builds in /tmp by default, which a reboot or a fresh container empties (a first build
  took 6.8 s against 1.6 s from the cache). Kept beside qmerge's other caches, a CI job that keeps
  `~/.cache/qmerge` (or `$QMERGE_CACHE`) keeps it too.

Both are defaults: a value already in the environment wins.
"""

from __future__ import annotations

import os

from qmerge.io.paths import default_cache_root


def set_process_defaults() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_root() / "inductor"))


def pick_device(setting: str = "auto") -> str:
    """The one device rule: "auto" is CUDA when torch sees a device, else CPU; "cuda" without one is exit 2."""
    import torch

    from qmerge.errors import BadInputError

    if setting == "cuda" and not torch.cuda.is_available():
        raise BadInputError('merge.device = "cuda" but no CUDA device is available', fix='use "auto" or "cpu"')
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting
