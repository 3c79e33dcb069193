"""Loops in C, for passes numpy and torch cannot fuse well on CPU:

- TIES' bracket pass over a delta's magnitudes (ops/combine.py `_count_and_gather`: how many |x| exceed the
  bracket, and the |x| inside it, in order). numpy makes it six passes over each block (abs, two comparisons, an
  `and`, a count, a boolean gather), 70-80 ms per 11008x4096 delta on two threads; the C loop reads each entry once,
  31-36 ms, and 17-19 ms in its AVX-512 form (16 entries a step, the inside ones compressed to the front of a
  register), taken where the CPU has AVX-512F. Where ΔW's top-k threshold is found from the factors' product
  (ops/combine.py `scaled_threshold`), the pass scales each entry in a register and counts the product: ΔW itself
  is never written out.
- One block of a multi-adapter combination (`combine_block`: TIES' trim or DARE's drop and rescale, then the
  election and disjoint mean or the weighted sum), the same float32 operations in the same order as ops/combine.py's
  op-by-op twin, so the same bits, each adapter's entries first scaled by its LoRA scale where given (ΔWᵢ =
  scaleᵢ·BᵢAᵢ formed in the loop from the product, as torch's `mul_` forms it); DARE's keep hash in unsigned 32-bit
  words (inductor's loop computes it in int64 lanes, split so that no signed product overflows: DARE's extra time
  over TIES' loop).
- ΔW = scale·(BA) formed from the LoRA factors a few rows at a time, in a fixed order (`form_rows`: each entry
  summed in rank order, each multiply and add rounded on its own, as ops/combine.py's `ordered_product` sums it),
  and fed to that block loop in the same call (`form_combine_block`): DARE's combination without any ΔWᵢ in memory.

Each compiled once per CPU kind (AVX-512, AVX2, plain) and chosen at run time.

Built once per machine with the C compiler (`$CC`, else cc, gcc, clang, or a C++ compiler; inductor, which
compiles the fused kernels, needs one too) into `<qmerge cache>/native/helper-<sha256 of source, compiler and
flags>.so`, atomically (parallel builds of a matrix share it), and loaded with ctypes, which releases the GIL during
the call: callers run blocks on threads. Where no compiler is found, the build fails or `QMERGE_NO_COMPILE=1` is
set, `count_and_gather` is None and `combine_available()` False, and the callers take numpy or torch's op-by-op
code, which give the same results (tested), only slower; under `QMERGE_COMPILE_STRICT=1` (the test suite) a failed
build raises, so a test of this path cannot pass by comparing a fallback with itself.
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
#include <string.h>
#ifdef __cplusplus
extern "C" {  /* a C++ compiler (g++ is all some machines have) keeps the names unmangled */
#endif

/* scale: when not NULL, each entry is first multiplied by *scale (torch's `mul_` bits), and the scaled value is
   what is counted and gathered; x is only read */
static int64_t scalar(const float *x, int64_t n, const float *scale, uint32_t lo, uint32_t hi, uint32_t *inside,
                      int64_t *above) {
    const uint32_t span = hi - lo;
    int64_t a = 0, j = 0;
    for (int64_t i = 0; i < n; i++) {
        float y = x[i];
        if (scale) y = y * *scale;
        uint32_t u;
        memcpy(&u, &y, sizeof u);
        u &= 0x7fffffffu;
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
   the store stays inside the n entries of room). Stored on every step, also with none inside: a branch on it was
   mispredicted often enough, with a few percent of the entries inside, to take more than half the loop's time. */
__attribute__((target("avx512f")))
static int64_t avx512(const float *x, int64_t n, const float *scale, uint32_t lo, uint32_t hi, uint32_t *inside,
                      int64_t *above) {
    const __m512 vscale = _mm512_set1_ps(scale ? *scale : 1.0f);
    const __m512i mask = _mm512_set1_epi32(0x7fffffff), vinf = _mm512_set1_epi32(0x7f800000),
                  vhi = _mm512_set1_epi32((int)hi), vlo = _mm512_set1_epi32((int)lo),
                  vspan = _mm512_set1_epi32((int)(hi - lo));
    int64_t a = 0, j = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (scale) v = _mm512_mul_ps(v, vscale);
        __m512i u = _mm512_and_si512(_mm512_castps_si512(v), mask);
        __mmask16 ok = _mm512_cmple_epu32_mask(u, vinf);
        __mmask16 in = _mm512_mask_cmple_epu32_mask(ok, _mm512_sub_epi32(u, vlo), vspan);
        a += __builtin_popcount((unsigned)_mm512_mask_cmpgt_epu32_mask(ok, u, vhi));
        _mm512_storeu_si512((void *)(inside + j), _mm512_maskz_compress_epi32(in, u));
        j += __builtin_popcount((unsigned)in);
    }
    int64_t tail_above = 0;
    j += scalar(x + i, n - i, scale, lo, hi, inside + j, &tail_above);
    *above = a + tail_above;
    return j;
}
#define HAVE_AVX512 1
#endif

/* ---- one block of a multi-adapter combination (ops/combine.py `_magnitude_kernel`, `_dare_kernel`,
   `_masked_kernel`): the same float32 operations in the same order as the op-by-op twin, so the same bits (built
   with -ffp-contract=off: no fused multiply-add). Entries go through in chunks: each step below is a plain loop
   over one chunk, which the compiler vectorizes. */

#define QM_CHUNK 256
#define QM_MAX_ADAPTERS 16
enum { QM_KEEP_ALL = 0, QM_MAGNITUDE = 1, QM_DARE = 2 };

/* combine.py `_mix32` in unsigned 32-bit arithmetic, whose products wrap by definition */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

/* torch.sign: +1, -1, or 0 for zeros and NaN */
static inline float sign_of(float x) { return (float)(x > 0.0f) - (float)(x < 0.0f); }

static inline __attribute__((always_inline)) void combine_body(
        int32_t k, const float *const *raws, const float *scales, int64_t n, float *out, int32_t mode,
        const float *thresholds,
        const uint8_t *take_equal, const uint32_t *keys, uint64_t keep_below, uint64_t start, float density,
        const float *weights, int32_t elect, int32_t frequency) {
    float parts[QM_MAX_ADAPTERS][QM_CHUNK], scaled[QM_CHUNK], votes[QM_CHUNK], total[QM_CHUNK], count[QM_CHUNK];
    for (int64_t s = 0; s < n; s += QM_CHUNK) {
        const int64_t m = n - s < QM_CHUNK ? n - s : QM_CHUNK;
        for (int32_t i = 0; i < k; i++) {
            const float *__restrict r = raws[i] + s;
            float *__restrict p = parts[i];
            if (scales) {  /* ΔWᵢ = scaleᵢ·(BᵢAᵢ), rounded as torch's `mul_` rounds it */
                const float c = scales[i];
                for (int64_t j = 0; j < m; j++) scaled[j] = r[j] * c;
                r = scaled;
            }
            if (mode == QM_MAGNITUDE) {  /* raw * (|raw| > t | (|raw| == t & take_equal)) */
                const float t = thresholds[i];
                const int te = take_equal[i] != 0;
                for (int64_t j = 0; j < m; j++) {
                    const float a = __builtin_fabsf(r[j]);
                    p[j] = r[j] * (float)((a > t) | ((a == t) & te));
                }
            } else if (mode == QM_DARE) {  /* raw * (keep_hash(index) < keep_below) / density */
                const uint32_t k0 = keys[2 * i], k1 = keys[2 * i + 1];
                for (int64_t j = 0; j < m; j++) {
                    const uint64_t index = start + (uint64_t)(s + j);
                    const uint32_t h = mix32(mix32((uint32_t)index ^ k0) ^ (uint32_t)(index >> 32) ^ k1);
                    p[j] = r[j] * (float)((uint64_t)h < keep_below) / density;
                }
            } else {
                for (int64_t j = 0; j < m; j++) p[j] = r[j];
            }
        }
        if (!elect) {  /* `_weighted_sum` */
            for (int64_t j = 0; j < m; j++) total[j] = parts[0][j] * weights[0];
            for (int32_t i = 1; i < k; i++)
                for (int64_t j = 0; j < m; j++) total[j] = total[j] + parts[i][j] * weights[i];
            for (int64_t j = 0; j < m; j++) out[s + j] = total[j];
            continue;
        }
        /* `_elect`: the votes from the first term on, the elected sign (a zero total elects +1), the disjoint mean */
        for (int64_t j = 0; j < m; j++) votes[j] = frequency ? sign_of(parts[0][j]) : parts[0][j];
        for (int32_t i = 1; i < k; i++)
            for (int64_t j = 0; j < m; j++) votes[j] = votes[j] + (frequency ? sign_of(parts[i][j]) : parts[i][j]);
        for (int64_t j = 0; j < m; j++) votes[j] = votes[j] >= 0.0f ? 1.0f : -1.0f;
        for (int32_t i = 0; i < k; i++) {
            const float w = weights[i];
            for (int64_t j = 0; j < m; j++) {
                const float x = parts[i][j];
                const float agrees = (float)(votes[j] > 0.0f ? x > 0.0f : x < 0.0f);
                const float term = x * w * agrees;
                total[j] = i == 0 ? term : total[j] + term;
                count[j] = i == 0 ? agrees : count[j] + agrees;
            }
        }
        for (int64_t j = 0; j < m; j++) out[s + j] = total[j] / (count[j] < 1.0f ? 1.0f : count[j]);
    }
}

#define QM_COMBINE_ARGS int32_t k, const float *const *raws, const float *scales, int64_t n, float *out, int32_t mode, \
    const float *thresholds, const uint8_t *take_equal, const uint32_t *keys, uint64_t keep_below, uint64_t start, \
    float density, const float *weights, int32_t elect, int32_t frequency
#define QM_COMBINE_PASS k, raws, scales, n, out, mode, thresholds, take_equal, keys, keep_below, start, density, \
    weights, elect, frequency

static void combine_plain(QM_COMBINE_ARGS) { combine_body(QM_COMBINE_PASS); }
#ifdef HAVE_AVX512
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
static void combine_avx512(QM_COMBINE_ARGS) { combine_body(QM_COMBINE_PASS); }
__attribute__((target("avx2")))
static void combine_avx2(QM_COMBINE_ARGS) { combine_body(QM_COMBINE_PASS); }
#endif

/* 0: done; -1: more adapters than the chunk buffers hold (the caller takes its other path) */
int32_t qmerge_combine_block(QM_COMBINE_ARGS) {
    if (k < 1 || k > QM_MAX_ADAPTERS) return -1;
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl")) {
        combine_avx512(QM_COMBINE_PASS);
        return 0;
    }
    if (__builtin_cpu_supports("avx2")) {
        combine_avx2(QM_COMBINE_PASS);
        return 0;
    }
#endif
    combine_plain(QM_COMBINE_PASS);
    return 0;
}

int32_t qmerge_combine_block_portable(QM_COMBINE_ARGS) {
    if (k < 1 || k > QM_MAX_ADAPTERS) return -1;
    combine_plain(QM_COMBINE_PASS);
    return 0;
}

int64_t qmerge_count_and_gather(const float *x, int64_t n, const float *scale, uint32_t lo, uint32_t hi,
                                uint32_t *inside, int64_t *above) {
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return avx512(x, n, scale, lo, hi, inside, above);
#endif
    return scalar(x, n, scale, lo, hi, inside, above);
}

int64_t qmerge_count_and_gather_portable(const float *x, int64_t n, const float *scale, uint32_t lo, uint32_t hi,
                                         uint32_t *inside, int64_t *above) {
    return scalar(x, n, scale, lo, hi, inside, above);
}

/* ---- ΔW = scale·(B A) formed where it is read (ops/combine.py `combine_products`): B [rows, r] and A [r, cols],
   row-major float32. Each entry in one fixed order, the same in every form below and in combine.py's
   `ordered_product` (torch): acc = b0·a0, then acc = acc + bk·ak for k = 1 … r-1, each multiply and add rounded on
   its own, then acc·scale, where bk is read as 0 + B's entry (a -0 in B counts as +0: the vector forms broadcast
   it so, and every form must give the same bits). Rows are formed QM_FORM columns at a time, the sums held in
   registers across k. */

#define QM_FORM 64

/* 16 floats as one value (GCC's vector extension): the four sums of a QM_FORM-column step stay in registers across
   k (a plain array spilled them to the stack at every step); lowered to whatever each target below has */
typedef float qm_v16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) qm_v16 qm_load(const float *p) {
    qm_v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 0 + x in every lane (GCC folds other spellings of a broadcast into a slow lane-by-lane constructor) */
static inline __attribute__((always_inline)) qm_v16 qm_splat(float x) {
    return (qm_v16){0} + x;
}

/* the last columns (fewer than QM_FORM): one entry at a time */
static inline __attribute__((always_inline)) void form_tail(const float *b, const float *A, int32_t r, int64_t cols,
                                                            float scale, int64_t j0, float *o) {
    for (int64_t j = j0; j < cols; j++) {
        float acc = (0.0f + b[0]) * A[j];
        for (int32_t k = 1; k < r; k++) acc = acc + (0.0f + b[k]) * A[(int64_t)k * cols + j];
        o[j] = acc * scale;
    }
}

static inline __attribute__((always_inline)) void form_body(const float *B, const float *A, int32_t r, int64_t cols,
                                                            float scale, int64_t row0, int64_t nrows, float *out) {
    for (int64_t i = 0; i < nrows; i++) {
        const float *b = B + (row0 + i) * r;
        float *o = out + i * cols;
        int64_t j0 = 0;
        for (; j0 + QM_FORM <= cols; j0 += QM_FORM) {
            const qm_v16 b0 = qm_splat(b[0]);
            qm_v16 s0 = b0 * qm_load(A + j0), s1 = b0 * qm_load(A + j0 + 16), s2 = b0 * qm_load(A + j0 + 32),
                   s3 = b0 * qm_load(A + j0 + 48);
            for (int32_t k = 1; k < r; k++) {
                const qm_v16 bk = qm_splat(b[k]);
                const float *a = A + (int64_t)k * cols + j0;
                s0 = s0 + bk * qm_load(a);
                s1 = s1 + bk * qm_load(a + 16);
                s2 = s2 + bk * qm_load(a + 32);
                s3 = s3 + bk * qm_load(a + 48);
            }
            const qm_v16 c = qm_splat(scale);
            s0 = s0 * c, s1 = s1 * c, s2 = s2 * c, s3 = s3 * c;
            memcpy(o + j0, &s0, sizeof s0);
            memcpy(o + j0 + 16, &s1, sizeof s1);
            memcpy(o + j0 + 32, &s2, sizeof s2);
            memcpy(o + j0 + 48, &s3, sizeof s3);
        }
        form_tail(b, A, r, cols, scale, j0, o);
    }
}

#define QM_FORM_ARGS const float *B, const float *A, int32_t r, int64_t cols, float scale, int64_t row0, \
    int64_t nrows, float *out
#define QM_FORM_PASS B, A, r, cols, scale, row0, nrows, out

static void form_plain(QM_FORM_ARGS) {  /* 16-float values lowered to SSE were 3x slower than this */
    for (int64_t i = 0; i < nrows; i++) {
        const float *b = B + (row0 + i) * r;
        float *o = out + i * cols;
        for (int64_t j = 0; j < cols; j++) o[j] = (0.0f + b[0]) * A[j];
        for (int32_t k = 1; k < r; k++) {
            const float bk = 0.0f + b[k], *a = A + (int64_t)k * cols;
            for (int64_t j = 0; j < cols; j++) o[j] = o[j] + bk * a[j];
        }
        for (int64_t j = 0; j < cols; j++) o[j] = o[j] * scale;
    }
}
#ifdef HAVE_AVX512
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
static void form_avx512(QM_FORM_ARGS) { form_body(QM_FORM_PASS); }
__attribute__((target("avx2")))
static void form_avx2(QM_FORM_ARGS) { form_body(QM_FORM_PASS); }
#endif

static void form(QM_FORM_ARGS, int32_t portable) {
#ifdef HAVE_AVX512
    if (!portable) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
                && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
            form_avx512(QM_FORM_PASS);
            return;
        }
        if (__builtin_cpu_supports("avx2")) {
            form_avx2(QM_FORM_PASS);
            return;
        }
    }
#endif
    form_plain(QM_FORM_PASS);
}

/* rows [row0, row0 + nrows) of ΔW into out */
void qmerge_form_rows(QM_FORM_ARGS, int32_t portable) { form(QM_FORM_PASS, portable); }

/* one block of the combination over rows [row0, row0 + nrows) of k adapters' ΔWᵢ (Bs[i], As[i], ranks[i],
   scales[i]; Bs[i] NULL: a zero ΔWᵢ), each formed a few rows at a time (QM_FORM_ENTRIES entries, at least a row)
   into `scratch` (qmerge_form_scratch floats), then `combine_body` on them (the flat index of a step's first entry
   is row·cols, for DARE's hash). 0: done; -1: too many adapters. */
#define QM_FORM_ENTRIES 16384
int64_t qmerge_form_scratch(int32_t k, int64_t cols) {
    const int64_t rows = cols >= QM_FORM_ENTRIES ? 1 : QM_FORM_ENTRIES / cols;
    return (int64_t)k * rows * cols;
}

int32_t qmerge_form_combine_block(int32_t k, const float *const *Bs, const float *const *As, const int32_t *ranks,
                                  const float *scales, int64_t cols, int64_t row0, int64_t nrows, float *out,
                                  int32_t mode, const float *thresholds, const uint8_t *take_equal,
                                  const uint32_t *keys, uint64_t keep_below, float density, const float *weights,
                                  int32_t elect, int32_t frequency, float *scratch, int32_t portable) {
    if (k < 1 || k > QM_MAX_ADAPTERS) return -1;
    const int64_t step = cols >= QM_FORM_ENTRIES ? 1 : QM_FORM_ENTRIES / cols;
    const float *parts[QM_MAX_ADAPTERS];
    for (int64_t row = row0; row < row0 + nrows; row += step) {
        const int64_t rows = row0 + nrows - row < step ? row0 + nrows - row : step;
        for (int32_t i = 0; i < k; i++) {
            float *p = scratch + (int64_t)i * step * cols;
            if (Bs[i]) form(Bs[i], As[i], ranks[i], cols, scales[i], row, rows, p, portable);
            else memset(p, 0, (size_t)(rows * cols) * sizeof *p);  /* an adapter that leaves this tensor: +0 */
            parts[i] = p;
        }
        float *o = out + (row - row0) * cols;
        const uint64_t start = (uint64_t)row * (uint64_t)cols;
        if (portable) {
            combine_plain(k, parts, NULL, rows * cols, o, mode, thresholds, take_equal, keys, keep_below, start,
                          density, weights, elect, frequency);
        } else {
            qmerge_combine_block(k, parts, NULL, rows * cols, o, mode, thresholds, take_equal, keys, keep_below,
                                 start, density, weights, elect, frequency);
        }
    }
    return 0;
}
#ifdef __cplusplus
}
#endif
"""


# -O3 vectorizes the combination's chunk loops; -ffp-contract=off keeps each multiply and add rounded on its own,
# as torch's op-by-op twin rounds them (a fused multiply-add would change the bits)
FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")


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


def _helper() -> ctypes.CDLL | None:
    """The loaded helper, or None; None also while `QMERGE_NO_COMPILE` is set, whenever it was set (`_library`
    keeps its first answer for the process)."""
    return None if os.environ.get("QMERGE_NO_COMPILE") else _library()


def _load() -> ctypes.CDLL | None:
    if os.environ.get("QMERGE_NO_COMPILE"):
        return None
    try:
        compiler = _compiler()
        if compiler is None:
            raise FileNotFoundError("no C compiler ($CC, cc, gcc, clang, c++, g++)")
        key = hashlib.sha256(f"{SOURCE}\0{compiler}\0{' '.join(FLAGS)}".encode()).hexdigest()[:16]
        target = default_cache_root() / "native" / f"helper-{key}.so"
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        gather = (lib.qmerge_count_and_gather, lib.qmerge_count_and_gather_portable)
        combine = (lib.qmerge_combine_block, lib.qmerge_combine_block_portable)
        formed = (lib.qmerge_form_rows, lib.qmerge_form_scratch, lib.qmerge_form_combine_block)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:  # AttributeError: a symbol missing
        why = f"{e}: {e.stderr.decode(errors='replace').strip()[:500]}" if getattr(e, "stderr", None) else str(e)
        if compile_strict():
            raise KernelCompileError(f"cannot build qmerge's C helper: {why}") from e
        log.warning("cannot build qmerge's C helper (%s); using numpy and torch (same results, slower)", why)
        return None
    for fn in gather:
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_float), ctypes.c_uint32,
                       ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
    for fn in combine:
        fn.restype = ctypes.c_int32
        fn.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64,
                       ctypes.c_uint64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    signatures = [(None, [p, p, i32, i64, f32, i64, i64, p, i32]),
                  (i64, [i32, i64]),
                  (i32, [i32, p, p, p, p, i64, i64, i64, p, i32, p, p, p, ctypes.c_uint64, f32, p, i32, i32, p, i32])]
    for fn, (restype, argtypes) in zip(formed, signatures):
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "helper.c", Path(tmp) / "helper.so"
        source.write_text(SOURCE)
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(source)], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)  # whole or not at all, whoever builds it first


def _bits(value: float) -> int:
    return int(np.float32(value).view(np.uint32))


def count_and_gather(block: np.ndarray, lo: float, hi: float, portable: bool = False, scale: float | None = None
                     ) -> tuple[int, np.ndarray] | None:
    """(how many |x| > hi, the |x| in [lo, hi] in flat order) for a float32 block and 0 <= lo <= hi (float32
    values); None where the C helper is unavailable or the block is not float32. `scale`: what is counted and
    gathered is float32(scale)·x, rounded as torch's `mul_(scale)` rounds it; the block is only read. `portable`: the
    plain C loop even where the CPU has AVX-512F (for tests: both forms must give numpy's answer)."""
    lib = _helper() if block.dtype == np.float32 else None
    if lib is None:
        return None
    block = np.ascontiguousarray(block)
    inside = np.empty(block.size, dtype=np.uint32)  # room for all; only the pages written are ever touched
    above = ctypes.c_int64()
    fn = lib.qmerge_count_and_gather_portable if portable else lib.qmerge_count_and_gather
    factor = ctypes.byref(ctypes.c_float(scale)) if scale is not None else None
    found = fn(block.ctypes.data, block.size, factor, _bits(lo), _bits(hi), inside.ctypes.data, ctypes.byref(above))
    return above.value, inside[:found].view(np.float32).copy()  # the copy lets the block-sized room go


MAX_ADAPTERS = 16  # QM_MAX_ADAPTERS
COMBINE_MODES = {"keep_all": 0, "magnitude": 1, "dare": 2}


def combine_available() -> bool:
    """Whether `combine_block` can run here (the C helper built and loaded)."""
    return _helper() is not None


def combine_block(raws: list[np.ndarray], out: np.ndarray, mode: str, weights: np.ndarray, elect: bool,
                  frequency: bool, thresholds: np.ndarray | None = None, take_equal: np.ndarray | None = None,
                  keys: np.ndarray | None = None, keep_below: int = 0, start: int = 0, density: float = 1.0,
                  scales: np.ndarray | None = None, portable: bool = False) -> None:
    """One block of ops/combine.py's combination, written into `out` (float32, contiguous, the raws' length; it may
    be one of them: each chunk is read whole before it is written). `mode`: "magnitude" (TIES' trim: `thresholds`
    float32 and `take_equal` per adapter), "dare" (drop by `keys` (uint32 [k, 2]) and `keep_below` for the flat
    indices from `start`, rescale by 1/`density`) or "keep_all"; then the election (`elect`, `frequency`) or the
    weighted sum. `scales` (float32 per adapter): raw i is the product BᵢAᵢ and ΔWᵢ = scales[i]·raw, formed in the
    loop (torch's `mul_` bits); None: the raws are the ΔWᵢ. The caller checks `combine_available()` first.
    `portable`: the plain loop (tests)."""
    lib = _helper()
    k = len(raws)
    if not 1 <= k <= MAX_ADAPTERS or any(r.dtype != np.float32 or not r.flags.c_contiguous or r.size != out.size
                                         for r in (*raws, out)):
        raise ValueError("combine_block takes 1-16 contiguous float32 blocks of one length")
    pointers = (ctypes.c_void_p * k)(*(r.ctypes.data for r in raws))
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    thresholds = np.ascontiguousarray(thresholds if thresholds is not None else np.zeros(k), dtype=np.float32)
    take_equal = np.ascontiguousarray(take_equal if take_equal is not None else np.zeros(k), dtype=np.uint8)
    keys = np.ascontiguousarray(keys if keys is not None else np.zeros((k, 2)), dtype=np.uint32)
    scales = np.ascontiguousarray(scales, dtype=np.float32) if scales is not None else None
    if scales is not None and scales.size != k:
        raise ValueError("combine_block takes one scale per block")
    fn = lib.qmerge_combine_block_portable if portable else lib.qmerge_combine_block
    status = fn(k, pointers, scales.ctypes.data if scales is not None else None, out.size, out.ctypes.data,
                COMBINE_MODES[mode], thresholds.ctypes.data, take_equal.ctypes.data, keys.ctypes.data, keep_below,
                start, density, weights.ctypes.data, int(elect), int(frequency))
    if status != 0:
        raise ValueError(f"qmerge_combine_block refused {k} adapters")


def _factors(b: np.ndarray, a: np.ndarray) -> tuple[int, int]:
    """(rank, columns) of ΔW = B A for float32 C-contiguous B [rows, r] and A [r, cols]."""
    if any(x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2 for x in (b, a)) \
            or b.shape[1] != a.shape[0] or a.shape[0] < 1:
        raise ValueError("the factors must be C-contiguous float32 B [rows, r] and A [r, cols], r >= 1")
    return a.shape[0], a.shape[1]


def form_rows(b: np.ndarray, a: np.ndarray, scale: float, row0: int, nrows: int, portable: bool = False
              ) -> np.ndarray:
    """Rows [row0, row0 + nrows) of ΔW = scale·(B A), each entry summed in rank order (acc = b₀a₀, then
    acc + bₖaₖ, each operation rounded, then ·scale: ops/combine.py `ordered_product`'s bits), as a new array
    [nrows, cols]. The caller checks `combine_available()` first. `portable`: the plain loop (tests)."""
    r, cols = _factors(b, a)
    out = np.empty((nrows, cols), dtype=np.float32)
    _helper().qmerge_form_rows(b.ctypes.data, a.ctypes.data, r, cols, scale, row0, nrows, out.ctypes.data,
                               int(portable))
    return out


def form_combine_block(factors: list[tuple[np.ndarray, np.ndarray, float] | None], out: np.ndarray, row0: int,
                       nrows: int, mode: str, weights: np.ndarray, elect: bool, frequency: bool,
                       thresholds: np.ndarray | None = None, take_equal: np.ndarray | None = None,
                       keys: np.ndarray | None = None, keep_below: int = 0, density: float = 1.0,
                       portable: bool = False) -> None:
    """`combine_block` over rows [row0, row0 + nrows) of the adapters' ΔWᵢ = scaleᵢ·(BᵢAᵢ) (`factors`: (Bᵢ, Aᵢ,
    scaleᵢ), None for a zero ΔWᵢ), each formed a few rows at a time as `form_rows` forms them, written into `out`
    (float32, contiguous, nrows·cols entries); DARE's flat indices start at row0·cols."""
    k = len(factors)
    shapes = [_factors(f[0], f[1]) if f is not None else None for f in factors]
    cols = out.size // nrows if nrows else 0
    if not 1 <= k <= MAX_ADAPTERS or any(s is not None and s[1] != cols for s in shapes) \
            or out.dtype != np.float32 or not out.flags.c_contiguous or out.size != nrows * cols:
        raise ValueError("form_combine_block takes 1-16 adapters' factors of one ΔW shape and an out of its rows")
    lib = _helper()
    bs = (ctypes.c_void_p * k)(*(f[0].ctypes.data if f is not None else None for f in factors))
    as_ = (ctypes.c_void_p * k)(*(f[1].ctypes.data if f is not None else None for f in factors))
    ranks = np.array([s[0] if s is not None else 0 for s in shapes], dtype=np.int32)
    scales = np.array([f[2] if f is not None else 1.0 for f in factors], dtype=np.float32)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    thresholds = np.ascontiguousarray(thresholds if thresholds is not None else np.zeros(k), dtype=np.float32)
    take_equal = np.ascontiguousarray(take_equal if take_equal is not None else np.zeros(k), dtype=np.uint8)
    keys = np.ascontiguousarray(keys if keys is not None else np.zeros((k, 2)), dtype=np.uint32)
    scratch = np.empty(lib.qmerge_form_scratch(k, cols), dtype=np.float32)
    status = lib.qmerge_form_combine_block(k, bs, as_, ranks.ctypes.data, scales.ctypes.data, cols, row0, nrows,
                                           out.ctypes.data, COMBINE_MODES[mode], thresholds.ctypes.data,
                                           take_equal.ctypes.data, keys.ctypes.data, keep_below, density,
                                           weights.ctypes.data, int(elect), int(frequency), scratch.ctypes.data,
                                           int(portable))
    if status != 0:
        raise ValueError(f"qmerge_form_combine_block refused {k} adapters")
