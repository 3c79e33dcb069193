"""One loop in C, for the pass numpy cannot fuse: TIES' bracket pass over a delta's magnitudes (ops/combine.py
`_count_and_gather`: how many |x| exceed the bracket, and the |x| inside it, in order). numpy makes it six passes
over each block (abs, two comparisons, an `and`, a count, a boolean gather), 70-80 ms per 11008x4096 delta on two
threads; the C loop reads each entry once, 31-36 ms, and 17-19 ms in its AVX-512 form (16 entries a step, the
inside ones compressed to the front of a register), taken where the CPU has AVX-512F.

Built once per machine with the C compiler (`$CC`, else cc, gcc, clang, or a C++ compiler; inductor, which
compiles the fused kernels, needs one too) into `<qmerge cache>/native/<sha256 of source and compiler>.so`, atomically (parallel
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
import threading
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
#ifdef __cplusplus
extern "C" {  /* a C++ compiler (g++ is all some machines have) keeps the names unmangled */
#endif

static int64_t scalar(const uint32_t *x, int64_t n, uint32_t lo, uint32_t hi, uint32_t *inside, int64_t *above) {
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

/* 16 entries per step: compare as unsigned words, count, and compress the entries inside the bracket to the front
   of a register stored at inside + j (the lanes past them are overwritten by the next store: j <= i <= n - 16, so
   the store stays inside the n entries of room). */
__attribute__((target("avx512f")))
static int64_t avx512(const uint32_t *x, int64_t n, uint32_t lo, uint32_t hi, uint32_t *inside, int64_t *above) {
    const __m512i mask = _mm512_set1_epi32(0x7fffffff), vinf = _mm512_set1_epi32(0x7f800000),
                  vhi = _mm512_set1_epi32((int)hi), vlo = _mm512_set1_epi32((int)lo),
                  vspan = _mm512_set1_epi32((int)(hi - lo));
    int64_t a = 0, j = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i u = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), mask);
        __mmask16 ok = _mm512_cmple_epu32_mask(u, vinf);
        __mmask16 in = _mm512_mask_cmple_epu32_mask(ok, _mm512_sub_epi32(u, vlo), vspan);
        a += __builtin_popcount((unsigned)_mm512_mask_cmpgt_epu32_mask(ok, u, vhi));
        if (in) {
            _mm512_storeu_si512((void *)(inside + j), _mm512_maskz_compress_epi32(in, u));
            j += __builtin_popcount((unsigned)in);
        }
    }
    int64_t tail_above = 0;
    j += scalar(x + i, n - i, lo, hi, inside + j, &tail_above);
    *above = a + tail_above;
    return j;
}
#define HAVE_AVX512 1
#endif

int64_t qmerge_count_and_gather(const uint32_t *x, int64_t n, uint32_t lo, uint32_t hi, uint32_t *inside,
                                int64_t *above) {
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return avx512(x, n, lo, hi, inside, above);
#endif
    return scalar(x, n, lo, hi, inside, above);
}

int64_t qmerge_count_and_gather_portable(const uint32_t *x, int64_t n, uint32_t lo, uint32_t hi, uint32_t *inside,
                                         int64_t *above) {
    return scalar(x, n, lo, hi, inside, above);
}
#ifdef __cplusplus
}
#endif
"""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang", "c++", "g++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


_FIRST_LOAD = threading.Lock()


@functools.cache
def _library() -> ctypes.CDLL | None:
    # functools.cache does not hold back a second thread whose call starts before the first returns: the bracket
    # pass calls this from both worker threads at once. The lock makes the second wait and load the first's build.
    with _FIRST_LOAD:
        return _load()


def _load() -> ctypes.CDLL | None:
    if os.environ.get("QMERGE_NO_COMPILE"):
        return None
    try:
        compiler = _compiler()
        if compiler is None:
            raise FileNotFoundError("no C compiler ($CC, cc, gcc, clang, c++, g++)")
        key = hashlib.sha256(f"{SOURCE}\0{compiler}".encode()).hexdigest()[:16]
        target = default_cache_root() / "native" / f"bracket-{key}.so"
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        functions = (lib.qmerge_count_and_gather, lib.qmerge_count_and_gather_portable)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:  # AttributeError: a symbol missing
        why = f"{e}: {e.stderr.decode(errors='replace').strip()[:500]}" if getattr(e, "stderr", None) else str(e)
        if compile_strict():
            raise KernelCompileError(f"cannot build qmerge's C helper: {why}") from e
        log.warning("cannot build qmerge's C helper (%s); using numpy (same results, slower)", why)
        return None
    for fn in functions:
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


def count_and_gather(block: np.ndarray, lo: float, hi: float, portable: bool = False
                     ) -> tuple[int, np.ndarray] | None:
    """(how many |x| > hi, the |x| in [lo, hi] in flat order) for a float32 block and 0 <= lo <= hi (float32
    values); None where the C helper is unavailable or the block is not float32. `portable`: the plain C loop even
    where the CPU has AVX-512F (for tests: both forms must give numpy's answer)."""
    lib = _library() if block.dtype == np.float32 else None
    if lib is None:
        return None
    block = np.ascontiguousarray(block)
    inside = np.empty(block.size, dtype=np.uint32)  # room for all; only the pages written are ever touched
    above = ctypes.c_int64()
    fn = lib.qmerge_count_and_gather_portable if portable else lib.qmerge_count_and_gather
    found = fn(block.ctypes.data, block.size, _bits(lo), _bits(hi), inside.ctypes.data, ctypes.byref(above))
    return above.value, inside[:found].view(np.float32).copy()  # the copy lets the block-sized room go
