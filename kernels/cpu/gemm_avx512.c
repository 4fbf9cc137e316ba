/* gemm_avx512.c - AVX-512 GEMM kernels: the widening matrix-vector kernel (decode), the
 * W panel packer and the 12 x 32 register-blocked micro-kernel (prefill, ViT).
 *
 * Every function here carries __attribute__((target)) and is only reached when the
 * backend detected AVX-512 F/BW/VL/DQ (see cpu.h); the rest of the library stays baseline.
 * Widening: BF16 -> F32 is a 16-bit shift into the high half; F16 -> F32 uses F16C
 * (vcvtph2ps). Accumulation is F32 with FMA.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define INLINE512 \
    static inline \
        __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))

/* 16 consecutive elements of a weight at element index i, widened; `m` masks a tail
 * (masked-off lanes read nothing and are 0). `dt` is a compile-time constant at every
 * call site, so the switch folds away. */
INLINE512 __m512 ld16(const void *base, int dt, size_t i, __mmask16 m)
{
    if (dt == CVLM_DTYPE_F32)
        return _mm512_maskz_loadu_ps(m, (const float *)base + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
    if (dt == CVLM_DTYPE_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INLINE512 __m512 ld16_full(const void *base, int dt, size_t i)
{
    if (dt == CVLM_DTYPE_F32)
        return _mm512_loadu_ps((const float *)base + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    if (dt == CVLM_DTYPE_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* ---- matrix-vector: R = 4 W rows per pass, M (1..4) x rows ------------------------------ */

INLINE512 void gemv4(float *y, int ldy, const float *x, int ldx, const int M, const void *w,
                     const int dt, size_t n, int K)
{
    __m512 acc[4][GEMV_MMAX];
    const size_t K_ = (size_t)K;
    for (int r = 0; r < 4; r++)
        for (int m = 0; m < M; m++)
            acc[r][m] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 w0 = ld16_full(w, dt, n * K_ + k), w1 = ld16_full(w, dt, (n + 1) * K_ + k);
        __m512 w2 = ld16_full(w, dt, (n + 2) * K_ + k), w3 = ld16_full(w, dt, (n + 3) * K_ + k);
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)m * ldx + k);
            acc[0][m] = _mm512_fmadd_ps(w0, xv, acc[0][m]);
            acc[1][m] = _mm512_fmadd_ps(w1, xv, acc[1][m]);
            acc[2][m] = _mm512_fmadd_ps(w2, xv, acc[2][m]);
            acc[3][m] = _mm512_fmadd_ps(w3, xv, acc[3][m]);
        }
    }
    if (k < K) {
        __mmask16 t = (__mmask16)((1u << (K - k)) - 1);
        __m512 w0 = ld16(w, dt, n * K_ + k, t), w1 = ld16(w, dt, (n + 1) * K_ + k, t);
        __m512 w2 = ld16(w, dt, (n + 2) * K_ + k, t), w3 = ld16(w, dt, (n + 3) * K_ + k, t);
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_maskz_loadu_ps(t, x + (size_t)m * ldx + k);
            acc[0][m] = _mm512_fmadd_ps(w0, xv, acc[0][m]);
            acc[1][m] = _mm512_fmadd_ps(w1, xv, acc[1][m]);
            acc[2][m] = _mm512_fmadd_ps(w2, xv, acc[2][m]);
            acc[3][m] = _mm512_fmadd_ps(w3, xv, acc[3][m]);
        }
    }
    for (int m = 0; m < M; m++)
        _mm_storeu_ps(y + (size_t)m * ldy + n, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
}

/* One W row (the < 4 leftover rows of a range). */
INLINE512 void gemv1(float *y, int ldy, const float *x, int ldx, int M, const void *w, const int dt,
                     size_t n, int K)
{
    for (int m = 0; m < M; m++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        const float *xr = x + (size_t)m * ldx;
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            a0 = _mm512_fmadd_ps(ld16_full(w, dt, n * K + k), _mm512_loadu_ps(xr + k), a0);
            a1 =
                _mm512_fmadd_ps(ld16_full(w, dt, n * K + k + 16), _mm512_loadu_ps(xr + k + 16), a1);
        }
        for (; k < K; k += 16) {
            __mmask16 t = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
            a0 = _mm512_fmadd_ps(ld16(w, dt, n * K + k, t), _mm512_maskz_loadu_ps(t, xr + k), a0);
        }
        y[(size_t)m * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
}

INLINE512 void gemv_range(float *y, int ldy, const float *x, int ldx, const int M, const void *w,
                          const int dt, int n0, int n1, int K)
{
    int n = n0;
    for (; n + 4 <= n1; n += 4)
        gemv4(y, ldy, x, ldx, M, w, dt, (size_t)n, K);
    for (; n < n1; n++)
        gemv1(y, ldy, x, ldx, M, w, dt, (size_t)n, K);
}

AVX512 void cvlm_cpu_gemv_avx512(float *y, int ldy, const float *x, int ldx, int M,
                                 const struct cvlm_tensor *w, int n0, int n1, int K)
{
    CVLM_CPU_GEMV_DISPATCH(gemv_range);
}

/* ---- packing W: 16 x 16 in-register transposes (transpose16, simd.h) -------------------- */

INLINE512 void pack_group(float *bp, const void *w, const int dt, int n0, int N, int k0, int kc,
                          int K)
{
    __m512 r[16];
    const size_t es = dt == CVLM_DTYPE_F32 ? 4 : 2;
    for (int kk = 0; kk < kc; kk += 16) {
        int cnt = kc - kk < 16 ? kc - kk : 16;
        __mmask16 t = (__mmask16)((1u << cnt) - 1);
        /* the rows of the next panel: scattered short row segments defeat the hardware
         * prefetcher, and this W block comes from DRAM exactly once */
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++)
            _mm_prefetch((const char *)w + ((size_t)(n0 + GEMM_NR + i) * K + k0 + kk) * es,
                         _MM_HINT_T0);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            size_t at = (size_t)(n0 + i) * K + k0 + kk;
            r[i] = n0 + i >= N ? _mm512_setzero_ps()
                   : cnt == 16 ? ld16_full(w, dt, at) /* masked loads cost more */
                               : ld16(w, dt, at, t);
        }
        transpose16(r);
        /* unrolled with a test per row, so r[] stays in registers */
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++)
            if (i < cnt)
                _mm512_store_ps(bp + (size_t)(kk + i) * GEMM_NR, r[i]);
    }
}

AVX512 void cvlm_cpu_pack_b_avx512(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0,
                                   int kc, int K)
{
    for (int g = 0; g < GEMM_NR; g += 16) {
        if (w->dtype == CVLM_DTYPE_BF16)
            pack_group(bp + g, w->data, CVLM_DTYPE_BF16, n0 + g, N, k0, kc, K);
        else if (w->dtype == CVLM_DTYPE_F16)
            pack_group(bp + g, w->data, CVLM_DTYPE_F16, n0 + g, N, k0, kc, K);
        else
            pack_group(bp + g, w->data, CVLM_DTYPE_F32, n0 + g, N, k0, kc, K);
    }
}

/* ---- the 12 x 32 micro-kernel ----------------------------------------------------------- */

AVX512 void cvlm_cpu_tile_avx512(const float *ap, const float *bp, int kc, float *c, int ldc,
                                 int mr, int nr, int acc)
{
    __m512 t[GEMM_MR][2];
#pragma GCC unroll 12
    for (int i = 0; i < GEMM_MR; i++)
        t[i][0] = t[i][1] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_load_ps(bp + (size_t)k * GEMM_NR);
        __m512 b1 = _mm512_load_ps(bp + (size_t)k * GEMM_NR + 16);
        const float *a = ap + (size_t)k * GEMM_MR;
#pragma GCC unroll 12
        for (int i = 0; i < GEMM_MR; i++) {
            __m512 av = _mm512_set1_ps(a[i]);
            t[i][0] = _mm512_fmadd_ps(av, b0, t[i][0]);
            t[i][1] = _mm512_fmadd_ps(av, b1, t[i][1]);
        }
    }
    __mmask16 m0 = nr >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nr) - 1);
    __mmask16 m1 = nr >= 32  ? (__mmask16)0xffff
                   : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1)
                             : (__mmask16)0;
#pragma GCC unroll 12
    for (int i = 0; i < GEMM_MR; i++) {
        if (i >= mr)
            break;
        float *ci = c + (size_t)i * ldc;
        __m512 v0 = t[i][0], v1 = t[i][1];
        if (acc) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ci));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, ci + 16));
        }
        _mm512_mask_storeu_ps(ci, m0, v0);
        _mm512_mask_storeu_ps(ci + 16, m1, v1);
    }
}

/* ---- BF16 weights with vdpbf16ps (AVX512_BF16) ------------------------------------------ */

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
#define INLINEBF16                \
    static inline __attribute__(( \
        always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

BF16 void cvlm_cpu_split_bf16_avx512(uint16_t *xs, const float *x, int ldx, int M, int K)
{
    const int Kp = GEMV_KPAD(K);
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * ldx;
        uint16_t *hi = xs + (size_t)m * 2 * Kp, *lo = hi + Kp;
        for (int k = 0; k < Kp; k += 16) {
            __mmask16 t = K - k >= 16 ? (__mmask16)0xffff
                          : K > k     ? (__mmask16)((1u << (K - k)) - 1)
                                      : (__mmask16)0;
            __m512 v = _mm512_maskz_loadu_ps(t, xr + k);
            __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
            __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
            _mm256_storeu_si256((__m256i *)(hi + k), h);
            _mm256_storeu_si256((__m256i *)(lo + k), l);
        }
    }
}

/* acc[i][m] += W rows i (32 weights at r[i] + k, masked by t) . (hi + lo)[m] at k */
#define BF16_STEP(LOAD)                                                               \
    do {                                                                              \
        __m512bh wv[4];                                                               \
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) wv[i] = (__m512bh)(LOAD); \
        for (int m = 0; m < M; m++) {                                                 \
            const uint16_t *xm = xs + (size_t)m * 2 * Kp + k;                         \
            __m512bh xh = (__m512bh)_mm512_loadu_si512(xm);                           \
            __m512bh xl = (__m512bh)_mm512_loadu_si512(xm + Kp);                      \
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[i][m] =           \
                _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[i][m], wv[i], xh), wv[i], xl);  \
        }                                                                             \
    } while (0)

/* 4 W rows x M (1..4) x rows: y[m][n + r] = sum_k W[n + r][k] * (hi[m][k] + lo[m][k]) */
INLINEBF16 void gemv4_bf16(float *y, int ldy, const uint16_t *xs, const int M, const uint16_t *w,
                           size_t n, int K, int rows)
{
    const int Kp = GEMV_KPAD(K);
    const uint16_t *r[4];
    __m512 acc[4][GEMV_MMAX];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        r[i] = w + (n + (size_t)(i < rows ? i : 0)) * K; /* missing rows repeat row 0 */
        for (int m = 0; m < M; m++)
            acc[i][m] = _mm512_setzero_ps();
    }
    int k = 0;
    for (; k + 32 <= K; k += 32) /* plain loads: masked ones cost more on some cores */
        BF16_STEP(_mm512_loadu_si512(r[i] + k));
    if (k < K) {
        __mmask32 t = (__mmask32)((1u << (K - k)) - 1);
        BF16_STEP(_mm512_maskz_loadu_epi16(t, r[i] + k));
    }
    for (int m = 0; m < M; m++) {
        float out[4];
        _mm_storeu_ps(out, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
        for (int i = 0; i < rows && i < 4; i++)
            y[(size_t)m * ldy + n + i] = out[i];
    }
}

BF16 void cvlm_cpu_gemv_bf16x2_avx512(float *y, int ldy, const uint16_t *xs, int M,
                                      const struct cvlm_tensor *w, int n0, int n1, int K)
{
    const uint16_t *wd = w->data;
    for (int n = n0; n < n1; n += 4) {
        int rows = n1 - n;
        switch (M) {
        case 1: gemv4_bf16(y, ldy, xs, 1, wd, (size_t)n, K, rows); break;
        case 2: gemv4_bf16(y, ldy, xs, 2, wd, (size_t)n, K, rows); break;
        case 3: gemv4_bf16(y, ldy, xs, 3, wd, (size_t)n, K, rows); break;
        default: gemv4_bf16(y, ldy, xs, 4, wd, (size_t)n, K, rows); break;
        }
    }
}

#endif /* __x86_64__ */
