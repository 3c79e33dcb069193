"""One loop in C, for the pass numpy cannot fuse: TIES' bracket pass over a delta's magnitudes (ops/combine.py
`_count_and_gather`: how many |x| exceed the bracket, and the |x| inside it, in order). numpy makes it six passes
over each block (abs, two comparisons, an `and`, a count, a boolean gather), 70-80 ms per 11008x4096 delta on two
threads; the C loop reads each entry once, 31-36 ms.

Built once per machine with the C compiler (`$CC`, else cc, gcc or clang; inductor, which compiles the fused
kernels, needs one too) into `<qmerge cache>/native/<sha256 of source and compiler>.so`, atomically (parallel
builds of a matrix share it), and loaded with ctypes, which releases the GIL during the call: callers run blocks on
threads. Where no compiler is found, the build fails or `QMERGE_NO_COMPILE=1` is set, `count_and_gather` is None
and the caller takes numpy, which gives the same results (tested), only slower; under `QMERGE_COMPILE_STRICT=1`
(the test suite) a failed build raises, so a test of this path cannot pass by comparing numpy with itself.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from qmerge.errors import KernelCompileError
from qmerge.io.paths import default_cache_root
from qmerge.ops.nf4 import compile_strict

log = logging.getLogger(__name__)

# |x| of float32 entries by their bits (a non-negative float's bits order as its value: +inf included); a NaN
# (bits above +inf's) is neither above nor inside, as it compares false in numpy.
SOURCE = r"""
#include <stdint.h>

int64_t qmerge_count_and_gather(const uint32_t *x, int64_t n, uint32_t lo, uint32_t hi, uint32_t *inside,
                                int64_t *above) {
    const uint32_t span = hi - lo;
    int64_t a = 0, j = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = x[i] & 0x7fffffffu;
        if (u > 0x7f800000u) continue;
        a += u > hi;
        if (u - lo <= span) inside[j++] = u;
    }
    *above = a;
    return j;
}
"""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QMERGE_NO_COMPILE"):
        return None
    try:
        compiler = _compiler()
        if compiler is None:
            raise FileNotFoundError("no C compiler ($CC, cc, gcc, clang)")
        key = hashlib.sha256(f"{SOURCE}\0{compiler}".encode()).hexdigest()[:16]
        target = default_cache_root() / "native" / f"bracket-{key}.so"
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        if compile_strict():
            raise KernelCompileError(f"cannot build qmerge's C helper: {e}") from e
        log.warning("cannot build qmerge's C helper (%s); using numpy (same results, slower)", e)
        return None
    fn = lib.qmerge_count_and_gather
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_int64)]
    return lib


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "bracket.c", Path(tmp) / "bracket.so"
        source.write_text(SOURCE)
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source)], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)  # whole or not at all, whoever builds it first


def _bits(value: float) -> int:
    return int(np.float32(value).view(np.uint32))


def count_and_gather(block: np.ndarray, lo: float, hi: float) -> tuple[int, np.ndarray] | None:
    """(how many |x| > hi, the |x| in [lo, hi] in flat order) for a float32 block and 0 <= lo <= hi (float32
    values); None where the C helper is unavailable or the block is not float32."""
    lib = _library() if block.dtype == np.float32 else None
    if lib is None:
        return None
    block = np.ascontiguousarray(block)
    inside = np.empty(block.size, dtype=np.uint32)  # room for all; only the pages written are ever touched
    above = ctypes.c_int64()
    found = lib.qmerge_count_and_gather(block.ctypes.data, block.size, _bits(lo), _bits(hi), inside.ctypes.data,
                                        ctypes.byref(above))
    return above.value, inside[:found].view(np.float32).copy()  # the copy lets the block-sized room go
