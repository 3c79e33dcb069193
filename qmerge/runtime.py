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
import sys
from concurrent.futures import ThreadPoolExecutor

from qmerge.io.paths import default_cache_root


def set_process_defaults() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_root() / "inductor"))


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_large_frees(threshold: int = 2**20) -> bool:
    """Makes glibc serve every allocation of `threshold` bytes or more by mmap, so freeing it returns the memory
    at once. Without it glibc raises its mmap threshold after the first large frees and serves later activations
    from per-thread arenas that keep what is freed: GPTQ's lockstep passes (a thread per batch) grew to 3.9 GB
    anonymous on SmolLM2 instead of 0.8 GB. No-op off glibc; returns whether it applied."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def map_on_threads(fn, items, name: str) -> list:
    """[fn(item) for item in items], in that order, on as many threads as torch uses (at most one per item): for
    numpy work, which runs on one core and releases the GIL. An item's exception is raised here."""
    import torch

    items = list(items)
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))


def pick_device(setting: str = "auto") -> str:
    """The one device rule: "auto" is CUDA when torch sees a device, else CPU; "cuda" without one is exit 2."""
    import torch

    from qmerge.errors import BadInputError

    if setting == "cuda" and not torch.cuda.is_available():
        raise BadInputError('merge.device = "cuda" but no CUDA device is available', fix='use "auto" or "cpu"')
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def native_bf16(device: str) -> bool:
    """Whether bf16 matmuls on `device` are faster than float32: a CUDA device with bf16 support, or a CPU with AMX
    tiles. AVX512-BF16 alone does not make them so: on 2 cores of such a CPU without AMX (2026-12-05), a
    4096 × 576 × 1536 bf16 linear ran at 84 GFLOP/s against float32's 150, and the demo's GPTQ forwards took
    191 s in bf16 against 153 s in float32 (benchmarks/README.md). Elsewhere bf16 is emulated and slower still."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def forward_dtype(setting: str, device: str) -> str:
    """`quantize.forward_dtype` resolved: "auto" is bfloat16 where `device`'s bf16 matmuls are the faster ones
    (GPTQModel's precision, at about 0.6x float32's time on a CPU with AMX), float32 elsewhere."""
    if setting != "auto":
        return setting
    return "bfloat16" if native_bf16(device) else "float32"


# Loggers of libraries qmerge imports whose warnings are not actionable for a qmerge user (a missing optional
# kernel package, an optional CUDA extension that cannot load on this machine). qmerge's own warnings stay.
NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


def silence_third_party() -> None:
    """For --quiet (unattended runs read by people): third-party notes that need no action go nowhere.

    - torchao / bitsandbytes log "Failed to load ..." for optional kernels; torch's pytree logs deprecation
      warnings for enums torchao registers: their loggers are set to ERROR (torch resets its own loggers when it
      is imported, so torch is imported first).
    - GPTQModel prints a banner and environment notes at import, whatever the logging levels, and PEFT imports it
      (when installed) whenever it wraps a model in LoRA layers. Its import costs about 0.8 s beyond transformers
      and PEFT, which a run that wraps no model should not pay: so it is not imported here, but whenever something
      first imports it, its output is discarded (`_QuietGptqmodel`).
    """
    import importlib.util
    import logging

    import torch  # noqa: F401 - first, see above

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if ("gptqmodel" not in sys.modules and importlib.util.find_spec("gptqmodel") is not None
            and not any(isinstance(f, _QuietGptqmodel) for f in sys.meta_path)):
        sys.meta_path.insert(0, _QuietGptqmodel())


class _QuietGptqmodel:
    """A meta path finder for `gptqmodel` alone: it returns the real spec, whose loader runs the module with stdout
    and stderr discarded (`_discarding_output`). It stays until the module is executed: PEFT asks
    `importlib.util.find_spec("gptqmodel")` (which comes here too) before it imports."""

    def find_spec(self, name, path=None, target=None):
        if name != "gptqmodel":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _discarding_output(run, module)

            spec.loader.exec_module = exec_module
        return spec


def _discarding_output(run, module) -> None:
    """`run(module)` with stdout and stderr discarded. Handlers created meanwhile (root's, transformers',
    datasets', ...) captured the discarded stream: they are pointed back at stderr, so later warnings and errors
    are neither lost nor a "--- Logging error ---" traceback about a closed file."""
    import contextlib
    import logging

    with open(os.devnull, "w") as devnull:
        try:
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                run(module)
        finally:
            for logger in (logging.root, *logging.Logger.manager.loggerDict.values()):
                for handler in getattr(logger, "handlers", ()):
                    if isinstance(handler, logging.StreamHandler) and handler.stream is devnull:
                        handler.setStream(sys.stderr)
                        if getattr(vars(handler).get("flush"), "__self__", None) is devnull:
                            del handler.flush  # transformers pins the stream's flush: back to the class's
