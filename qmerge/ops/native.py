"""Loops in C, for passes numpy and torch cannot fuse well on CPU:

- TIES' bracket pass over a delta's magnitudes (ops/combine.py `_count_and_gather`: how many |x| exceed the
  bracket, and the |x| inside it, in order). numpy makes it six passes over each block (abs, two comparisons, an
  `and`, a count, a boolean gather), 70-80 ms per 11008x4096 delta on two threads; the C loop reads each entry once,
  31-36 ms, and 17-19 ms in its AVX-512 form (16 entries a step, the inside ones compressed to the front of a
  register), taken where the CPU has AVX-512F; 10-12 ms reading 4 KB ahead (`read_ahead`), about a plain sum's
  time, and called once per thread over a run of blocks (per-block counts out), not once per block. Where ΔW's
  top-k threshold is found from the factors' product (ops/combine.py `scaled_threshold`), the pass scales each
  entry in a register and counts the product: ΔW itself is never written out.
- The NF4 merge of one weight (`qmerge_nf4_merge`: ops/merge_kernel.py `nf4_merge`, and the round trip alone for
  ops/nf4.py `nf4_weight`): dequantize, the trained model's casts, + ΔW, the storage cast and the retention sums in
  one read of the weight and of BA, the op-by-op twin's float32 roundings. It replaced an inductor kernel of the
  same speed whose dynamo start-up cost every merging process 4-8 s; written as one loop per step with the weight's
  and storage's kinds fixed outside it, so that the compiler vectorizes each, it takes half that time (an
  11008x4096 weight on two threads: 211-249 -> 117-133 ms).
- One block of a multi-adapter combination (`combine_block`: TIES' trim or DARE's drop and rescale, then the
  election and disjoint mean or the weighted sum), the same float32 operations in the same order as ops/combine.py's
  op-by-op twin, so the same bits, each adapter's entries first scaled by its LoRA scale where given (ΔWᵢ =
  scaleᵢ·BᵢAᵢ formed in the loop from the product, as torch's `mul_` forms it); DARE's keep hash in unsigned 32-bit
  words (inductor's loop computes it in int64 lanes, split so that no signed product overflows: DARE's extra time
  over TIES' loop). Compiled once per CPU kind (AVX-512, AVX2, plain) and chosen at run time.

Built once per machine with the C compiler (`$CC`, split as the shell would, else cc, gcc, clang, or a C++
compiler; inductor, which compiles the fused kernels, needs one too) into `<qmerge cache>/native/helper-<sha256 of
source, compiler command and version, flags and machine architecture>.so`, atomically (parallel builds of a matrix
share it; a file there that does not load is built again), and loaded with ctypes, which releases the GIL during
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
import platform
import shlex
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

/* A core streaming through memory on its own keeps too few cache lines in flight for the memory's bandwidth: the
   loops below each ask for the line QM_AHEAD floats (4 KB) ahead of what they read, once per 64-byte line. The
   bracket pass over a 45M-entry delta on two cores: 14-17 ms without, 10-12 ms with (a plain sum of it: 8-10 ms);
   TIES' combination of three such deltas (`combine_body`, each adapter's stream read ahead): 81 -> 71-72 ms. */
#define QM_AHEAD 1024
static inline void read_ahead(const float *p, const float *end) {
    if (end - p > QM_AHEAD) __builtin_prefetch(p + QM_AHEAD);
}

/* scale: when not NULL, each entry is first multiplied by *scale (torch's `mul_` bits), and the scaled value is
   what is counted and gathered; x is only read */
static int64_t scalar(const float *x, int64_t n, const float *scale, uint32_t lo, uint32_t hi, uint32_t *inside,
                      int64_t *above) {
    const uint32_t span = hi - lo;
    int64_t a = 0, j = 0;
    for (int64_t i = 0; i < n; i++) {
        if ((i & 15) == 0) read_ahead(x + i, x + n);
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
        read_ahead(x + i, x + n);
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
static int has_avx512(void) {  /* the AVX-512 subsets the vector forms below are built for */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
           && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#endif

/* the CPU kind whose loop the dispatchers below take: 2 AVX-512, 1 AVX2, 0 plain (the `_kind` entries' numbering) */
static int32_t best_kind(void) {
#ifdef HAVE_AVX512
    if (has_avx512()) return 2;
    if (__builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

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
        const float *thresholds, const uint8_t *take_equal, const uint32_t *keys, uint64_t keep_below, uint64_t start,
        float density, const float *weights, int32_t elect, int32_t frequency) {
    float parts[QM_MAX_ADAPTERS][QM_CHUNK], scaled[QM_CHUNK], votes[QM_CHUNK], total[QM_CHUNK], count[QM_CHUNK];
    for (int64_t s = 0; s < n; s += QM_CHUNK) {
        const int64_t m = n - s < QM_CHUNK ? n - s : QM_CHUNK;
        for (int32_t i = 0; i < k; i++) {
            const float *__restrict r = raws[i] + s;
            float *__restrict p = parts[i];
            for (int64_t j = 0; j < m; j += 16) read_ahead(r + j, raws[i] + n);
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
                const uint64_t first = start + (uint64_t)s;
                if (keep_below <= 0xFFFFFFFFu && (uint32_t)first <= 0xFFFFFFFFu - (uint32_t)m) {
                    /* the usual chunk: the index's high word is the same for all its entries and the hash is
                       compared with a bound below 2^32, so every lane is 32 bits wide (twice the entries a step
                       of the 64-bit lanes below); the same hash, the same mask */
                    const uint32_t low = (uint32_t)first, high = (uint32_t)(first >> 32) ^ k1;
                    const uint32_t below = (uint32_t)keep_below;
                    for (int64_t j = 0; j < m; j++) {
                        const uint32_t h = mix32(mix32((low + (uint32_t)j) ^ k0) ^ high);
                        p[j] = r[j] * (float)(h < below) / density;
                    }
                } else {
                    for (int64_t j = 0; j < m; j++) {
                        const uint64_t index = first + (uint64_t)j;
                        const uint32_t h = mix32(mix32((uint32_t)index ^ k0) ^ (uint32_t)(index >> 32) ^ k1);
                        p[j] = r[j] * (float)((uint64_t)h < keep_below) / density;
                    }
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

/* the loop built for one CPU kind (tests): 0 plain, 1 AVX2, 2 AVX-512; 0: done; -1: more adapters than the chunk
   buffers hold (the caller takes its other path); -2: this build or CPU has no such loop */
int32_t qmerge_combine_block_kind(int32_t kind, QM_COMBINE_ARGS) {
    if (k < 1 || k > QM_MAX_ADAPTERS) return -1;
    if (kind == 0) {
        combine_plain(QM_COMBINE_PASS);
        return 0;
    }
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    if (kind == 1 && __builtin_cpu_supports("avx2")) {
        combine_avx2(QM_COMBINE_PASS);
        return 0;
    }
    if (kind == 2 && has_avx512()) {
        combine_avx512(QM_COMBINE_PASS);
        return 0;
    }
#endif
    return -2;
}

/* the loop of this CPU's kind; returns as above */
int32_t qmerge_combine_block(QM_COMBINE_ARGS) { return qmerge_combine_block_kind(best_kind(), QM_COMBINE_PASS); }

static int64_t count_and_gather_one(const float *x, int64_t n, const float *scale, uint32_t lo, uint32_t hi,
                                    uint32_t *inside, int64_t *above) {
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return avx512(x, n, scale, lo, hi, inside, above);
#endif
    return scalar(x, n, scale, lo, hi, inside, above);
}

/* the pass over n entries taken as consecutive blocks of `block` (the last one shorter): lengths[b] = how many of
   block b's entries are inside, which the caller needs where only some entries equal to the threshold are kept.
   One call for a thread's whole share, instead of one per block. The entries inside still go out in flat order:
   block b's follow block b - 1's (found <= s, so each block's 16-lane stores stay inside the n entries of room). */
int64_t qmerge_count_and_gather_blocks(const float *x, int64_t n, int64_t block, const float *scale, uint32_t lo,
                                       uint32_t hi, uint32_t *inside, int64_t *above, int64_t *lengths,
                                       int32_t portable) {
    int64_t found = 0, total = 0;
    for (int64_t s = 0, b = 0; s < n; s += block, b++) {
        const int64_t m = n - s < block ? n - s : block;
        int64_t part = 0;
        const int64_t got = portable ? scalar(x + s, m, scale, lo, hi, inside + found, &part)
                                     : count_and_gather_one(x + s, m, scale, lo, hi, inside + found, &part);
        lengths[b] = got;
        found += got;
        total += part;
    }
    *above = total;
    return found;
}

/* ---- the NF4 merge (ops/merge_kernel.py `nf4_merge`, ops/nf4.py `nf4_roundtrip_fused`): per block of a weight,
   W_nf4 = casts(code[#(midpoints < w·recip)] · absmax), merged = W_nf4 + ba·scale, stored = cast(merged), and the
   retention sums in float64; the float32 operations of the op-by-op twin, each rounded on its own (no fused
   multiply-add), so the same stored bits. The count of midpoints below x is exactly bucketize(x, midpoints)
   (right=False), the op-by-op code's index; clamping x to [-1, 1] as it does cannot change the count (every
   midpoint lies inside). Casts round to nearest even as torch does (c10's BFloat16 and
   fp16_ieee_from_fp32_value); a merged value that is not finite stops the kernel (NaN bits are torch's business:
   the caller takes the op-by-op twin). */

enum { QM_F32 = 0, QM_F16 = 1, QM_BF16 = 2 };

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  /* finite or inf: round to nearest even */
    uint32_t u = f32_bits(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t f32_to_f16(float f) {  /* fp16_ieee_from_fp32_value, for finite or inf values */
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = f32_bits(f), shl1 = w + w, sign = w & 0x80000000u, bias = shl1 & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f32_bits(base);
    return (uint16_t)((sign >> 16) | (((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu)));
}

static inline float f16_to_f32(uint16_t h) {  /* fp16_ieee_to_fp32_value */
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t result = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
    return bits_f32(result);
}

#define QM_MAX_BLOCK 4096

/* the NF4 code of x = w·recip: code[#(midpoints < x)] */
static inline float nf4_level(float x, const float *code, const float *mid) {
    int32_t count = 0;
    for (int k = 0; k < 15; k++) count += x > mid[k];
    return code[count];
}

/* Each step below is its own loop over the block with the weight's and the storage's kinds fixed outside it (a
   switch inside the loop kept gcc from vectorizing the store loop at all), and the float64 sums go in steps of 8
   entries, entry j into running sum j % 8 as before: the same additions in the same order, so the same bits. */
static inline __attribute__((always_inline)) int32_t nf4_merge_body(
        const void *w, int32_t wkind, int64_t n_blocks, int64_t bs, const float *recip, const float *absmax,
        const float *code, const float *mid, const float *ba, float scale, const int32_t *chain, int32_t n_chain,
        void *out, int32_t skind, double *sums) {
    float v[QM_MAX_BLOCK], merged[QM_MAX_BLOCK], stored[QM_MAX_BLOCK];
    double dd[8] = {0}, sd[8] = {0}, bb[8] = {0};  /* eight running sums each, entry j into sum j % 8 */
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t at = b * bs;
        const float r = recip[b], am = absmax[b];
        if (wkind == QM_BF16) {
            const uint16_t *wb = (const uint16_t *)w + at;
            for (int64_t j = 0; j < bs; j++) v[j] = nf4_level(bits_f32((uint32_t)wb[j] << 16) * r, code, mid) * am;
        } else if (wkind == QM_F16) {
            const uint16_t *wb = (const uint16_t *)w + at;
            for (int64_t j = 0; j < bs; j++) v[j] = nf4_level(f16_to_f32(wb[j]) * r, code, mid) * am;
        } else {
            const float *wb = (const float *)w + at;
            for (int64_t j = 0; j < bs; j++) v[j] = nf4_level(wb[j] * r, code, mid) * am;
        }
        for (int32_t c = 0; c < n_chain; c++) {
            if (chain[c] == QM_BF16)
                for (int64_t j = 0; j < bs; j++) v[j] = bits_f32((uint32_t)f32_to_bf16(v[j]) << 16);
            else if (chain[c] == QM_F16)
                for (int64_t j = 0; j < bs; j++) v[j] = f16_to_f32(f32_to_f16(v[j]));
        }
        if (ba == NULL) {  /* the round trip alone: W_nf4 as float32 */
            memcpy((float *)out + at, v, (size_t)bs * sizeof(float));
            continue;
        }
        uint32_t bad = 0;
        for (int64_t j = 0; j < bs; j++) {
            const float d = ba[at + j] * scale;
            merged[j] = v[j] + d;
            bad |= (f32_bits(merged[j]) & 0x7F800000u) == 0x7F800000u;
        }
        if (bad) return 1;
        const float *kept = stored;  /* the stored values as float32 */
        if (skind == QM_BF16) {
            uint16_t *o = (uint16_t *)out + at;
            for (int64_t j = 0; j < bs; j++) {
                const uint16_t h = f32_to_bf16(merged[j]);
                o[j] = h;
                stored[j] = bits_f32((uint32_t)h << 16);
            }
        } else if (skind == QM_F16) {
            uint16_t *o = (uint16_t *)out + at;
            for (int64_t j = 0; j < bs; j++) {
                const uint16_t h = f32_to_f16(merged[j]);
                o[j] = h;
                stored[j] = f16_to_f32(h);
            }
        } else {
            memcpy((float *)out + at, merged, (size_t)bs * sizeof(float));
            kept = merged;
        }
        for (int64_t j0 = 0; j0 < bs; j0 += 8) {
            const int64_t m = bs - j0 < 8 ? bs - j0 : 8;
            for (int64_t l = 0; l < m; l++) {
                const int64_t j = j0 + l;
                const double delta = (double)(merged[j] - v[j]), base = (double)v[j];
                dd[l] += delta * delta;
                sd[l] += ((double)kept[j] - base) * delta;
                bb[l] += base * base;
            }
        }
    }
    if (sums != NULL) {
        double t[3] = {0, 0, 0};
        for (int l = 0; l < 8; l++) { t[0] += dd[l]; t[1] += sd[l]; t[2] += bb[l]; }
        sums[0] = t[0]; sums[1] = t[1]; sums[2] = t[2];
    }
    return 0;
}

#define QM_NF4_ARGS const void *w, int32_t wkind, int64_t n_blocks, int64_t bs, const float *recip, \
    const float *absmax, const float *code, const float *mid, const float *ba, float scale, const int32_t *chain, \
    int32_t n_chain, void *out, int32_t skind, double *sums
#define QM_NF4_PASS w, wkind, n_blocks, bs, recip, absmax, code, mid, ba, scale, chain, n_chain, out, skind, sums

static int32_t nf4_plain(QM_NF4_ARGS) { return nf4_merge_body(QM_NF4_PASS); }
#ifdef HAVE_AVX512
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
static int32_t nf4_avx512(QM_NF4_ARGS) { return nf4_merge_body(QM_NF4_PASS); }
__attribute__((target("avx2")))
static int32_t nf4_avx2(QM_NF4_ARGS) { return nf4_merge_body(QM_NF4_PASS); }
#endif

/* the loop built for one CPU kind (tests): 0 plain, 1 AVX2, 2 AVX-512; 0: done; 1: a merged value is not finite;
   -1: a block longer than QM_MAX_BLOCK (the caller takes its other path); -2: this build or CPU has no such loop */
int32_t qmerge_nf4_merge_kind(int32_t kind, QM_NF4_ARGS) {
    if (bs < 1 || bs > QM_MAX_BLOCK) return -1;
    if (kind == 0) return nf4_plain(QM_NF4_PASS);
#ifdef HAVE_AVX512
    __builtin_cpu_init();
    if (kind == 1 && __builtin_cpu_supports("avx2")) return nf4_avx2(QM_NF4_PASS);
    if (kind == 2 && has_avx512()) return nf4_avx512(QM_NF4_PASS);
#endif
    return -2;
}

/* the loop of this CPU's kind; returns as above */
int32_t qmerge_nf4_merge(QM_NF4_ARGS) { return qmerge_nf4_merge_kind(best_kind(), QM_NF4_PASS); }
#ifdef __cplusplus
}
#endif
"""


# -O3 vectorizes the combination's chunk loops; -ffp-contract=off keeps each multiply and add rounded on its own,
# as torch's op-by-op twin rounds them (a fused multiply-add would change the bits)
FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
# The plain loops are built for the architecture's baseline, not the compiler's default target (x86-64-v3 on some
# distributions): a helper built on one host of a shared cache must run on an older CPU of another. The AVX2 and
# AVX-512 loops carry their own target attributes and are chosen at run time.
BASELINE = {"x86_64": ("-march=x86-64",), "AMD64": ("-march=x86-64",)}


def _compiler() -> list[str] | None:
    """The compiler's command: `$CC` as the shell would split it (`ccache gcc`), else the first of cc, gcc, clang,
    c++, g++ on the PATH."""
    configured = shlex.split(os.environ.get("CC", ""))
    if configured:
        path = shutil.which(configured[0])
        if path:
            return [path, *configured[1:]]
        log.warning("$CC (%s) is not on the PATH; looking for cc, gcc, clang, c++ or g++", os.environ["CC"])
    for name in ("cc", "gcc", "clang", "c++", "g++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _flags() -> tuple[str, ...]:
    return (*FLAGS, *BASELINE.get(platform.machine(), ()))


def _helper_name(compiler: list[str]) -> str:
    """The build's file name: a digest of the source, the compiler's command and version, the flags and the machine
    architecture, so that hosts sharing a cache (NFS, an image built elsewhere) never load each other's builds."""
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, timeout=30).stdout.decode(
            errors="replace")
    except (OSError, subprocess.SubprocessError):
        version = ""
    what = "\0".join([SOURCE, *compiler, version, *_flags(), platform.machine()])
    return f"helper-{hashlib.sha256(what.encode()).hexdigest()[:16]}.so"


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
        target = default_cache_root() / "native" / _helper_name(compiler)
        if not target.is_file():
            _build(compiler, target)
        try:
            lib = _open(target)
        except (OSError, AttributeError):  # a damaged file under the name (a copy cut short): built again
            _build(compiler, target)
            lib = _open(target)
        gather = lib.qmerge_count_and_gather_blocks
        combine = (lib.qmerge_combine_block, lib.qmerge_combine_block_kind)
        nf4 = (lib.qmerge_nf4_merge, lib.qmerge_nf4_merge_kind)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:  # AttributeError: a symbol missing
        why = f"{e}: {e.stderr.decode(errors='replace').strip()[:500]}" if getattr(e, "stderr", None) else str(e)
        if compile_strict():
            raise KernelCompileError(f"cannot build qmerge's C helper: {why}") from e
        log.warning("cannot build qmerge's C helper (%s); using numpy and torch (same results, slower)", why)
        return None
    gather.restype = ctypes.c_int64
    gather.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float),
                       ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                       ctypes.c_void_p, ctypes.c_int32]
    combine_args = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                    ctypes.c_float, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    for fn, kind in zip(combine, ([], [ctypes.c_int32])):
        fn.restype = ctypes.c_int32
        fn.argtypes = kind + combine_args
    nf4_args = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int32,
                ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    for fn, kind in zip(nf4, ([], [ctypes.c_int32])):
        fn.restype = ctypes.c_int32
        fn.argtypes = kind + nf4_args
    return lib


def _open(target: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(target))
    for symbol in ("qmerge_count_and_gather_blocks", "qmerge_combine_block", "qmerge_nf4_merge"):
        getattr(lib, symbol)
    return lib


def _build(compiler: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "helper.c", Path(tmp) / "helper.so"
        source.write_text(SOURCE)
        subprocess.run([*compiler, *_flags(), "-o", str(built), str(source)], check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)  # whole or not at all, whoever builds it first


def _bits(value: float) -> int:
    return int(np.float32(value).view(np.uint32))


def count_and_gather(x: np.ndarray, lo: float, hi: float, portable: bool = False, scale: float | None = None,
                     block: int | None = None) -> tuple[int, np.ndarray, list[int]] | None:
    """(how many |x| > hi, the |x| in [lo, hi] in flat order, how many of those each `block` of x's entries holds)
    for float32 entries and 0 <= lo <= hi (float32 values), in one call (default `block`: all of x); None where the
    C helper is unavailable or x is not float32. `scale`: what is counted and gathered is float32(scale)·x, rounded
    as torch's `mul_(scale)` rounds it; x is only read. `portable`: the plain C loop even where the CPU has
    AVX-512F (for tests: both forms must give numpy's answer)."""
    lib = _helper() if x.dtype == np.float32 else None
    if lib is None:
        return None
    x = np.ascontiguousarray(x).reshape(-1)
    block = block or max(x.size, 1)
    inside = np.empty(x.size, dtype=np.uint32)  # room for all; only the pages written are ever touched
    lengths = np.zeros(-(-x.size // block), dtype=np.int64)
    above = ctypes.c_int64()
    factor = ctypes.byref(ctypes.c_float(scale)) if scale is not None else None
    found = lib.qmerge_count_and_gather_blocks(x.ctypes.data, x.size, block, factor, _bits(lo), _bits(hi),
                                               inside.ctypes.data, ctypes.byref(above), lengths.ctypes.data,
                                               int(portable))
    # the copy lets the room go
    return above.value, inside[:found].view(np.float32).copy(), lengths.tolist()


MAX_ADAPTERS = 16  # QM_MAX_ADAPTERS
COMBINE_MODES = {"keep_all": 0, "magnitude": 1, "dare": 2}


def combine_available() -> bool:
    """Whether `combine_block` can run here (the C helper built and loaded)."""
    return _helper() is not None


def combine_block(raws: list[np.ndarray], out: np.ndarray, mode: str, weights: np.ndarray, elect: bool,
                  frequency: bool, thresholds: np.ndarray | None = None, take_equal: np.ndarray | None = None,
                  keys: np.ndarray | None = None, keep_below: int = 0, start: int = 0, density: float = 1.0,
                  scales: np.ndarray | None = None, kind: int | None = None) -> None:
    """One block of ops/combine.py's combination, written into `out` (float32, contiguous, the raws' length; it may
    be one of them: each chunk is read whole before it is written). `mode`: "magnitude" (TIES' trim: `thresholds`
    float32 and `take_equal` per adapter), "dare" (drop by `keys` (uint32 [k, 2]) and `keep_below` for the flat
    indices from `start`, rescale by 1/`density`) or "keep_all"; then the election (`elect`, `frequency`) or the
    weighted sum. `scales` (float32 per adapter): raw i is the product BᵢAᵢ and ΔWᵢ = scales[i]·raw, formed in the
    loop (torch's `mul_` bits); None: the raws are the ΔWᵢ. The caller checks `combine_available()` first.
    `kind` (tests): the loop built for one CPU kind, 0 plain, 1 AVX2, 2 AVX-512 (LookupError where this CPU has none);
    None: the one this CPU takes."""
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
    fn = lib.qmerge_combine_block if kind is None else functools.partial(lib.qmerge_combine_block_kind, kind)
    status = fn(k, pointers, scales.ctypes.data if scales is not None else None, out.size, out.ctypes.data,
                COMBINE_MODES[mode], thresholds.ctypes.data, take_equal.ctypes.data, keys.ctypes.data, keep_below,
                start, density, weights.ctypes.data, int(elect), int(frequency))
    if status == -2:
        raise LookupError(f"this CPU has no {('plain', 'AVX2', 'AVX-512')[kind]} form of the combination loop")
    if status != 0:
        raise ValueError(f"qmerge_combine_block refused {k} adapters")
