/* gemm_avx2.c - AVX2 + FMA + F16C GEMM kernels (for x86-64 CPUs without AVX-512): the
 * widening matrix-vector kernel, the W panel packer and the micro-kernel, which runs a
 * GEMM_MR x GEMM_NR tile as four 6 x 16 sub-tiles (16 ymm registers).
 *
 * Same contracts as the scalar kernels in gemm.c; reached only when the backend detected
 * AVX2, FMA and F16C.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))

INLINE2 __m256 ld8(const void *base, const int dt, size_t i)
{
    if (dt == CVLM_DTYPE_F32)
        return _mm256_loadu_ps((const float *)base + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (dt == CVLM_DTYPE_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Scalar widening of one element (tails). */
INLINE2 float ld1(const void *base, const int dt, size_t i)
{
    if (dt == CVLM_DTYPE_F32)
        return ((const float *)base)[i];
    uint16_t h = ((const uint16_t *)base)[i];
    return dt == CVLM_DTYPE_F16 ? cvlm_f16_to_f32(h) : cvlm_bf16_to_f32(h);
}

/* ---- matrix-vector and small-M: W rows streamed once, widened in registers --------------- */

#define DOT_MX 6 /* rows of x per register block: 2 x 6 accumulators + 2 weights + 1 x */
#ifndef DOT_M1_ROWS
#define DOT_M1_ROWS 8 /* W rows per pass for one row of x */
#endif

/* y[m][n], y[m][n + 1] for m < MX (a compile-time constant 1..DOT_MX) rows of x. */
INLINE2 void dot2(float *y, int ldy, const float *x, int ldx, const int MX, const void *w,
                  const int dt, size_t n, int rows, int K)
{
    __m256 acc[2][DOT_MX];
    const size_t K_ = (size_t)K, r1 = rows > 1 ? n + 1 : n;
#pragma GCC unroll 6
    for (int m = 0; m < MX; m++)
        acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w0 = ld8(w, dt, n * K_ + k), w1 = ld8(w, dt, r1 * K_ + k);
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
        float s0 = hsum8(acc[0][m]), s1 = hsum8(acc[1][m]);
        for (int kk = k; kk < K; kk++) {
            s0 += xr[kk] * ld1(w, dt, n * K_ + kk);
            s1 += xr[kk] * ld1(w, dt, r1 * K_ + kk);
        }
        y[(size_t)m * ldy + n] = s0;
        if (rows > 1)
            y[(size_t)m * ldy + n + 1] = s1;
    }
}

/* One row of x (decode): R W rows (a constant, 4 or 8) x 16 / R * 2 accumulators: 8 or 16
 * independent FMA chains (the loop is bound by the weight stream, not by FMA latency) and
 * R concurrent row streams per thread for the prefetchers; y[n .. n + rows). */
INLINE2 void dotR_m1(float *y, const float *x, const void *w, const int dt, size_t n, int rows,
                     int K, const int R)
{
    __m256 acc[8];
    size_t r[8];
    const size_t K_ = (size_t)K;
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
        r[i] = (n + (size_t)(i < rows ? i : 0)) * K_; /* missing rows repeat row n */
        acc[i] = _mm256_setzero_ps();
    }
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 x0 = _mm256_loadu_ps(x + k);
#pragma GCC unroll 8
        for (int i = 0; i < R; i++)
            acc[i] = _mm256_fmadd_ps(ld8(w, dt, r[i] + k), x0, acc[i]);
    }
    for (int i = 0; i < R && i < rows; i++) {
        float s = hsum8(acc[i]);
        for (int kk = k; kk < K; kk++)
            s += x[kk] * ld1(w, dt, r[i] + kk);
        y[n + i] = s;
    }
}

/* Every pair of W rows in [n0, n1) against all M rows of x, DOT_MX at a time: the pair is
 * read from memory once and from L1 for the other row blocks, so M rows cost one pass over
 * W (the packed GEMM would first write W transposed into panels, a pass per GEMM_KC). */
INLINE2 void gemv_range(float *y, int ldy, const float *x, int ldx, const int M, const void *w,
                        const int dt, int n0, int n1, int K)
{
    if (M == 1) {
        for (int n = n0; n < n1; n += DOT_M1_ROWS)
            dotR_m1(y, x, w, dt, (size_t)n, n1 - n, K, DOT_M1_ROWS);
        return;
    }
    for (int n = n0; n < n1; n += 2) {
        int m = 0, rows = n1 - n;
        for (; m + DOT_MX <= M; m += DOT_MX)
            dot2(y + (size_t)m * ldy, ldy, x + (size_t)m * ldx, ldx, DOT_MX, w, dt, (size_t)n, rows,
                 K);
        float *ym = y + (size_t)m * ldy;
        const float *xm = x + (size_t)m * ldx;
        switch (M - m) {
        case 0: break;
        case 1: dot2(ym, ldy, xm, ldx, 1, w, dt, (size_t)n, rows, K); break;
        case 2: dot2(ym, ldy, xm, ldx, 2, w, dt, (size_t)n, rows, K); break;
        case 3: dot2(ym, ldy, xm, ldx, 3, w, dt, (size_t)n, rows, K); break;
        case 4: dot2(ym, ldy, xm, ldx, 4, w, dt, (size_t)n, rows, K); break;
        default: dot2(ym, ldy, xm, ldx, 5, w, dt, (size_t)n, rows, K); break;
        }
    }
}

/* Any M (the driver gives up to CVLM_CPU_AVX2_GEMV_MAX_M rows at once). */
AVX2 void cvlm_cpu_gemv_avx2(float *y, int ldy, const float *x, int ldx, int M,
                             const struct cvlm_tensor *w, int n0, int n1, int K)
{
    if (w->dtype == CVLM_DTYPE_BF16)
        gemv_range(y, ldy, x, ldx, M, w->data, CVLM_DTYPE_BF16, n0, n1, K);
    else if (w->dtype == CVLM_DTYPE_F16)
        gemv_range(y, ldy, x, ldx, M, w->data, CVLM_DTYPE_F16, n0, n1, K);
    else
        gemv_range(y, ldy, x, ldx, M, w->data, CVLM_DTYPE_F32, n0, n1, K);
}

/* ---- packing W: 8 x 8 in-register transposes (transpose8, simd.h) ------------------------ */

/* 8 elements of W row `row` from column k (cnt <= 8 valid, the rest 0); rows >= N are 0. */
INLINE2 __m256 ld_row8(const void *w, const int dt, int row, int N, size_t at, int cnt)
{
    if (row >= N)
        return _mm256_setzero_ps();
    if (cnt == 8)
        return ld8(w, dt, at);
    float t[8] = {0};
    for (int i = 0; i < cnt; i++)
        t[i] = ld1(w, dt, at + (size_t)i);
    return _mm256_loadu_ps(t);
}

/* Panel columns [g, g + 8) of Bp: rows n0 + g .. n0 + g + 7 of W, k0 .. k0 + kc. */
INLINE2 void pack_group8(float *bp, const void *w, const int dt, int n0, int N, int k0, int kc,
                         int K)
{
    const size_t es = dt == CVLM_DTYPE_F32 ? 4 : 2;
    __m256 r[8];
    for (int kk = 0; kk < kc; kk += 8) {
        int cnt = kc - kk < 8 ? kc - kk : 8;
        /* the next panel's rows: scattered short segments defeat the hardware prefetcher */
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            _mm_prefetch((const char *)w + ((size_t)(n0 + GEMM_NR + i) * K + k0 + kk) * es,
                         _MM_HINT_T0);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            r[i] = ld_row8(w, dt, n0 + i, N, (size_t)(n0 + i) * K + k0 + kk, cnt);
        transpose8(r);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            if (i < cnt)
                _mm256_store_ps(bp + (size_t)(kk + i) * GEMM_NR, r[i]);
    }
}

AVX2 void cvlm_cpu_pack_b_avx2(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0,
                               int kc, int K)
{
    for (int g = 0; g < GEMM_NR; g += 8) {
        if (w->dtype == CVLM_DTYPE_BF16)
            pack_group8(bp + g, w->data, CVLM_DTYPE_BF16, n0 + g, N, k0, kc, K);
        else if (w->dtype == CVLM_DTYPE_F16)
            pack_group8(bp + g, w->data, CVLM_DTYPE_F16, n0 + g, N, k0, kc, K);
        else
            pack_group8(bp + g, w->data, CVLM_DTYPE_F32, n0 + g, N, k0, kc, K);
    }
}

/* ---- the micro-kernel: a 12 x 32 tile as four 6 x 16 register blocks ---------------------- */

/* rows [i0, i0 + 6) x columns [j0, j0 + 16) of the tile: 12 accumulators, 2 B vectors and a
 * broadcast A element (15 of the 16 ymm registers); every loop over the 6 rows is fully
 * unrolled so the accumulators stay in registers. */
INLINE2 void sub_tile(const float *ap, const float *bp, int kc, float *c, int ldc, int i0, int mr,
                      int j0, int nr, int acc)
{
    __m256 t[6][2];
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++)
        t[i][0] = t[i][1] = _mm256_setzero_ps();
    const float *a = ap + i0, *b = bp + j0;
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
        for (int i = 0; i < 6; i++) {
            __m256 av = _mm256_broadcast_ss(a + i);
            t[i][0] = _mm256_fmadd_ps(av, b0, t[i][0]);
            t[i][1] = _mm256_fmadd_ps(av, b1, t[i][1]);
        }
    }
    int n = nr - j0 < 16 ? nr - j0 : 16;
#pragma GCC unroll 6
    for (int i = 0; i < 6; i++) {
        if (i0 + i >= mr)
            break;
        float *ci = c + (size_t)(i0 + i) * ldc + j0;
        if (n == 16) {
            __m256 v0 = t[i][0], v1 = t[i][1];
            if (acc) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci + 8));
            }
            _mm256_storeu_ps(ci, v0);
            _mm256_storeu_ps(ci + 8, v1);
        } else {
            float v[16];
            _mm256_storeu_ps(v, t[i][0]);
            _mm256_storeu_ps(v + 8, t[i][1]);
            for (int j = 0; j < n; j++)
                ci[j] = acc ? ci[j] + v[j] : v[j];
        }
    }
}

AVX2 void cvlm_cpu_tile_avx2(const float *ap, const float *bp, int kc, float *c, int ldc, int mr,
                             int nr, int acc)
{
    for (int i0 = 0; i0 < mr; i0 += 6)
        for (int j0 = 0; j0 < nr; j0 += 16)
            sub_tile(ap, bp, kc, c, ldc, i0, mr, j0, nr, acc);
}

#endif /* __x86_64__ */
