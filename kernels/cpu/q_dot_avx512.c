/* q_dot_avx512.c - AVX-512 VNNI version of the Q4 prefill GEMM (cvlm_cpu_gemm_q4dot_avx2 in
 * q_dot_avx2.c): the same rounded x (cvlm_cpu_quant_x_avx2: int8 per group of
 * CVLM_QX_GROUP = 128, slots of two blocks, d and xc after the slots), the same contract
 * (any M, W rows [n0, n1), any K multiple of 32 with a short last group), y[m][n] =
 * sum_g scale[n][g] d[m][g] sum_k c xq - sum_g scale[n][g] xc[m][g].
 *
 * One 512-bit load is a whole group of a W row (64 bytes, slots 2g and 2g + 1); one mask
 * gives both slots' weights 0..15 of both blocks, a shift and the mask their weights
 * 16..31. x stores a slot as [x of the low nibbles | x of the high nibbles], so the
 * matching x vectors are [low half of slot 2g | low half of slot 2g + 1] and the same for
 * the high halves: from the group's two 64-byte slots of x, one vshufi64x2 each, made
 * once per (x row, group) and used by all W rows of the tile. Per (W row, x row, group):
 * two vpdpbusd (codes unsigned as they are, x signed; no int16 step, so nothing can
 * saturate: a lane sums 8 products of at most 15 * 128), one int -> float conversion and
 * one FMA by the product of the two scales (broadcast from a table made per 64 groups).
 * The -8 offset comes off at the end, as in the AVX2 kernel (xc).
 *
 * Tiles of 4 W rows by up to 4 x rows: 16 accumulators, 8 x vectors, the unpacked W row
 * (2), the dot product, the mask and a zero: 29 of the 32 registers. A tile with fewer W
 * rows left repeats row n (only the rows asked for are stored). The x rows of a tile stay in
 * L1 while the W rows stream (gemm.c gives each task 64 W rows, which stay in L2).
 * A short last group (1..3 blocks) takes the same path with masked loads: the codes past
 * the row's end read as 0 and a missing second slot of x is not read.
 *
 * A NaN d (a non-finite x in the group) makes the scale products NaN, so every output of
 * that x row is NaN, as in the AVX2 kernel. Results differ from it only in the order of
 * the float sums (16 lanes instead of 8).
 * Only reached when the backend detected AVX-512 F/BW/VL and VNNI.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define INLINEVNNI                                                                             \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512vnni," \
                                                       "fma")))

#define QV_CHUNK 64 /* groups whose products of scales a tile makes at a time */
#define QV_R 4      /* W rows per tile */
#define QV_MX 4     /* x rows per tile (1..4) */

/* Slots of two blocks in a row of x (the last one may hold one block). */
static inline size_t qv_slots(int K)
{
    return (size_t)(K / 32 + 1) / 2;
}

/* acc[r][m] += the dot products of group g (gi in the factor table sd) of W rows wr[r]
 * against x rows xq[m], times sd. nbl: the group's blocks; 4 (a whole group) unless
 * `part`, then 1..3 (a short last group, masked loads). */
INLINEVNNI void q4v_group(__m512 acc[QV_R][QV_MX], const unsigned char *const *wr,
                          const char *const *xq, const float (*sd)[QV_CHUNK], size_t g, int gi,
                          const int part, int nbl, const int MX)
{
    const __m512i m15 = _mm512_set1_epi8(15);
    /* without part these are all-ones, and the loads below plain ones */
    const __mmask64 wm = part ? ((__mmask64)1 << (16 * nbl)) - 1 : ~(__mmask64)0;
    const __mmask8 x2 = part && nbl < 3 ? 0 : 0xff; /* the group's second slot of x exists */
    __m512i xl[QV_MX], xh[QV_MX];
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        /* a = slot 2g [lo | hi], b = slot 2g + 1: xl = [a.lo | b.lo], xh = [a.hi | b.hi] */
        const char *q = xq[m] + g * 128;
        __m512i a = _mm512_load_si512((const void *)q),
                b = part ? _mm512_maskz_load_epi64(x2, q + 64)
                         : _mm512_load_si512((const void *)(q + 64));
        xl[m] = _mm512_shuffle_i64x2(a, b, 0x44);
        xh[m] = _mm512_shuffle_i64x2(a, b, 0xee);
    }
#pragma GCC unroll 4
    for (int r = 0; r < QV_R; r++) { /* a row's group done before the next: fewer live */
        __m512i v = part ? _mm512_maskz_loadu_epi8(wm, wr[r] + g * 64)
                         : _mm512_loadu_si512((const void *)(wr[r] + g * 64));
        __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++) {
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl[m]);
            p = _mm512_dpbusd_epi32(p, hi, xh[m]);
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(sd[r * MX + m][gi]),
                                        acc[r][m]);
        }
    }
}

/* y[m][n + r] for r < rows (1..QV_R) W rows and m < MX (1..QV_MX) rows of x, all of K. */
INLINEVNNI void q4v_tile(float *y, int ldy, const float *qx, size_t rf, const struct cvlm_tensor *w,
                         size_t n, int rows, int K, const int MX)
{
    const int nb = K / 32, ng = (int)cvlm_quant_groups(w), nfull = K / CVLM_Q4_GROUP;
    const size_t dgo = qv_slots(K) * 16;
    const unsigned char *wr[QV_R];
    const float *sr[QV_R], *dg[QV_MX];
    const char *xq[QV_MX];
    /* [r * MX + m][group]: row r's group scale times x row m's d */
    float sd[QV_R * QV_MX][QV_CHUNK] __attribute__((aligned(64)));
    __m512 acc[QV_R][QV_MX], cs[QV_R][QV_MX];
#pragma GCC unroll 4
    for (int r = 0; r < QV_R; r++) {
        size_t ni = n + (size_t)(r < rows ? r : 0); /* missing rows repeat row n */
        wr[r] = (const unsigned char *)w->data + ni * (size_t)(K / 2);
        sr[r] = w->scales + ni * (size_t)ng;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            acc[r][m] = cs[r][m] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        xq[m] = (const char *)(qx + (size_t)m * rf);
        dg[m] = qx + (size_t)m * rf + dgo;
    }
    for (int g0 = 0; g0 < ng; g0 += QV_CHUNK) {
        int g1 = g0 + QV_CHUNK < ng ? g0 + QV_CHUNK : ng;
        /* the factors, and the offsets' share: sum over groups of scale * xc (masked
         * loads past g1 read 0) */
        for (int g = g0; g < g1; g += 16) {
            __mmask16 k = g1 - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (g1 - g)) - 1);
#pragma GCC unroll 4
            for (int r = 0; r < QV_R; r++) {
                __m512 sv = _mm512_maskz_loadu_ps(k, sr[r] + g);
#pragma GCC unroll 4
                for (int m = 0; m < MX; m++) {
                    __m512 dv = _mm512_maskz_loadu_ps(k, dg[m] + g),
                           cv = _mm512_maskz_loadu_ps(k, dg[m] + ng + g);
                    _mm512_store_ps(sd[r * MX + m] + (g - g0), _mm512_mul_ps(sv, dv));
                    cs[r][m] = _mm512_fmadd_ps(sv, cv, cs[r][m]);
                }
            }
        }
        int gf = g1 < nfull ? g1 : nfull;
        for (int g = g0; g < gf; g++) /* whole groups */
            q4v_group(acc, wr, xq, (const float(*)[QV_CHUNK])sd, (size_t)g, g - g0, 0, 4, MX);
        if (gf < g1) /* a short last group: 1..3 blocks */
            q4v_group(acc, wr, xq, (const float(*)[QV_CHUNK])sd, (size_t)gf, gf - g0, 1,
                      nb - gf * (CVLM_Q4_GROUP / 32), MX);
    }
#pragma GCC unroll 4
    for (int r = 0; r < QV_R; r++) {
        if (r >= rows)
            break;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            y[(size_t)m * ldy + n + (size_t)r] =
                _mm512_reduce_add_ps(acc[r][m]) - _mm512_reduce_add_ps(cs[r][m]);
    }
}

/* Rows [m, m + MX) of x against W rows [n0, n1), QV_R at a time. */
INLINEVNNI void q4v_rows(float *y, int ldy, const float *qx, size_t rf, const struct cvlm_tensor *w,
                         int n0, int n1, int K, const int MX)
{
    for (int n = n0; n < n1; n += QV_R)
        q4v_tile(y, ldy, qx, rf, w, (size_t)n, n1 - n, K, MX);
}

AVX512VNNI void cvlm_cpu_gemm_q4dot_avx512vnni(float *y, int ldy, const float *qx, int M,
                                               const struct cvlm_tensor *w, int n0, int n1, int K)
{
    const size_t rf = cvlm_cpu_qx_floats(1, K);
    for (int m = 0; m < M; m += QV_MX) {
        float *ym = y + (size_t)m * ldy;
        const float *qm = qx + (size_t)m * rf;
        switch (M - m < QV_MX ? M - m : QV_MX) {
        case 1: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 1); break;
        case 2: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 2); break;
        case 3: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 3); break;
        default: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, QV_MX); break;
        }
    }
}

#endif /* __x86_64__ */
