
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

/* sum_k a[k] b[k]: fp32 weights (f32) or bf16 weights widened (b16), fp32 inputs */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
    return acc;
}
static inline float dot_b16(const uint16_t *a, const float *b, int64_t n) {
    float acc = 0.0f;
    #pragma omp simd reduction(+:acc)
    for (int64_t k = 0; k < n; ++k) acc += bf16_to_f(a[k]) * b[k];
    return acc;
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
                float acc = dot_f32(vj, zi, d) + (bv ? bv[j] : 0.0f);
                if (g) {  /* the gated form: h = act(G z + bg) * (V z + bv) */
                    float ga = dot_f32(g + j * d, zi, d) + (bg ? bg[j] : 0.0f);
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
                z[i * d + k] += dot_f32(uk, h + i * r, r) + (bu ? bu[k] : 0.0f);  /* z + (U h + c) */
            }
        }
    }
}

/* ---- packed kernels (AVX-512): decode and prefill, both block forms, fp32 and bf16 ----------------------------

   The weights are packed once per net (weightlock.dlr.cpu_kernel._packed) so that both products are
   broadcast tiles with no horizontal sums: the down pass reads Wt (d x R, R = r, or 2r for the gated form:
   columns [0, r) the value rows V, [r, 2r) the gate rows G), the up pass Ut (r x d). In bf16 the reduction
   dimension is interleaved in pairs for VDPBF16PS: Wp[k/2][j] = (W[j][k], W[j][k+1]), Up[j/2][c] =
   (U[c][j], U[c][j+1]). The residual state z stays in fp32; in bf16 the products' inputs are its bf16 rounding
   zl, and every product, the activation and the gate's product are rounded to bf16 where PyTorch's bf16 ops
   round them (the eager fast path), so both paths stay within bf16 rounding of each other. */

#ifdef __AVX512F__
#include <immintrin.h>

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


/* ---- fp32 tiles: y[t][0 .. 16 NV) (+)= sum_k x[t][k] b[k][0 .. 16 NV) (+ bias), ROWS rows ---- */
#define T32(ROWS, NV)                                                                                         \
    static void t32_##ROWS##_##NV(const float *x, int64_t xs, int64_t K, const float *b, int64_t bs, float *y, \
                                  int64_t ys, int acc, const float *bias) {                                   \
        __m512 a[ROWS][NV];                                                                                   \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t)                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)                                              \
                a[t][v] = _mm512_setzero_ps();                                                                \
        for (int64_t k = 0; k < K; ++k) {                                                                     \
            __m512 bv[NV];                                                                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * bs + 16 * v); \
            _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t) {                                          \
                __m512 xb = _mm512_set1_ps(x[t * xs + k]);                                                    \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) a[t][v] = _mm512_fmadd_ps(xb, bv[v], a[t][v]); \
            }                                                                                                 \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t)                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) {                                            \
                __m512 o = a[t][v];  /* the products summed from zero, then (+ bias), then (+ y): one rounding */ \
                if (bias) o = _mm512_add_ps(o, _mm512_loadu_ps(bias + 16 * v));  /* of y per block, as      */ \
                if (acc) o = _mm512_add_ps(_mm512_loadu_ps(y + t * ys + 16 * v), o);  /* z + (U h + c) */       \
                _mm512_storeu_ps(y + t * ys + 16 * v, o);                                                     \
            }                                                                                                 \
    }
#define T32_ALL(NV) T32(1, NV) T32(2, NV) T32(3, NV) T32(4, NV) T32(5, NV) T32(6, NV)
T32_ALL(1) T32_ALL(2) T32_ALL(4) T32(7, 1) T32(8, 1) T32(7, 2) T32(8, 2)
typedef void (*t32_fn)(const float *, int64_t, int64_t, const float *, int64_t, float *, int64_t, int, const float *);
static const t32_fn T32_NV1[9] = {0, t32_1_1, t32_2_1, t32_3_1, t32_4_1, t32_5_1, t32_6_1, t32_7_1, t32_8_1};
static const t32_fn T32_NV2[9] = {0, t32_1_2, t32_2_2, t32_3_2, t32_4_2, t32_5_2, t32_6_2, t32_7_2, t32_8_2};
static const t32_fn T32_NV4[7] = {0, t32_1_4, t32_2_4, t32_3_4, t32_4_4, t32_5_4, t32_6_4};

/* The tiling of an m x ncols output: columns outer in slices of 16 nv (nv = 4, 2, 1: as wide as what is left
   allows), rows in tiles of up to 8 (6 at nv = 4: 24 accumulators); CALL runs the tile (t, rows) x (c, nv). */
#define FOR_TILES(m, ncols, CALL)                                                                            \
    for (int64_t c = 0; c < (ncols);) {                                                                      \
        int nv = (ncols) - c >= 64 ? 4 : (ncols) - c >= 32 ? 2 : 1, maxr = nv == 4 ? 6 : 8;                  \
        for (int64_t t = 0; t < (m);) {                                                                      \
            int rows = (m) - t < maxr ? (int)((m) - t) : maxr;                                               \
            CALL;                                                                                            \
            t += rows;                                                                                       \
        }                                                                                                    \
        c += 16 * nv;                                                                                        \
    }

/* y (m x ncols, stride ys) (+)= x (m x K, stride xs) b (K x ncols, stride bs) (+ bias); ncols % 16 == 0.
   Columns outer (a slice of b stays in L1 across the row tiles), rows in tiles of up to 8 (6 at 64 columns). */
static void gemm32(int64_t m, const float *x, int64_t xs, int64_t K, const float *b, int64_t bs, int64_t ncols,
                   float *y, int64_t ys, int acc, const float *bias) {
    FOR_TILES(m, ncols, (nv == 4 ? T32_NV4 : nv == 2 ? T32_NV2 : T32_NV1)[rows](
        x + t * xs, xs, K, b + c, bs, y + t * ys + c, ys, acc, bias ? bias + c : 0));
}

/* this thread's share [lo, hi) of `units` units of 16 columns */
static inline void share(int64_t units, int ti, int nt, int64_t *lo, int64_t *hi) {
    *lo = units * ti / nt * 16;
    *hi = units * (ti + 1) / nt * 16;
}

#ifdef _OPENMP
#define BARRIER(nt) if ((nt) > 1) { _Pragma("omp barrier") }
#define TEAM_ID() omp_get_thread_num()
#define TEAM_SIZE() omp_get_num_threads()
#else
#define BARRIER(nt)
#define TEAM_ID() 0
#define TEAM_SIZE() 1
#endif

/* one block on m rows (z: m x d, hd: m x R scratch), fp32; thread ti of nt (nt > 1: inside a team that shares
   the rows and splits the columns, with a barrier after each pass) */
static void step_f32(int64_t m, int64_t d, int64_t r, int gated, const float *wt, const float *bw, const float *ut,
                     const float *bu, float *z, float *hd, int act, int ti, int nt) {
    int64_t R = gated ? 2 * r : r, lo, hi;
    share(R / 16, ti, nt, &lo, &hi);
    if (hi > lo) gemm32(m, z, d, d, wt + lo, R, hi - lo, hd + lo, R, 0, bw ? bw + lo : 0);
    BARRIER(nt);
    for (int64_t t = m * ti / nt; t < m * (ti + 1) / nt; ++t) {
        float *h = hd + t * R;
        for (int64_t j = 0; j < r; j += 16) {
            __m512 v = _mm512_loadu_ps(h + j);
            _mm512_storeu_ps(h + j, gated ? _mm512_mul_ps(act16(_mm512_loadu_ps(h + r + j), act), v) : act16(v, act));
        }
    }
    BARRIER(nt);
    share(d / 16, ti, nt, &lo, &hi);
    if (hi > lo) gemm32(m, hd, R, r, ut + lo, d, hi - lo, z + lo, d, 1, bu ? bu + lo : 0);
    BARRIER(nt);
}

/* The sink's coefficient for one input row x (fp32 maths, as DLRSink does it): (a.x + a0) * sigmoid(g.(x/|x|) + g0);
   sk = [value (d), a (d), g (d), a0, g0] */
static inline float sink_coef(const float *x, int64_t d, const float *sk) {
    float ss = 0.0f, a = 0.0f, g = 0.0f;
    #pragma omp simd reduction(+:ss)
    for (int64_t k = 0; k < d; ++k) ss += x[k] * x[k];
    float nrm = sqrtf(ss);
    if (nrm < 1e-12f) nrm = 1e-12f;
    #pragma omp simd reduction(+:a, g)
    for (int64_t k = 0; k < d; ++k) { a += x[k] * sk[d + k]; g += (x[k] / nrm) * sk[2 * d + k]; }
    a += sk[3 * d];
    g += sk[3 * d + 1];
    return a * (1.0f / (1.0f + expf(-g)));
}

/* rows [t0, t1) of an fp32 chunk: z <- s * (z - x) (+ the sink) */
static void finish_f32(int64_t t0, int64_t t1, int64_t d, const float *x, float *z, float s, const float *sk) {
    for (int64_t t = t0; t < t1; ++t) {
        const float *xr = x + t * d;
        float *zr = z + t * d, c = sk ? sink_coef(xr, d, sk) : 0.0f;
        #pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
            float o = (zr[k] - xr[k]) * s;
            zr[k] = sk ? o + c * sk[k] : o;
        }
    }
}

/* fp32 nets without a per-block norm, d % 16 == 0, r % 16 == 0. Wt: L x d x R, bW: L x R or NULL, Ut: L x r x d,
   bU: L x d or NULL; x: n x d (the input), z: n x d (gets the output s * (z_L - x) (+ the sink: sk as in
   sink_coef, or NULL)), hd: scratch of chunk x R per thread (thread t's at t * chunk rows). With nthreads > 1
   the rows go in chunks of at most `chunk` (each chunk's state stays in L2 while the weights stream past),
   threads taking whole chunks; a single chunk (decoding) is shared by the team, which splits every pass's
   columns. */
void dlr_run_f32(int64_t n, int64_t d, int64_t r, int64_t L, int gated, const float *Wt, const float *bW,
                 const float *Ut, const float *bU, const float *x, float *z, float *hd, int act, int nthreads,
                 int64_t chunk, float s, const float *sk) {
    int64_t R = gated ? 2 * r : r;
    if (nthreads > 1 && n <= chunk) {
        memcpy(z, x, (size_t)(n * d) * sizeof(float));
        #pragma omp parallel num_threads(nthreads)
        {
            int ti = TEAM_ID(), nt = TEAM_SIZE();
            for (int64_t l = 0; l < L; ++l)
                step_f32(n, d, r, gated, Wt + l * d * R, bW ? bW + l * R : 0, Ut + l * r * d, bU ? bU + l * d : 0,
                         z, hd, act, ti, nt);
            finish_f32(n * ti / nt, n * (ti + 1) / nt, d, x, z, s, sk);
        }
        return;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int64_t m = n - c0 < chunk ? n - c0 : chunk;
        memcpy(z + c0 * d, x + c0 * d, (size_t)(m * d) * sizeof(float));
        for (int64_t l = 0; l < L; ++l)
            step_f32(m, d, r, gated, Wt + l * d * R, bW ? bW + l * R : 0, Ut + l * r * d, bU ? bU + l * d : 0,
                     z + c0 * d, hd + TEAM_ID() * chunk * R, act, 0, 1);
        finish_f32(0, m, d, x + c0 * d, z + c0 * d, s, sk);
    }
}

#ifdef __AVX512BF16__
int dlr_has_packed(void) { return 3; }  /* bit 0: fp32, bit 1: bf16 */

static inline __m512 bf16x16(const uint16_t *p) {  /* 16 bf16 values as floats */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 round16(__m512 x) {  /* rounded to bf16 (nearest even), kept as floats */
    __m256i b = (__m256i)_mm512_cvtneps_pbh(x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
/* The activation of 16 columns of the down pass's sums, as bf16: bf16(act(bf16(v + bv))), or in the gated form
   bf16(bf16(act(bf16(g + bg))) * bf16(v + bv)), rounded where PyTorch's bf16 ops round (the biases bv, bg or
   NULL). */
static inline __m256i act_bf16(__m512 v, __m512 g, const uint16_t *bv, const uint16_t *bg, int gated, int act) {
    if (bv) v = _mm512_add_ps(v, bf16x16(bv));
    if (!gated) return (__m256i)_mm512_cvtneps_pbh(act16(round16(v), act));
    if (bg) g = _mm512_add_ps(g, bf16x16(bg));
    return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(round16(act16(round16(g), act)), round16(v)));
}

/* the down pass's fused finish (step_bf16, one thread, when one tile holds all R = 16 NV columns of its rows):
   the tile's rows of hb (stride r) get the activation of its sums; bias: the R down biases or NULL */
typedef struct { int64_t r; const uint16_t *bias; int act, gated; } act_t;

/* The up pass's residual step for 32 columns at once, z[0..32) += bf16(U h) (+ bias), zl = bf16(z): one
   VCVTNE2PS2BF16 rounds both sums, two unpacks with zero widen them back to floats (bf16 in the high half), and
   one more packs the new z's bf16 copy. The unpacks interleave 128-bit lanes, so the packed U holds each group of
   32 columns permuted (cpu_kernel.up_permutation): sum lanes a = columns 0-3, 16-19, 4-7, 20-23 and b = 8-11,
   24-27, 12-15, 28-31 come back as 0-15 and 16-31. Bit-identical to rounding each sum with round16. */
static inline void up_epilogue2(__m512 a, __m512 b, float *z, uint16_t *zl, const uint16_t *bias) {
    __m512i p = (__m512i)_mm512_cvtne2ps_pbh(b, a), zero = _mm512_setzero_si512();
    __m512 o0 = _mm512_add_ps(_mm512_loadu_ps(z), _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, p)));
    __m512 o1 = _mm512_add_ps(_mm512_loadu_ps(z + 16), _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, p)));
    if (bias) {
        o0 = _mm512_add_ps(o0, bf16x16(bias));
        o1 = _mm512_add_ps(o1, bf16x16(bias + 16));
    }
    _mm512_storeu_ps(z, o0);
    _mm512_storeu_ps(z + 16, o1);
    _mm512_storeu_si512((void *)zl, (__m512i)_mm512_cvtne2ps_pbh(o1, o0));
}

/* ---- bf16 tiles over K2 pairs: a[t] = sum_p x[t][p] . b[p][0 .. 16 NV) (pairs of bf16, fp32 sums) ---- */
#define T16_PRODUCTS(ROWS, NV)                                                                                \
        __m512 a[ROWS][NV];                                                                                   \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t)                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) a[t][v] = _mm512_setzero_ps();               \
        for (int64_t p = 0; p < K2; ++p) {                                                                    \
            __m512i bv[NV];                                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)                                              \
                bv[v] = _mm512_loadu_si512((const void *)(b + p * bs + 16 * v));                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t) {                                          \
                __m512i xb = _mm512_set1_epi32((int)x[t * xs + p]);                                           \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)                                          \
                    a[t][v] = _mm512_dpbf16_ps(a[t][v], (__m512bh)bv[v], (__m512bh)xb);                       \
            }                                                                                                 \
        }

/* the products, then either y = a (the down pass), the activation straight into hb (fa: the down pass's fused
   finish) or the up pass's residual step z += bf16(a) (+ bias), zl = bf16(z) (U unpermuted: d % 32 != 0) */
#define T16(ROWS, NV)                                                                                         \
    static void t16_##ROWS##_##NV(const uint32_t *x, int64_t xs, int64_t K2, const uint32_t *b, int64_t bs,    \
                                  float *y, int64_t ys, uint16_t *zl, const uint16_t *bias, const act_t *fa,  \
                                  uint16_t *hb) {                                                             \
        T16_PRODUCTS(ROWS, NV)                                                                                \
        if (fa) {  /* the down pass's tile holds all its rows' columns: the activation, straight into hb */    \
            int nh = fa->gated ? NV / 2 : NV;                                                                 \
            _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t)                                            \
                _Pragma("GCC unroll 4") for (int v = 0; v < nh; ++v)                                          \
                    _mm256_storeu_si256((__m256i *)(hb + t * fa->r + 16 * v), act_bf16(                       \
                        a[t][v], a[t][fa->gated ? v + nh : v], fa->bias ? fa->bias + 16 * v : 0,                \
                        fa->bias && fa->gated ? fa->bias + 16 * (v + nh) : 0, fa->gated, fa->act));               \
            return;                                                                                           \
        }                                                                                                     \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t)                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) {                                            \
                float *yo = y + t * ys + 16 * v;                                                              \
                if (!zl) { _mm512_storeu_ps(yo, a[t][v]); continue; }                                         \
                __m512 o = _mm512_add_ps(_mm512_loadu_ps(yo), round16(a[t][v]));  /* z + bf16(U h), then */    \
                if (bias) o = _mm512_add_ps(o, bf16x16(bias + 16 * v));  /* + c: the eager bf16 path's order */ \
                _mm512_storeu_ps(yo, o);                                                                      \
                _mm256_storeu_si256((__m256i *)(zl + t * ys + 16 * v), (__m256i)_mm512_cvtneps_pbh(o));       \
            }                                                                                                 \
    }
#define T16_ALL(NV) T16(1, NV) T16(2, NV) T16(3, NV) T16(4, NV) T16(5, NV) T16(6, NV)
T16_ALL(1) T16_ALL(2) T16_ALL(4) T16(7, 1) T16(8, 1) T16(7, 2) T16(8, 2)
typedef void (*t16_fn)(const uint32_t *, int64_t, int64_t, const uint32_t *, int64_t, float *, int64_t, uint16_t *,
                       const uint16_t *, const act_t *, uint16_t *);
static const t16_fn T16_NV1[9] = {0, t16_1_1, t16_2_1, t16_3_1, t16_4_1, t16_5_1, t16_6_1, t16_7_1, t16_8_1};
static const t16_fn T16_NV2[9] = {0, t16_1_2, t16_2_2, t16_3_2, t16_4_2, t16_5_2, t16_6_2, t16_7_2, t16_8_2};
static const t16_fn T16_NV4[7] = {0, t16_1_4, t16_2_4, t16_3_4, t16_4_4, t16_5_4, t16_6_4};

/* The up pass's tiles when U is permuted in groups of 32 columns (d % 32 == 0): the products, then up_epilogue2
   on two sums at a time. A family of their own, with nothing else after the products: sharing T16's tiles (whose
   fused activation needs many registers) spilled these tiles' 24 sums to the stack, and the up pass ran ~5%
   slower per net (bf16, 256 rows, one thread; outputs bit-identical). */
#define T16P(ROWS, NV)                                                                                        \
    static void t16p_##ROWS##_##NV(const uint32_t *x, int64_t xs, int64_t K2, const uint32_t *b, int64_t bs,   \
                                   float *y, int64_t ys, uint16_t *zl, const uint16_t *bias) {                \
        T16_PRODUCTS(ROWS, NV)                                                                                \
        _Pragma("GCC unroll 8") for (int t = 0; t < ROWS; ++t)                                                \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v += 2)                                           \
                up_epilogue2(a[t][v], a[t][v + 1], y + t * ys + 16 * v, zl + t * ys + 16 * v,                \
                             bias ? bias + 16 * v : 0);                                                       \
    }
T16P(1, 2) T16P(2, 2) T16P(3, 2) T16P(4, 2) T16P(5, 2) T16P(6, 2) T16P(7, 2) T16P(8, 2)
T16P(1, 4) T16P(2, 4) T16P(3, 4) T16P(4, 4) T16P(5, 4) T16P(6, 4)
typedef void (*t16p_fn)(const uint32_t *, int64_t, int64_t, const uint32_t *, int64_t, float *, int64_t, uint16_t *,
                        const uint16_t *);
static const t16p_fn T16P_NV2[9] = {0, t16p_1_2, t16p_2_2, t16p_3_2, t16p_4_2, t16p_5_2, t16p_6_2, t16p_7_2, t16p_8_2};
static const t16p_fn T16P_NV4[7] = {0, t16p_1_4, t16p_2_4, t16p_3_4, t16p_4_4, t16p_5_4, t16p_6_4};

/* gemm32's bf16 twin: x (m x K2 pairs, stride xs pairs), b (K2 x ncols pairs, stride bs); y (stride ys) gets the
   sums, or with zl the residual step (y = z, zl its bf16 copy, same stride); paired: b's columns are permuted in
   groups of 32 for up_epilogue2 (ncols % 32 == 0, so every tile is 2 or 4 vectors wide on a group boundary) */
static void gemm16(int64_t m, const uint32_t *x, int64_t xs, int64_t K2, const uint32_t *b, int64_t bs,
                   int64_t ncols, float *y, int64_t ys, uint16_t *zl, const uint16_t *bias, int paired,
                   const act_t *fa, uint16_t *hb) {
    if (paired) {  /* ncols % 32 == 0: every tile is 2 or 4 vectors wide, on a group boundary */
        FOR_TILES(m, ncols, (nv == 4 ? T16P_NV4 : T16P_NV2)[rows](
            x + t * xs, xs, K2, b + c, bs, y + t * ys + c, ys, zl + t * ys + c, bias ? bias + c : 0));
        return;
    }
    FOR_TILES(m, ncols, (nv == 4 ? T16_NV4 : nv == 2 ? T16_NV2 : T16_NV1)[rows](
        x + t * xs, xs, K2, b + c, bs, y + t * ys + c, ys, zl ? zl + t * ys + c : 0, bias ? bias + c : 0,
        fa, fa ? hb + t * fa->r : 0));
}

/* one block on m rows, bf16 weights: z (m x d) fp32 state, zl its bf16 rounding, hd (m x R) fp32 scratch, hb
   (m x r) bf16 scratch; threads as in step_f32 */
static void step_bf16(int64_t m, int64_t d, int64_t r, int gated, const uint32_t *wp, const uint16_t *bw,
                      const uint32_t *up, const uint16_t *bu, float *z, uint16_t *zl, float *hd, uint16_t *hb,
                      int act, int ti, int nt) {
    int64_t R = gated ? 2 * r : r, lo, hi;
    share(R / 16, ti, nt, &lo, &hi);
    /* the activation is the down tiles' finish when each tile holds all R columns of its rows: one thread (the
       whole team decides alike) and R one tile wide (FOR_TILES: 16, 32 or 64 columns) */
    act_t fa = {r, bw, act, gated};
    int fused = nt == 1 && (R == 16 || R == 32 || R == 64);
    if (hi > lo)
        gemm16(m, (const uint32_t *)zl, d / 2, d / 2, wp + lo, R, hi - lo, hd + lo, R, 0, 0, 0, fused ? &fa : 0, hb);
    BARRIER(nt);
    if (!fused)
        for (int64_t t = m * ti / nt; t < m * (ti + 1) / nt; ++t) {
            const float *h = hd + t * R;
            for (int64_t j = 0; j < r; j += 16) {
                __m512 v = _mm512_loadu_ps(h + j), g = gated ? _mm512_loadu_ps(h + r + j) : v;
                _mm256_storeu_si256((__m256i *)(hb + t * r + j),
                                    act_bf16(v, g, bw ? bw + j : 0, bw && gated ? bw + r + j : 0, gated, act));
            }
        }
    BARRIER(nt);
    int64_t g = d % 32 ? 16 : 32;  /* d % 32 == 0: U's columns are permuted in groups of 32 (up_epilogue2) */
    share(d / g, ti, nt, &lo, &hi);
    lo *= g / 16, hi *= g / 16;
    if (hi > lo)
        gemm16(m, (const uint32_t *)hb, r / 2, r / 2, up + lo, d, hi - lo, z + lo, d, zl + lo, bu ? bu + lo : 0,
               g == 32, 0, 0);
    BARRIER(nt);
}

/* rows [t0, t1) of a bf16 chunk: z <- float(x), zl <- x */
static void start_bf16(int64_t t0, int64_t t1, int64_t d, const uint16_t *x, float *z, uint16_t *zl) {
    memcpy(zl + t0 * d, x + t0 * d, (size_t)((t1 - t0) * d) * sizeof(uint16_t));
    for (int64_t i = t0 * d; i < t1 * d; i += 16) _mm512_storeu_ps(z + i, bf16x16(x + i));
}

/* rows [t0, t1): out = bf16(s * (z - x)), plus the sink as the eager path adds it: bf16(out + bf16(c * value));
   xf: d floats of scratch (the row of x as floats, for the sink's fp32 maths) */
static void finish_bf16(int64_t t0, int64_t t1, int64_t d, const uint16_t *x, const float *z, uint16_t *out,
                        float s, const float *sk, float *xf) {
    __m512 sv = _mm512_set1_ps(s);
    for (int64_t t = t0; t < t1; ++t) {
        const uint16_t *xr = x + t * d;
        const float *zr = z + t * d;
        uint16_t *o = out + t * d;
        float c = 0.0f;
        if (sk) {
            for (int64_t k = 0; k < d; k += 16) _mm512_storeu_ps(xf + k, bf16x16(xr + k));
            c = sink_coef(xf, d, sk);
        }
        __m512 cv = _mm512_set1_ps(c);
        for (int64_t k = 0; k < d; k += 16) {
            __m512 v = round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(zr + k), bf16x16(xr + k)), sv));
            if (sk) v = _mm512_add_ps(v, round16(_mm512_mul_ps(cv, _mm512_loadu_ps(sk + k))));
            _mm256_storeu_si256((__m256i *)(o + k), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* bf16 nets without a per-block norm, d % 16 == 0, r % 16 == 0: Wp (L x d/2 x R pairs), bW (L x R) or NULL, Up
   (L x r/2 x d pairs), bU (L x d) or NULL; x (n x d bf16, the input), out (n x d bf16: s * (z_L - x) (+ the sink,
   sk as in sink_coef, or NULL)). Scratch for one chunk of at most `chunk` rows per thread (thread t's at t * chunk
   rows; a team decoding one chunk shares thread 0's): z (fp32 state) and zl (its bf16 rounding), chunk x d each;
   hd (chunk x R), hb (chunk x r); xf (d floats per thread). One chunk's scratch is reused for every chunk a thread
   takes, so it stays in L2. Chunks and threads as dlr_run_f32. */
void dlr_run_bf16(int64_t n, int64_t d, int64_t r, int64_t L, int gated, const uint32_t *Wp, const uint16_t *bW,
                  const uint32_t *Up, const uint16_t *bU, const uint16_t *x, uint16_t *out, float *z, uint16_t *zl,
                  float *hd, uint16_t *hb, int act, int nthreads, int64_t chunk, float s, const float *sk,
                  float *xf) {
    int64_t R = gated ? 2 * r : r, wsz = d / 2 * R, usz = r / 2 * d;
    if (nthreads > 1 && n <= chunk) {
        #pragma omp parallel num_threads(nthreads)
        {
            int ti = TEAM_ID(), nt = TEAM_SIZE();
            start_bf16(n * ti / nt, n * (ti + 1) / nt, d, x, z, zl);
            BARRIER(nt);
            for (int64_t l = 0; l < L; ++l)
                step_bf16(n, d, r, gated, Wp + l * wsz, bW ? bW + l * R : 0, Up + l * usz, bU ? bU + l * d : 0, z, zl,
                          hd, hb, act, ti, nt);
            finish_bf16(n * ti / nt, n * (ti + 1) / nt, d, x, z, out, s, sk, xf + ti * d);
        }
        return;
    }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int64_t m = n - c0 < chunk ? n - c0 : chunk, ti = TEAM_ID();
        float *zc = z + ti * chunk * d, *hdc = hd + ti * chunk * R;
        uint16_t *zlc = zl + ti * chunk * d, *hbc = hb + ti * chunk * r;
        start_bf16(0, m, d, x + c0 * d, zc, zlc);
        for (int64_t l = 0; l < L; ++l)
            step_bf16(m, d, r, gated, Wp + l * wsz, bW ? bW + l * R : 0, Up + l * usz, bU ? bU + l * d : 0,
                      zc, zlc, hdc, hbc, act, 0, 1);
        finish_bf16(0, m, d, x + c0 * d, zc, out + c0 * d, s, sk, xf + ti * d);
    }
}
#else
int dlr_has_packed(void) { return 1; }
#endif
#else
int dlr_has_packed(void) { return 0; }
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
                float acc = dot_b16(vj, zi, d) + (bv ? bf16_to_f(bv[j]) : 0.0f);
                if (g) {  /* gated: each bf16 product and the activation rounded as the eager path rounds them */
                    float ga = dot_b16(g + j * d, zi, d) + (bg ? bf16_to_f(bg[j]) : 0.0f);
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
                float zk = z[i * d + k] + round_bf16(dot_b16(uk, h + i * r, r));  /* the eager bf16 order */
                z[i * d + k] = bu ? zk + bf16_to_f(bu[k]) : zk;
            }
        }
    }
}
