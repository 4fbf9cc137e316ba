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

/* 2 W rows x M (1..4) x rows per pass: 8 accumulators + 2 weights + 1 x vector. */
INLINE2 void gemv2(float *y, int ldy, const float *x, int ldx, const int M, const void *w,
                   const int dt, size_t n, int rows, int K)
{
    __m256 acc[2][GEMV_MMAX];
    const size_t K_ = (size_t)K, r1 = rows > 1 ? n + 1 : n;
    for (int r = 0; r < 2; r++)
        for (int m = 0; m < M; m++)
            acc[r][m] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w0 = ld8(w, dt, n * K_ + k), w1 = ld8(w, dt, r1 * K_ + k);
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)m * ldx + k);
            acc[0][m] = _mm256_fmadd_ps(w0, xv, acc[0][m]);
            acc[1][m] = _mm256_fmadd_ps(w1, xv, acc[1][m]);
        }
    }
    for (int m = 0; m < M; m++) {
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

INLINE2 void gemv_range(float *y, int ldy, const float *x, int ldx, const int M, const void *w,
                        const int dt, int n0, int n1, int K)
{
    for (int n = n0; n < n1; n += 2)
        gemv2(y, ldy, x, ldx, M, w, dt, (size_t)n, n1 - n, K);
}

AVX2 void cvlm_cpu_gemv_avx2(float *y, int ldy, const float *x, int ldx, int M,
                             const struct cvlm_tensor *w, int n0, int n1, int K)
{
    CVLM_CPU_GEMV_DISPATCH(gemv_range);
}

/* Widens one W row segment with vector loads, then scatters it into its panel column. */
INLINE2 void pack_col(float *bp, const void *w, const int dt, size_t off, int kc)
{
    float row[GEMM_KC];
    int k = 0;
    for (; k + 8 <= kc; k += 8)
        _mm256_storeu_ps(row + k, ld8(w, dt, off + k));
    for (; k < kc; k++)
        row[k] = ld1(w, dt, off + k);
    for (k = 0; k < kc; k++)
        bp[(size_t)k * GEMM_NR] = row[k];
}

AVX2 void cvlm_cpu_pack_b_avx2(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0,
                               int kc, int K)
{
    for (int c = 0; c < GEMM_NR; c++) {
        size_t off = (size_t)(n0 + c) * K + k0;
        if (n0 + c >= N)
            for (int k = 0; k < kc; k++)
                bp[(size_t)k * GEMM_NR + c] = 0.0f;
        else if (w->dtype == CVLM_DTYPE_BF16)
            pack_col(bp + c, w->data, CVLM_DTYPE_BF16, off, kc);
        else if (w->dtype == CVLM_DTYPE_F16)
            pack_col(bp + c, w->data, CVLM_DTYPE_F16, off, kc);
        else
            pack_col(bp + c, w->data, CVLM_DTYPE_F32, off, kc);
    }
}

/* rows [i0, i0 + 6) x columns [j0, j0 + 16) of the tile */
INLINE2 void sub_tile(const float *ap, const float *bp, int kc, float *c, int ldc, int i0, int mr,
                      int j0, int nr, int acc)
{
    __m256 t[6][2];
    for (int i = 0; i < 6; i++)
        t[i][0] = t[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(bp + (size_t)k * GEMM_NR + j0);
        __m256 b1 = _mm256_load_ps(bp + (size_t)k * GEMM_NR + j0 + 8);
        const float *a = ap + (size_t)k * GEMM_MR + i0;
        for (int i = 0; i < 6; i++) {
            __m256 av = _mm256_broadcast_ss(a + i);
            t[i][0] = _mm256_fmadd_ps(av, b0, t[i][0]);
            t[i][1] = _mm256_fmadd_ps(av, b1, t[i][1]);
        }
    }
    for (int i = 0; i < 6 && i0 + i < mr; i++) {
        float v[16], *ci = c + (size_t)(i0 + i) * ldc + j0;
        int n = nr - j0 < 16 ? nr - j0 : 16;
        _mm256_storeu_ps(v, t[i][0]);
        _mm256_storeu_ps(v + 8, t[i][1]);
        if (n == 16 && acc) {
            _mm256_storeu_ps(ci, _mm256_add_ps(t[i][0], _mm256_loadu_ps(ci)));
            _mm256_storeu_ps(ci + 8, _mm256_add_ps(t[i][1], _mm256_loadu_ps(ci + 8)));
        } else if (n == 16) {
            _mm256_storeu_ps(ci, t[i][0]);
            _mm256_storeu_ps(ci + 8, t[i][1]);
        } else {
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
