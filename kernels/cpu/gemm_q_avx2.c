/* gemm_q_avx2.c - AVX2 + FMA kernels for quantized weights (Q8 per output channel, Q4 in
 * groups of 128: engine/backend.h): the matrix-vector / small-M kernel and the W panel
 * packer; the packed GEMM's micro-kernel is the float one (panels hold dequantized F32).
 *
 * Codes widen in registers (Q8: sign-extend, convert; Q4: mask or shift the nibbles of 8
 * bytes, subtract 8, convert). Q8's one scale per row multiplies each dot product once at
 * the end; Q4's group scales multiply the weights as they are widened. Used on AVX-512
 * CPUs too (no AVX-512 quantized kernels yet). Tails (K not a multiple of 8: Q8 only) are
 * scalar. Same contracts as the float kernels (cpu.h).
 * Activations stay F32 here; the integer kernels (x rounded to 8 bits: decode, and Q4 at
 * more rows than the matrix-vector range, so Q4 prefill packs no panels) are in
 * q_dot_avx2.c, which gemm.c calls when it has the scratch memory for the rounded x.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* Codes of one row: Q8 K bytes, Q4 K / 2 bytes. */
static inline const unsigned char *q_row(const struct cvlm_tensor *w, size_t n, int K)
{
    return (const unsigned char *)w->data +
           n * (w->dtype == CVLM_DTYPE_Q4 ? (size_t)K / 2 : (size_t)K);
}

/* Weights k .. k + 7 of a row (k a multiple of 8), unscaled. */
INLINE2 __m256 dq8(const unsigned char *row, const int dt, int k)
{
    if (dt == CVLM_DTYPE_Q8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k))));
    __m128i v = _mm_loadl_epi64((const __m128i *)(row + (k >> 5) * 16 + (k & 15)));
    if (k & 16)
        v = _mm_srli_epi16(v, 4);
    v = _mm_sub_epi8(_mm_and_si128(v, _mm_set1_epi8(15)), _mm_set1_epi8(8));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

/* Weight k of a row, unscaled. */
INLINE2 float dq1(const unsigned char *row, const int dt, int k)
{
    if (dt == CVLM_DTYPE_Q8)
        return (float)(signed char)row[k];
    unsigned char b = row[(k >> 5) * 16 + (k & 15)];
    return (float)(((k & 16) ? b >> 4 : b & 15) - 8);
}

/* The weight vector the dot products use: Q4 scaled by its group, Q8 unscaled (its row
 * scale is applied to the sums). */
INLINE2 __m256 wv8(const unsigned char *row, const float *sr, const int dt, int k)
{
    __m256 v = dq8(row, dt, k);
    return dt == CVLM_DTYPE_Q4 ? _mm256_mul_ps(v, _mm256_broadcast_ss(sr + (k >> 7))) : v;
}

INLINE2 float wv1(const unsigned char *row, const float *sr, const int dt, int k)
{
    return dt == CVLM_DTYPE_Q4 ? dq1(row, dt, k) * sr[k >> 7] : dq1(row, dt, k);
}

/* The sum's final factor: Q8's row scale, 1 for Q4. */
INLINE2 float row_scale(const float *sr, const int dt)
{
    return dt == CVLM_DTYPE_Q8 ? sr[0] : 1.0f;
}

#define QDOT_MX 6

/* y[m][n], y[m][n + 1] for m < MX (a constant 1..QDOT_MX) rows of x. */
INLINE2 void qdot2(float *y, int ldy, const float *x, int ldx, const int MX,
                   const struct cvlm_tensor *w, const int dt, size_t n, int rows, int K)
{
    const int ng = (int)cvlm_quant_groups(w);
    const size_t n1 = rows > 1 ? n + 1 : n;
    const unsigned char *r0 = q_row(w, n, K), *r1 = q_row(w, n1, K);
    const float *s0 = w->scales + n * ng, *s1 = w->scales + n1 * ng;
    __m256 acc[2][QDOT_MX];
#pragma GCC unroll 6
    for (int m = 0; m < MX; m++)
        acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w0 = wv8(r0, s0, dt, k), w1 = wv8(r1, s1, dt, k);
#pragma GCC unroll 6
        for (int m = 0; m < MX; m++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)m * ldx + k);
            acc[0][m] = _mm256_fmadd_ps(w0, xv, acc[0][m]);
            acc[1][m] = _mm256_fmadd_ps(w1, xv, acc[1][m]);
        }
    }
#pragma GCC unroll 6
    for (int m = 0; m < MX; m++) {
        const float *xr = x + (size_t)m * ldx;
        float a0 = hsum8(acc[0][m]), a1 = hsum8(acc[1][m]);
        for (int kk = k; kk < K; kk++) {
            a0 += xr[kk] * wv1(r0, s0, dt, kk);
            a1 += xr[kk] * wv1(r1, s1, dt, kk);
        }
        y[(size_t)m * ldy + n] = a0 * row_scale(s0, dt);
        if (rows > 1)
            y[(size_t)m * ldy + n + 1] = a1 * row_scale(s1, dt);
    }
}

/* One row of x: 4 W rows, 2 accumulators each (8 independent FMA chains). */
INLINE2 void qdot4_m1(float *y, const float *x, const struct cvlm_tensor *w, const int dt, size_t n,
                      int rows, int K)
{
    const int ng = (int)cvlm_quant_groups(w);
    const unsigned char *r[4];
    const float *s[4];
    __m256 acc[4][2];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        size_t ni = n + (size_t)(i < rows ? i : 0); /* missing rows repeat row n */
        r[i] = q_row(w, ni, K);
        s[i] = w->scales + ni * ng;
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            acc[i][0] = _mm256_fmadd_ps(wv8(r[i], s[i], dt, k), x0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(wv8(r[i], s[i], dt, k + 8), x1, acc[i][1]);
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 x0 = _mm256_loadu_ps(x + k);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            acc[i][0] = _mm256_fmadd_ps(wv8(r[i], s[i], dt, k), x0, acc[i][0]);
    }
    for (int i = 0; i < 4 && i < rows; i++) {
        float a = hsum8(_mm256_add_ps(acc[i][0], acc[i][1]));
        for (int kk = k; kk < K; kk++)
            a += x[kk] * wv1(r[i], s[i], dt, kk);
        y[n + i] = a * row_scale(s[i], dt);
    }
}

INLINE2 void qgemv_range(float *y, int ldy, const float *x, int ldx, const int M,
                         const struct cvlm_tensor *w, const int dt, int n0, int n1, int K)
{
    if (M == 1) {
        for (int n = n0; n < n1; n += 4)
            qdot4_m1(y, x, w, dt, (size_t)n, n1 - n, K);
        return;
    }
    for (int n = n0; n < n1; n += 2) {
        int m = 0, rows = n1 - n;
        for (; m + QDOT_MX <= M; m += QDOT_MX)
            qdot2(y + (size_t)m * ldy, ldy, x + (size_t)m * ldx, ldx, QDOT_MX, w, dt, (size_t)n,
                  rows, K);
        float *ym = y + (size_t)m * ldy;
        const float *xm = x + (size_t)m * ldx;
        switch (M - m) {
        case 0: break;
        case 1: qdot2(ym, ldy, xm, ldx, 1, w, dt, (size_t)n, rows, K); break;
        case 2: qdot2(ym, ldy, xm, ldx, 2, w, dt, (size_t)n, rows, K); break;
        case 3: qdot2(ym, ldy, xm, ldx, 3, w, dt, (size_t)n, rows, K); break;
        case 4: qdot2(ym, ldy, xm, ldx, 4, w, dt, (size_t)n, rows, K); break;
        default: qdot2(ym, ldy, xm, ldx, 5, w, dt, (size_t)n, rows, K); break;
        }
    }
}

AVX2 void cvlm_cpu_gemv_q_avx2(float *y, int ldy, const float *x, int ldx, int M,
                               const struct cvlm_tensor *w, int n0, int n1, int K)
{
    if (w->dtype == CVLM_DTYPE_Q4)
        qgemv_range(y, ldy, x, ldx, M, w, CVLM_DTYPE_Q4, n0, n1, K);
    else
        qgemv_range(y, ldy, x, ldx, M, w, CVLM_DTYPE_Q8, n0, n1, K);
}

/* ---- packing: dequantized rows, 8 x 8 in-register transposes ---------------------------- */

/* Row `row` (< N, else 0), weights k .. k + cnt - 1 (cnt <= 8, the rest 0), scaled. */
INLINE2 __m256 q_row8(const struct cvlm_tensor *w, const int dt, int row, int N, int k, int cnt,
                      int K)
{
    if (row >= N)
        return _mm256_setzero_ps();
    const int ng = (int)cvlm_quant_groups(w);
    const unsigned char *r = q_row(w, (size_t)row, K);
    const float *sr = w->scales + (size_t)row * ng;
    if (cnt == 8)
        return _mm256_mul_ps(wv8(r, sr, dt, k), _mm256_set1_ps(row_scale(sr, dt)));
    float t[8] = {0};
    for (int i = 0; i < cnt; i++)
        t[i] = wv1(r, sr, dt, k + i) * row_scale(sr, dt);
    return _mm256_loadu_ps(t);
}

INLINE2 void qpack_group8(float *bp, const struct cvlm_tensor *w, const int dt, int n0, int N,
                          int k0, int kc, int K)
{
    __m256 r[8];
    for (int kk = 0; kk < kc; kk += 8) {
        int cnt = kc - kk < 8 ? kc - kk : 8;
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            r[i] = q_row8(w, dt, n0 + i, N, k0 + kk, cnt, K);
        transpose8(r);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            if (i < cnt)
                _mm256_store_ps(bp + (size_t)(kk + i) * GEMM_NR, r[i]);
    }
}

AVX2 void cvlm_cpu_pack_b_q_avx2(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0,
                                 int kc, int K)
{
    for (int g = 0; g < GEMM_NR; g += 8) {
        if (w->dtype == CVLM_DTYPE_Q4)
            qpack_group8(bp + g, w, CVLM_DTYPE_Q4, n0 + g, N, k0, kc, K);
        else
            qpack_group8(bp + g, w, CVLM_DTYPE_Q8, n0 + g, N, k0, kc, K);
    }
}

#endif /* __x86_64__ */
