/* simd.h - small register helpers shared by the CPU backend's AVX2 and AVX-512 files
 * (gemm_avx2.c, vec_avx2.c, gemm_avx512.c, vec_avx512.c), written once here.
 *
 * Each helper is always inlined and carries the smallest __attribute__((target)) set its
 * intrinsics need. GCC and Clang inline a target function only into callers whose own
 * target set includes the callee's, so that set must stay a subset of every caller's
 * (the files' AVX2 / AVX512 / INLINE512 / INLINEBF16 macros): here "avx2" for the AVX2
 * helpers and "avx512f,avx512dq" for the AVX-512 ones. Nothing here runs unless the
 * backend detected the features (see cpu.h).
 */
#ifndef CVLM_CPU_SIMD_H
#define CVLM_CPU_SIMD_H

#if defined(__x86_64__)
#include <immintrin.h>

/* ---- AVX2 ------------------------------------------------------------------------------ */

/* The sum of the 8 lanes of v. */
static inline __attribute__((always_inline, target("avx2"))) float hsum8(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* r[0..8) := its transpose (8 x 8 floats): unpack pairs, then quads, then swap the
 * 128-bit halves. */
static inline __attribute__((always_inline, target("avx2"))) void transpose8(__m256 r[8])
{
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* ---- AVX-512 --------------------------------------------------------------------------- */

#define CVLM_SIMD_INLINE512 static inline __attribute__((always_inline, target("avx512f,avx512dq")))

/* Sums each of 4 vectors; returns [sum a, sum b, sum c, sum d]. */
CVLM_SIMD_INLINE512 __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d)
{
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps(a8, 1));
    __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(b8), _mm256_extractf128_ps(b8, 1));
    __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(c8), _mm256_extractf128_ps(c8, 1));
    __m128 d4 = _mm_add_ps(_mm256_castps256_ps128(d8), _mm256_extractf128_ps(d8, 1));
    return _mm_hadd_ps(_mm_hadd_ps(a4, b4), _mm_hadd_ps(c4, d4));
}

/* r[0..16) := its transpose, by 4 butterfly stages: stage b swaps element (i, c | b) with
 * (i | b, c) for every i, c with bit b clear. */
CVLM_SIMD_INLINE512 void transpose16(__m512 r[16])
{
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
#pragma GCC unroll 4
    for (int b = 8; b >= 1; b >>= 1) {
        __m512i vb = _mm512_set1_epi32(b), v16 = _mm512_set1_epi32(16);
        __mmask16 hi = _mm512_test_epi32_mask(iota, vb); /* lanes c with bit b set */
        /* low row: c (bit clear) from itself, c (bit set) from the partner's c & ~b */
        __m512i lo_idx = _mm512_mask_or_epi32(iota, hi, _mm512_andnot_si512(vb, iota), v16);
        /* high row: c (bit clear) from the low row's c | b, c (bit set) from itself */
        __m512i hi_idx = _mm512_mask_or_epi32(_mm512_or_si512(iota, vb), hi, iota, v16);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i & b)
                continue;
            __m512 a = r[i], c = r[i | b];
            r[i] = _mm512_permutex2var_ps(a, lo_idx, c);
            r[i | b] = _mm512_permutex2var_ps(a, hi_idx, c);
        }
    }
}

#undef CVLM_SIMD_INLINE512

#endif /* __x86_64__ */
#endif
