"""A fused C kernel for DLR-Net inference on CPU: one call carries a few tokens through all the blocks of a net.

    z_0 = x;  z_{l+1} = z_l + σ(n_l(z_l)·V_lᵀ + b_l)·U_lᵀ + c_l;  out = s·(z_L − z_0)

(the gated form, ``σ(n_l(z_l)·G_lᵀ + g_l) ⊙ (n_l(z_l)·V_lᵀ + b_l)`` in place of the activation, runs the
decode kernel; its prefill keeps the eager fast path)

Decoding is bound by reading the weights once per token, and a locked MLP has the original's parameters, so
the physical limit is the original's speed. The eager fast path (:meth:`DLRNet.forward_fast`) pays three
PyTorch kernel launches per block — 72 blocks × 30 nets per token on SmolLM2 at rank 32 — which is what
made locked decoding 1.6–1.7× slower. Here one call per net runs every block in plain C: the down pass
(``h = σ(V·z)``, a dot product per rank row), the up pass (``z += U·h``, a dot product of length r per
output) and the residual update, with the weights read straight from the parameters' memory (no copy). With
more than one thread the rows of each pass are split over an OpenMP team (the same libgomp runtime as
PyTorch's), with one barrier per pass.

Inputs of at most :data:`MAX_ROWS` tokens (decoding steps) take that kernel. Longer inputs (prefill) take a
register-tiled AVX-512 kernel (fp32, no per-block norm, d % 32 == 0, r % 16 == 0; others keep the eager fast
path): every block's U — and, for r % 32 == 0, its V — is transposed once per call (16 × 16 tiles in
registers), so both products are broadcast-FMA tiles of 8 rows × 32 columns with no horizontal sums; the rows
go through all the blocks in chunks of :data:`PREFILL_CHUNK` that stay in L2 (threads take whole chunks), and
the activation is vectorized (erf after Abramowitz & Stegun 7.1.26 and a Cephes exp, within 2e-7). fp32 and bf16
inputs are supported (bf16: weights and matmul inputs in bf16, products accumulated in fp32, the residual
state kept in fp32 and the down/up results rounded to bf16 as PyTorch's bf16 matmuls do); per-block RMSNorm
only in fp32.

The C source below is compiled on first use with the system's C compiler (``cc``, or ``$CC``) into
``$WEIGHTLOCK_CACHE`` (default ``~/.cache/weightlock/kernels``), keyed by a hash of the source, the flags and
the CPU, and loaded with :mod:`ctypes`; nothing is compiled at install time. Without a compiler (or with
``WEIGHTLOCK_CPU_KERNEL=0``) :func:`available` is False, one warning says why, and the nets run the eager
fast path. Imported by name from :mod:`weightlock.dlr.modeling_weightlock_dlr`, so a release loaded without
weightlock also runs the eager path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3}
MAX_ROWS = 16  # tokens per call: above this the eager path's BLAS matmuls are as fast
PREFILL_CHUNK = 256  # rows a prefill chunk carries through all blocks (its state, 256·d·4 bytes, stays in L2)
NORM_EPS = 1e-6  # DLRBlock's nn.RMSNorm(eps=1e-6)
_CACHE = "_cpu_kernel_args"  # the instance attribute holding the pointer tables (dropped by DLRNet._apply)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float act_f(float x, int act) {
    switch (act) {
    case 0: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case 1: return x > 0.0f ? x : 0.0f;
    case 2: return x / (1.0f + expf(-x));
    default: return tanhf(x);
    }
}

static inline float bf16_to_f(uint16_t b) {
    union { uint32_t u; float f; } v; v.u = ((uint32_t)b) << 16; return v.f;
}

/* round to nearest even in bf16, kept as a float (NaN stays NaN) */
static inline float round_bf16(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    if ((v.u & 0x7f800000u) == 0x7f800000u) return f;
    v.u = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) & 0xffff0000u;
    return v.f;
}

/* The engine's residual step (weightlock.dlr.engine): z[i] += inc[i] (bf16) and out[i] = bf16(z[i]), rounded
   to nearest even as PyTorch casts: one pass where PyTorch makes three (the cast of inc, the add, the cast). */
void dlr_add_round(int64_t n, float *z, const uint16_t *inc, uint16_t *out) {
    #pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        union { uint32_t u; float f; } v;
        v.f = z[i] + bf16_to_f(inc[i]);
        z[i] = v.f;
        uint32_t u = v.u;
        uint32_t nan = (u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu);
        out[i] = nan ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

/* fp32: z (n x d, the residual state, updated in place), h (n x r scratch), zn (n x d scratch, norm only).
   V[l]: r x d, U[l]: d x r (row-major, nn.Linear weights), bV[l]: r or NULL, bU[l]: d or NULL,
   nw[l]: d (RMSNorm weight) or NULL. */
void dlr_f32(int64_t n, int64_t d, int64_t r, int64_t L, const float *const *V, const float *const *bV,
             const float *const *U, const float *const *bU, const float *const *nw, const float *const *G,
             const float *const *bG, float *z, float *h, float *zn, int act, int nthreads) {
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    for (int64_t l = 0; l < L; ++l) {
        const float *v = V[l], *u = U[l], *bv = bV[l], *bu = bU[l], *w = nw[l];
        const float *g = G ? G[l] : 0, *bg = bG ? bG[l] : 0;
        const float *src = z;
        if (w) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < n; ++i) {
                const float *zi = z + i * d;
                float ss = 0.0f;
                #pragma omp simd reduction(+:ss)
                for (int64_t k = 0; k < d; ++k) ss += zi[k] * zi[k];
                float inv = 1.0f / sqrtf(ss / (float)d + 1e-6f);
                float *o = zn + i * d;
                #pragma omp simd
                for (int64_t k = 0; k < d; ++k) o[k] = zi[k] * inv * w[k];
            }
            src = zn;
        }
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < r; ++j) {
            const float *vj = v + j * d;
            for (int64_t i = 0; i < n; ++i) {
                const float *zi = src + i * d;
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int64_t k = 0; k < d; ++k) acc += vj[k] * zi[k];
                if (bv) acc += bv[j];
                if (g) {  /* the gated form: h = act(G z + bg) * (V z + bv) */
                    const float *gj = g + j * d;
                    float ga = 0.0f;
                    #pragma omp simd reduction(+:ga)
                    for (int64_t k = 0; k < d; ++k) ga += gj[k] * zi[k];
                    if (bg) ga += bg[j];
                    h[i * r + j] = act_f(ga, act) * acc;
                } else {
                    h[i * r + j] = act_f(acc, act);
                }
            }
        }
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < d; ++k) {
            const float *uk = u + k * r;
            for (int64_t i = 0; i < n; ++i) {
                const float *hi = h + i * r;
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int64_t j = 0; j < r; ++j) acc += uk[j] * hi[j];
                float zk = z[i * d + k] + acc;
                if (bu) zk += bu[k];
                z[i * d + k] = zk;
            }
        }
    }
}

/* ---- prefill (many tokens, fp32): register-tiled AVX-512 products, branch-free vectorized activations ---- */

#ifdef __AVX512F__
#include <immintrin.h>

int dlr_has_prefill(void) { return 1; }

/* e^x: Cody-Waite reduction and Cephes' expf polynomial; |rel. error| < 2e-7 on [-87, 88] */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, f), f, f), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);  /* y * 2^n */
}

/* erf: Abramowitz & Stegun 7.1.26, |abs. error| < 1.5e-7 */
static inline __m512 erf16(__m512 x) {
    __m512 a = _mm512_abs_ps(x);
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), one));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    __m512 e = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)),
                                _mm512_set1_ps(1.0f));
    /* copy the sign of x */
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e), sign));
}

static inline __m512 act16(__m512 x, int act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    if (act == 0)
        return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                             _mm512_add_ps(one, erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)))));
    if (act == 1) return _mm512_max_ps(x, _mm512_setzero_ps());
    if (act == 2) return _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    __m512 e = exp16(_mm512_mul_ps(x, _mm512_set1_ps(-2.0f)));
    return _mm512_sub_ps(_mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)), one);
}

/* the activation over m contiguous values */
static void act_array(float *h, int64_t m, int act) {
    int64_t j = 0;
    for (; j + 16 <= m; j += 16) _mm512_storeu_ps(h + j, act16(_mm512_loadu_ps(h + j), act));
    if (j < m) {
        __mmask16 k = (__mmask16)((1u << (m - j)) - 1u);
        _mm512_mask_storeu_ps(h + j, k, act16(_mm512_maskz_loadu_ps(k, h + j), act));
    }
}

/* h[t][c0+c] = z[t] . V[c0+c] for 4 rows t and 4 outputs c (d % 16 == 0) */
static inline void down_4x4(const float *z, int64_t d, const float *v, float *h, int64_t r, int64_t c0) {
    __m512 a[4][4];
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t)
        #pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) a[t][c] = _mm512_setzero_ps();
    const float *vc = v + c0 * d;
    for (int64_t k = 0; k < d; k += 16) {
        __m512 zt[4], vv[4];
        #pragma GCC unroll 4
        for (int t = 0; t < 4; ++t) zt[t] = _mm512_loadu_ps(z + t * d + k);
        #pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) vv[c] = _mm512_loadu_ps(vc + c * d + k);
        #pragma GCC unroll 4
        for (int t = 0; t < 4; ++t)
            #pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) a[t][c] = _mm512_fmadd_ps(zt[t], vv[c], a[t][c]);
    }
    #pragma GCC unroll 4
    for (int t = 0; t < 4; ++t)
        #pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) h[t * r + c0 + c] = _mm512_reduce_add_ps(a[t][c]);
}

/* y[t][c0 .. c0+32) = (acc ? y[t][c0 ..] : 0) + sum_k x[t][k] * b[k][c0 .. c0+32) (+ bias[c0 ..]) for ROWS rows;
   x: ROWS x K, b: K x n, y: ROWS x n, all row-major. Broadcast tiles: one x value times two rows of b. */
#define TILE(ROWS)                                                                                     \
    static inline void tile_##ROWS(const float *x, int64_t K, const float *b, int64_t n, float *y,      \
                                   int64_t c0, int acc, const float *bias) {                            \
        __m512 a[ROWS][2];                                                                              \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t) {                                        \
            a[t][0] = acc ? _mm512_loadu_ps(y + t * n + c0) : _mm512_setzero_ps();                      \
            a[t][1] = acc ? _mm512_loadu_ps(y + t * n + c0 + 16) : _mm512_setzero_ps();                 \
        }                                                                                               \
        for (int64_t k = 0; k < K; ++k) {                                                               \
            __m512 b0 = _mm512_loadu_ps(b + k * n + c0), b1 = _mm512_loadu_ps(b + k * n + c0 + 16);     \
            _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t) {                                    \
                __m512 xb = _mm512_set1_ps(x[t * K + k]);                                               \
                a[t][0] = _mm512_fmadd_ps(xb, b0, a[t][0]);                                             \
                a[t][1] = _mm512_fmadd_ps(xb, b1, a[t][1]);                                             \
            }                                                                                           \
        }                                                                                               \
        if (bias) {                                                                                     \
            __m512 c0v = _mm512_loadu_ps(bias + c0), c1v = _mm512_loadu_ps(bias + c0 + 16);             \
            _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t) {                                    \
                a[t][0] = _mm512_add_ps(a[t][0], c0v);                                                  \
                a[t][1] = _mm512_add_ps(a[t][1], c1v);                                                  \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t) {                                        \
            _mm512_storeu_ps(y + t * n + c0, a[t][0]);                                                  \
            _mm512_storeu_ps(y + t * n + c0 + 16, a[t][1]);                                             \
        }                                                                                               \
    }
TILE(8)
TILE(4)
TILE(2)
TILE(1)

/* y (rows x n) (+)= x (rows x K) b (K x n) (+ bias), rows <= 8, n % 32 == 0: in 32-column tiles of 8, 4, 2, 1 rows.
   The down-projection is h = z vt (acc = 0, no bias here), the up-projection z += act(h) ut + bu. */
static inline void tiles(int64_t rows, const float *x, int64_t K, const float *b, int64_t n, float *y, int acc,
                         const float *bias) {
    for (int64_t c0 = 0; c0 < n; c0 += 32) {
        if (rows == 8) { tile_8(x, K, b, n, y, c0, acc, bias); continue; }
        int64_t t = 0;
        if (rows - t >= 4) { tile_4(x + t * K, K, b, n, y + t * n, c0, acc, bias); t += 4; }
        if (rows - t >= 2) { tile_2(x + t * K, K, b, n, y + t * n, c0, acc, bias); t += 2; }
        if (rows - t >= 1) { tile_1(x + t * K, K, b, n, y + t * n, c0, acc, bias); }
    }
}

/* dst (16 x 16, row stride ds) = the transpose of src (16 x 16, row stride ss), in registers */
static inline void transpose16(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m512 a[16], b[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + i * ss);
    for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        a[i] = _mm512_shuffle_ps(b[i], b[i + 2], 0x44);
        a[i + 1] = _mm512_shuffle_ps(b[i], b[i + 2], 0xEE);
        a[i + 2] = _mm512_shuffle_ps(b[i + 1], b[i + 3], 0x44);
        a[i + 3] = _mm512_shuffle_ps(b[i + 1], b[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        b[i] = _mm512_shuffle_f32x4(a[i], a[i + 4], 0x88);
        b[i + 4] = _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD);
        b[i + 8] = _mm512_shuffle_f32x4(a[i + 8], a[i + 12], 0x88);
        b[i + 12] = _mm512_shuffle_f32x4(a[i + 8], a[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; ++i) {
        a[i] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0x88);
        a[i + 8] = _mm512_shuffle_f32x4(b[i], b[i + 8], 0xDD);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ds, a[i]);
}

/* dst (cols x rows) = src (rows x cols)ᵀ, both row-major; rows % 16 == 0 and cols % 16 == 0 */
static void transpose(const float *src, int64_t rows, int64_t cols, float *dst) {
    for (int64_t i = 0; i < rows; i += 16)
        for (int64_t j = 0; j < cols; j += 16) transpose16(src + i * cols + j, cols, dst + j * rows + i, rows);
}

/* one chunk of rows (z, h: its rows) through every block; ut: the transposed U of every block (L x r x d) */
static void prefill_chunk(int64_t n, int64_t d, int64_t r, int64_t L, const float *const *V, const float *const *bV,
                          const float *const *bU, const float *ut_all, const float *vt_all, float *z, float *h,
                          int act) {
    for (int64_t l = 0; l < L; ++l) {
        const float *v = V[l], *bv = bV[l], *bu = bU[l], *ut = ut_all + l * r * d;
        if (vt_all) {  /* r % 32 == 0: broadcast tiles on V transposed, no horizontal sums */
            const float *vt = vt_all + l * r * d;
            for (int64_t i0 = 0; i0 < n; i0 += 8)
                tiles(n - i0 < 8 ? n - i0 : 8, z + i0 * d, d, vt, r, h + i0 * r, 0, NULL);
        } else
        for (int64_t i0 = 0; i0 < n; i0 += 4) {
            if (i0 + 4 <= n) {
                for (int64_t c0 = 0; c0 < r; c0 += 4) down_4x4(z + i0 * d, d, v, h + i0 * r, r, c0);
            } else {
                for (int64_t i = i0; i < n; ++i)
                    for (int64_t j = 0; j < r; ++j) {
                        const float *zi = z + i * d, *vj = v + j * d;
                        float acc = 0.0f;
                        #pragma omp simd reduction(+:acc)
                        for (int64_t k = 0; k < d; ++k) acc += vj[k] * zi[k];
                        h[i * r + j] = acc;
                    }
            }
        }
        if (bv)
            for (int64_t i = 0; i < n; ++i) {
                float *hi = h + i * r;
                #pragma omp simd
                for (int64_t j = 0; j < r; ++j) hi[j] += bv[j];
            }
        act_array(h, n * r, act);
        for (int64_t i0 = 0; i0 < n; i0 += 8)
            tiles(n - i0 < 8 ? n - i0 : 8, h + i0 * r, r, ut, d, z + i0 * d, 1, bu);
    }
}

/* fp32, no per-block norm; d % 32 == 0 and r % 16 == 0. h: n x r scratch; ut: 2 x L x r x d scratch (every
   block's U, and for r % 32 == 0 its V, transposed once per call, 16 x 16 tiles in registers). The rows go
   through all blocks in chunks of at most `chunk` rows, so a chunk's residual state stays in the core's L2 cache
   while the weights stream from L3; threads take whole chunks (no barrier between blocks). */
void dlr_f32_prefill(int64_t n, int64_t d, int64_t r, int64_t L, const float *const *V, const float *const *bV,
                     const float *const *U, const float *const *bU, float *z, float *h, float *ut, int act,
                     int nthreads, int64_t chunk) {
    /* every block's U (d x r) transposed into ut, and with r % 32 == 0 its V (r x d) into vt = ut + L*r*d */
    float *vt = r % 32 == 0 ? ut + L * r * d : NULL;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t l = 0; l < L; ++l) {
        transpose(U[l], d, r, ut + l * r * d);
        if (vt) transpose(V[l], r, d, vt + l * r * d);
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int64_t rows = n - c0 < chunk ? n - c0 : chunk;
        prefill_chunk(rows, d, r, L, V, bV, bU, ut, vt, z + c0 * d, h + c0 * r, act);
    }
}
#else
int dlr_has_prefill(void) { return 0; }
#endif

/* bf16 weights: z (n x d) the fp32 residual state, zl (n x d scratch) its bf16 rounding as the matmuls see it;
   h (n x r) scratch. Products accumulate in fp32; the down result, the activation and the up result are
   rounded to bf16 as PyTorch's bf16 matmuls and activation do. */
void dlr_bf16(int64_t n, int64_t d, int64_t r, int64_t L, const uint16_t *const *V, const uint16_t *const *bV,
              const uint16_t *const *U, const uint16_t *const *bU, const uint16_t *const *G,
              const uint16_t *const *bG, float *z, float *zl, float *h, int act, int nthreads) {
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    for (int64_t l = 0; l < L; ++l) {
        const uint16_t *v = V[l], *u = U[l], *bv = bV[l], *bu = bU[l];
        const uint16_t *g = G ? G[l] : 0, *bg = bG ? bG[l] : 0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n * d; ++i) zl[i] = round_bf16(z[i]);
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < r; ++j) {
            const uint16_t *vj = v + j * d;
            for (int64_t i = 0; i < n; ++i) {
                const float *zi = zl + i * d;
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int64_t k = 0; k < d; ++k) acc += bf16_to_f(vj[k]) * zi[k];
                if (bv) acc += bf16_to_f(bv[j]);
                if (g) {  /* gated: each bf16 product and the activation rounded as the eager path rounds them */
                    const uint16_t *gj = g + j * d;
                    float ga = 0.0f;
                    #pragma omp simd reduction(+:ga)
                    for (int64_t k = 0; k < d; ++k) ga += bf16_to_f(gj[k]) * zi[k];
                    if (bg) ga += bf16_to_f(bg[j]);
                    h[i * r + j] = round_bf16(round_bf16(act_f(round_bf16(ga), act)) * round_bf16(acc));
                } else {
                    h[i * r + j] = round_bf16(act_f(round_bf16(acc), act));
                }
            }
        }
        #pragma omp for schedule(static)
        for (int64_t k = 0; k < d; ++k) {
            const uint16_t *uk = u + k * r;
            for (int64_t i = 0; i < n; ++i) {
                const float *hi = h + i * r;
                float acc = 0.0f;
                #pragma omp simd reduction(+:acc)
                for (int64_t j = 0; j < r; ++j) acc += bf16_to_f(uk[j]) * hi[j];
                float zk = z[i * d + k] + round_bf16(acc);
                if (bu) zk += bf16_to_f(bu[k]);
                z[i * d + k] = zk;
            }
        }
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno"]
_STATE: dict = {}  # "lib": the loaded library, or "error": why it is unavailable


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("WEIGHTLOCK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "weightlock" / "kernels"


def library_path() -> Path:
    """Where the compiled kernel for this source, these flags and this CPU lives."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, _cpu_id(), platform.machine(), sys.platform]).encode())
    return cache_dir() / f"dlr_cpu_{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "dlr_cpu.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            raise RuntimeError(f"{cc} failed: {why}")
        os.replace(out, target)  # atomic: concurrent processes never load a half-written library


def _load() -> ctypes.CDLL:
    path = library_path()
    if not path.is_file():
        _compile(path)
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.dlr_f32.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32]
    lib.dlr_f32.restype = None
    lib.dlr_bf16.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32]
    lib.dlr_bf16.restype = None
    lib.dlr_f32_prefill.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i64]
    lib.dlr_f32_prefill.restype = None
    lib.dlr_has_prefill.restype = i32
    lib.dlr_add_round.argtypes = [i64, ptr, ptr, ptr]
    lib.dlr_add_round.restype = None
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded (compiling it on the first call). Says once why not."""
    if "lib" in _STATE:
        return True
    if "error" in _STATE:
        return False
    if os.environ.get("WEIGHTLOCK_CPU_KERNEL", "1") == "0":
        _STATE["error"] = "WEIGHTLOCK_CPU_KERNEL=0"
        return False
    try:
        _STATE["lib"] = _load()
        return True
    except Exception as e:  # no compiler, a sandbox refusing to load: the eager fast path is exact too
        _STATE["error"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"DLR-Net CPU kernel unavailable ({_STATE['error']}); using the eager fast path",
                      stacklevel=2)
        return False


def add_round(z: torch.Tensor, inc: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``z += inc`` (fp32 ``z``, bf16 ``inc``, both contiguous, one shape) and ``z`` rounded to bf16 into
    ``out`` (a new tensor when None), in one pass (the residual step of the stacked engine and of bf16 nets'
    eager path); the torch ops when the kernel is unavailable. Returns ``out``."""
    out = torch.empty(z.shape, dtype=torch.bfloat16) if out is None else out
    if not (available() and z.is_contiguous() and inc.is_contiguous() and out.is_contiguous()
            and z.dtype == torch.float32 and inc.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
            and z.shape == inc.shape == out.shape and z.device.type == "cpu"):
        z.add_(inc)
        return out.copy_(z)
    _STATE["lib"].dlr_add_round(z.numel(), z.data_ptr(), inc.data_ptr(), out.data_ptr())
    return out


def disable(reason: str) -> None:
    """Stop using the kernel in this process (tests, or a caller that wants the eager path)."""
    _STATE.pop("lib", None)
    _STATE["error"] = reason


def _prefill_ok(net, x: torch.Tensor) -> bool:
    """The register-tiled prefill kernel: AVX-512 (compiled in), fp32, no per-block norm, d % 32 == 0, r % 16 == 0."""
    s = net.spec
    return (x.dtype == torch.float32 and not s.norm and s.width % 32 == 0 and s.rank % 16 == 0
            and bool(_STATE["lib"].dlr_has_prefill()))


def supported(net, x: torch.Tensor) -> bool:
    """Whether :func:`forward` handles ``net`` on ``x``: CPU, fp32 (any options) or bf16 (no per-block norm) with
    the weights in the input's dtype, the kernel available, and either at most MAX_ROWS tokens (the decode
    kernel) or the prefill kernel's conditions (:func:`_prefill_ok`)."""
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or net.spec.activation not in ACTIVATIONS:
        return False
    gated = getattr(net.spec, "form", "plain") == "gated"
    if x.dtype == torch.bfloat16 and net.spec.norm:
        return False
    w = net.blocks[0].down.weight
    if not (w.dtype == x.dtype and w.device.type == "cpu" and available()):
        return False
    # the gated form: the decode kernel (prefill keeps the eager fast path)
    return x.numel() <= MAX_ROWS * net.spec.width or (not gated and _prefill_ok(net, x))


def _pointer_table(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[0 if t is None else t.data_ptr() for t in tensors])


def _args(net) -> tuple:
    """The per-block pointer tables of ``net``'s weights, built once (the weights must be contiguous: a
    non-contiguous one is copied, and the copy kept alive here). Rebuilt when parameters were replaced."""
    w = net._weights()  # (norm, V, b, U, c, G, g) per block; DLRNet drops it when parameters are swapped
    cached = net.__dict__.get(_CACHE)
    if cached is not None and cached[0] is w and all(t[1].data_ptr() == p for t, p in zip(w[:1], cached[2])):
        return cached[1]
    keep = []

    def c(t):
        if t is None:
            return None
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        keep.append(t)
        return t

    tables = tuple(_pointer_table([c(blk[i]) for blk in w]) for i in (1, 2, 3, 4))
    norms = _pointer_table([None if blk[0] is None else c(blk[0].weight) for blk in w])
    gates = tuple(_pointer_table([c(blk[i]) for blk in w]) if w[0][5] is not None else None for i in (5, 6))
    args = (tables, norms, gates, keep)
    net.__dict__[_CACHE] = (w, args, [w[0][1].data_ptr()])
    return args


@torch.no_grad()
def forward(net, x: torch.Tensor) -> torch.Tensor:
    """``net``'s DLR output (without the sink) for ``x`` (…, d): the same maths as the eager fast path."""
    lib = _STATE["lib"]
    s = net.spec
    shape = x.shape
    x2 = x.reshape(-1, s.width)
    n = x2.shape[0]
    (vs, bvs, us, bus), norms, (gs, bgs), _ = _args(net)
    threads = torch.get_num_threads()
    h = torch.empty(n, s.rank, dtype=torch.float32)
    if x.dtype == torch.float32 and n > MAX_ROWS:
        z = x2.contiguous().clone()
        ut = torch.empty(2, s.depth, s.rank, s.width, dtype=torch.float32)
        chunk = min(PREFILL_CHUNK, -(-n // threads))
        lib.dlr_f32_prefill(n, s.width, s.rank, s.depth, vs, bvs, us, bus, z.data_ptr(), h.data_ptr(),
                            ut.data_ptr(), ACTIVATIONS[s.activation], threads, chunk)
        out = z.sub_(x2)
    elif x.dtype == torch.float32:
        z = x2.contiguous().clone()
        zn = torch.empty_like(z) if s.norm else z
        lib.dlr_f32(n, s.width, s.rank, s.depth, vs, bvs, us, bus, norms, gs, bgs, z.data_ptr(), h.data_ptr(),
                    zn.data_ptr(), ACTIVATIONS[s.activation], threads)
        out = z.sub_(x2)
    else:
        z = x2.float()
        zl = torch.empty_like(z)
        lib.dlr_bf16(n, s.width, s.rank, s.depth, vs, bvs, us, bus, gs, bgs, z.data_ptr(), zl.data_ptr(),
                     h.data_ptr(), ACTIVATIONS[s.activation], threads)
        out = z.sub_(x2.float())
    if s.readout != 1.0:
        out.mul_(s.readout)
    return out.to(x.dtype).view(shape)
