/* q_dot_avx512.c - AVX-512 VNNI versions of the integer-dot kernels of q_dot_avx2.c: the Q4
 * prefill GEMM (cvlm_cpu_gemm_q4dot_avx2's twin) and the decode matrix-vector kernel for Q8
 * and Q4 (cvlm_cpu_gemv_qdot_avx2's twin, below). Same rounded x (cvlm_cpu_quant_x_avx2:
 * int8 per block of 32 for Q8, per group of CVLM_QX_GROUP = 128 for Q4, slots of two
 * blocks, d and xc after the slots), same contracts. Q4 GEMM (any M, W rows [n0, n1), any K
 * multiple of 32 with a short last group): y[m][n] = sum_g scale[n][g] d[m][g] sum_k c xq -
 * sum_g scale[n][g] xc[m][g].
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
 *
 * Decode (M = 1; the kernel takes M up to CVLM_CPU_QDOT_MAX_M): Q4 runs the same tiles
 * with 8 W rows against the one row of x, and prefetches the next tile's codes and scales
 * as the AVX2 kernel does. Q8 takes a pair of blocks (64 bytes) of a W row per load: its
 * codes are signed and vpdpbusd's first operand is unsigned, so it is fed w + 128 (one
 * XOR) and each lane's int32 sum starts from -128 times that lane's sum of x (one more
 * vpdpbusd per x row and pair, shared by the tile's 8 W rows): the integer dot product is
 * exact, as AVX2's sign trick is; then one conversion and one FMA by the pair's two d
 * (x stores each block's d as 8 floats beside its codes, so one vshufi64x2 of the two
 * blocks gives [codes | codes] and another [d | d]; an odd last block pairs with zeros,
 * its W loaded masked). The row scale and a tail of K % 32 (in float from x) come at the
 * end. Decode is bound by memory bandwidth; on AVX-512 CPUs without VNNI (Skylake-SP) the
 * AVX2 kernels run.
 *
 * Q8 prefill (cvlm_cpu_gemm_q8dot_avx512vnni) runs the same Q8 tile, 4 W rows by 4 x rows,
 * x tiles outer as in the Q4 GEMM: per pair of blocks and (W row, x row) one vpdpbusd, one
 * conversion and one FMA. AVX2 has no Q8 GEMM: its sign trick costs a vpsignb per (W row,
 * x row) and block, and the float GEMM on dequantized panels is about as fast.
 *
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
#define QV_R 4      /* W rows per tile of the GEMM */
#define QV_RMAX 8   /* W rows per tile of decode (one row of x) */
#define QV_MX 4     /* x rows per tile (1..4) */

/* Slots of two blocks in a row of x (the last one may hold one block). */
static inline size_t qv_slots(int K)
{
    return (size_t)(K / 32 + 1) / 2;
}

/* acc[r][m] += the dot products of group g (gi in the factor table sd) of W rows wr[r]
 * against x rows xq[m], times sd. nbl: the group's blocks; 4 (a whole group) unless
 * `part`, then 1..3 (a short last group, masked loads). */
INLINEVNNI void q4v_group(__m512 acc[QV_RMAX][QV_MX], const unsigned char *const *wr,
                          const char *const *xq, const float (*sd)[QV_CHUNK], size_t g, int gi,
                          const int part, int nbl, const int R, const int MX)
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
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) { /* a row's group done before the next: fewer live */
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

/* y[m][n + r] for r < rows (1..R) W rows and m < MX (1..QV_MX) rows of x, all of K. pf:
 * where the next tile's codes start (its scales follow from it), prefetched a line per
 * group and row as this tile runs (decode: one sequential stream ahead of the R rows), or
 * NULL. */
INLINEVNNI void q4v_tile(float *y, int ldy, const float *qx, size_t rf, const struct cvlm_tensor *w,
                         size_t n, int rows, int K, const char *pf, const int R, const int MX)
{
    const int nb = K / 32, ng = (int)cvlm_quant_groups(w), nfull = K / CVLM_Q4_GROUP;
    const size_t dgo = qv_slots(K) * 16;
    const unsigned char *wr[QV_RMAX];
    const float *sr[QV_RMAX], *dg[QV_MX];
    const char *xq[QV_MX];
    const char *spf = pf ? cvlm_cpu_q4_scales_at(w, pf, K) : NULL;
    const size_t spf_bytes = (size_t)R * ng * sizeof(float);
    /* [r * MX + m][group]: row r's group scale times x row m's d */
    float sd[QV_RMAX * QV_MX][QV_CHUNK] __attribute__((aligned(64)));
    __m512 acc[QV_RMAX][QV_MX], cs[QV_RMAX][QV_MX];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
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
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
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
        for (int g = g0; g < gf; g++) { /* whole groups */
            if (pf) {
                if ((size_t)g * 64 < spf_bytes)
                    _mm_prefetch(spf + (size_t)g * 64, _MM_HINT_T0);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++)
                    _mm_prefetch(pf + ((size_t)g * R + (size_t)r) * 64, _MM_HINT_T0);
            }
            q4v_group(acc, wr, xq, (const float(*)[QV_CHUNK])sd, (size_t)g, g - g0, 0, 4, R, MX);
        }
        if (gf < g1) /* a short last group: 1..3 blocks */
            q4v_group(acc, wr, xq, (const float(*)[QV_CHUNK])sd, (size_t)gf, gf - g0, 1,
                      nb - gf * (CVLM_Q4_GROUP / 32), R, MX);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        if (r >= rows)
            break;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            y[(size_t)m * ldy + n + (size_t)r] =
                _mm512_reduce_add_ps(acc[r][m]) - _mm512_reduce_add_ps(cs[r][m]);
    }
}

/* Rows [m, m + MX) of x against W rows [n0, n1), R at a time; pf: prefetch each next tile. */
INLINEVNNI void q4v_rows(float *y, int ldy, const float *qx, size_t rf, const struct cvlm_tensor *w,
                         int n0, int n1, int K, const int pf, const int R, const int MX)
{
    const size_t rb = (size_t)K / 2;
    for (int n = n0; n < n1; n += R) {
        const char *next = (const char *)w->data + (size_t)(n + R < n1 ? n + R : n) * rb;
        q4v_tile(y, ldy, qx, rf, w, (size_t)n, n1 - n, K, pf ? next : NULL, R, MX);
    }
}

AVX512VNNI void cvlm_cpu_gemm_q4dot_avx512vnni(float *y, int ldy, const float *qx, int M,
                                               const struct cvlm_tensor *w, int n0, int n1, int K)
{
    const size_t rf = cvlm_cpu_qx_floats(1, K);
    for (int m = 0; m < M; m += QV_MX) {
        float *ym = y + (size_t)m * ldy;
        const float *qm = qx + (size_t)m * rf;
        switch (M - m < QV_MX ? M - m : QV_MX) {
        case 1: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 0, QV_R, 1); break;
        case 2: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 0, QV_R, 2); break;
        case 3: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 0, QV_R, 3); break;
        default: q4v_rows(ym, ldy, qm, rf, w, n0, n1, K, 0, QV_R, QV_MX); break;
        }
    }
}

/* ---- decode: the matrix-vector kernel (Q8 and Q4) --------------------------------------- */

/* acc[r][m] += the dot products of the block pair at byte o of W rows wr[r] (two blocks of
 * 32, or one when `lone`: the row's last, odd block) against x rows xq[m] (each block 64
 * bytes of qx: 32 codes, then its d as 8 floats), each block's int32 sums times its d. */
INLINEVNNI void q8v_pair(__m512 acc[QV_RMAX][QV_MX], const signed char *const *wr,
                         const char *const *xq, size_t o, const int lone, const int R, const int MX)
{
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i xv[QV_MX], nc[QV_MX];
    __m512 dv[QV_MX];
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        /* a = block 2p [codes | d], b = block 2p + 1: xv = [a.codes | b.codes], dv = [a.d |
         * b.d]; without b (lone) both halves 0, so its products and factors are 0 */
        const char *q = xq[m] + o * 2;
        __m512i a = _mm512_load_si512((const void *)q),
                b = lone ? _mm512_setzero_si512() : _mm512_load_si512((const void *)(q + 64));
        xv[m] = _mm512_shuffle_i64x2(a, b, 0x44);
        dv[m] = _mm512_castsi512_ps(_mm512_shuffle_i64x2(a, b, 0xee));
        /* codes are signed, vpdpbusd's first operand unsigned: it takes w + 128, so each
         * lane starts from -128 times its sum of x (exact in int32) */
        nc[m] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                 _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, xv[m]));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        __m512i v = lone ? _mm512_maskz_loadu_epi8((__mmask64)0xffffffff, wr[r] + o)
                         : _mm512_loadu_si512((const void *)(wr[r] + o));
        __m512i u = _mm512_xor_si512(v, bias);
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc[m], u, xv[m])),
                                        dv[m], acc[r][m]);
    }
}

/* y[m][n + r] for r < rows (1..R) W rows and m < MX rows of x: Q8, a scale per row; the
 * tail of K % 32 in float from x. pf: the next tile's codes (R rows), prefetched, or NULL. */
INLINEVNNI void q8v_tile(float *y, int ldy, const float *qx, size_t rf, const float *x, int ldx,
                         const struct cvlm_tensor *w, size_t n, int rows, int K, const char *pf,
                         const int R, const int MX)
{
    const int nb = K / 32;
    const signed char *wr[QV_RMAX];
    const char *xq[QV_MX];
    __m512 acc[QV_RMAX][QV_MX];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        wr[r] = (const signed char *)w->data + (n + (size_t)(r < rows ? r : 0)) * (size_t)K;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            acc[r][m] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++)
        xq[m] = (const char *)(qx + (size_t)m * rf);
    size_t o = 0;
    for (; o + 64 <= (size_t)nb * 32; o += 64) {
#pragma GCC unroll 8
        for (int r = 0; pf && r < R; r++)
            _mm_prefetch(pf + o * R + (size_t)r * 64, _MM_HINT_T0);
        q8v_pair(acc, wr, xq, o, 0, R, MX);
    }
    if (nb % 2)
        q8v_pair(acc, wr, xq, o, 1, R, MX);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        if (r >= rows)
            break;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            y[(size_t)m * ldy + n + (size_t)r] =
                cvlm_cpu_q8_finish(_mm512_reduce_add_ps(acc[r][m]), x + (size_t)m * ldx, wr[r],
                                   nb * 32, K, w->scales[n + (size_t)r]);
    }
}

/* Q8 rows [n0, n1), R at a time, against x rows in blocks of MX (and one of the rest). */
INLINEVNNI void q8v_rows(float *y, int ldy, const float *qx, const float *x, int ldx, int M,
                         const struct cvlm_tensor *w, int n0, int n1, int K, const int R,
                         const int MX)
{
    const size_t rf = cvlm_cpu_qx_floats(1, K);
    for (int n = n0; n < n1; n += R) {
        const char *pf = (const char *)w->data + (size_t)(n + R < n1 ? n + R : n) * (size_t)K;
        for (int m = 0; m < M; m += MX) {
            float *ym = y + (size_t)m * ldy;
            const float *qm = qx + (size_t)m * rf, *xm = x + (size_t)m * ldx;
            switch (M - m < MX ? M - m : MX) {
            case 1: q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 1); break;
            case 2: q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 2); break;
            case 3: q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 3); break;
            default: q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 4); break;
            }
        }
    }
}

/* Q8 against any M rows of x (prefill): tiles of QV_MX x rows by QV_R W rows, x rows
 * outer, so that the W rows of a task (gemm.c: 64) stay in L2 while each x tile, in L1,
 * passes over them, as in the Q4 GEMM. */
AVX512VNNI void cvlm_cpu_gemm_q8dot_avx512vnni(float *y, int ldy, const float *qx, const float *x,
                                               int ldx, int M, const struct cvlm_tensor *w, int n0,
                                               int n1, int K)
{
    const size_t rf = cvlm_cpu_qx_floats(1, K);
    for (int m = 0; m < M; m += QV_MX) {
        float *ym = y + (size_t)m * ldy;
        const float *qm = qx + (size_t)m * rf, *xm = x + (size_t)m * ldx;
        for (int n = n0; n < n1; n += QV_R) {
            switch (M - m < QV_MX ? M - m : QV_MX) {
            case 1:
                q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, NULL, QV_R, 1);
                break;
            case 2:
                q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, NULL, QV_R, 2);
                break;
            case 3:
                q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, NULL, QV_R, 3);
                break;
            default:
                q8v_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, NULL, QV_R, QV_MX);
                break;
            }
        }
    }
}

AVX512VNNI void cvlm_cpu_gemv_qdot_avx512vnni(float *y, int ldy, const float *qx, const float *x,
                                              int ldx, int M, const struct cvlm_tensor *w, int n0,
                                              int n1, int K)
{
    if (w->dtype == CVLM_DTYPE_Q4 && M == 1)
        q4v_rows(y, ldy, qx, cvlm_cpu_qx_floats(1, K), w, n0, n1, K, 1, QV_RMAX, 1);
    else if (w->dtype == CVLM_DTYPE_Q4)
        cvlm_cpu_gemm_q4dot_avx512vnni(y, ldy, qx, M, w, n0, n1, K);
    else if (M == 1)
        q8v_rows(y, ldy, qx, x, ldx, M, w, n0, n1, K, QV_RMAX, 1);
    else if (M == 2)
        q8v_rows(y, ldy, qx, x, ldx, M, w, n0, n1, K, 4, 2);
    else
        q8v_rows(y, ldy, qx, x, ldx, M, w, n0, n1, K, 2, QV_MX);
}

#endif /* __x86_64__ */
