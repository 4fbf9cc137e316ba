/* q_dot_avx2.c - AVX2 integer-dot kernels for quantized weights (Q8 per output channel, Q4
 * in groups of 128: engine/backend.h), in the manner of llama.cpp's Q8_0 / Q4_0 x Q8 dot
 * products: the matrix-vector kernel against 1..CVLM_CPU_QDOT_MAX_M rows of x (decode),
 * and Q4's GEMM against any number of rows (prefill, the vision tower; below).
 *
 * x is rounded once per call (cvlm_cpu_quant_x_avx2, before the threads start) to int8:
 * xq = round(x / d), d = max |x| / 127 over a block of 32 (Q8, as Q8_0) or over a group of
 * CVLM_QX_GROUP = 128 (Q4: its weight group; 4 blocks, the last group of a row may be
 * shorter; llama.cpp's K-quants round x per 256). Each W row then costs integer
 * instructions (vpmaddubsw: unsigned x signed bytes, pairs summed into int16; vpmaddwd by
 * 1: into int32) and, per block (Q8) or group (Q4), one int -> float conversion and one
 * FMA. Why Q4 per group: a scale per block costs a conversion, a load and an FMA per
 * block, 24 instructions per group and row instead of 17, and the Q4 kernel is compute-
 * bound on a Zen 3 core (L3-resident it streams only ~1.2x DRAM's rate); per group it is
 * 4-13 % faster per matrix from DRAM (Zen 3, 2 threads, 2048 x 2048 .. 2048 x 5632). The
 * Q8 kernel already streams at the read bandwidth; per group there it measured 8-16 %
 * slower from DRAM (blocks of rows walked in a different order), so it keeps Q8_0's blocks.
 * No int16 sum can overflow: a Q4 lane adds at most 4 pairs of 15 * 127; a Q8 lane holds
 * one pair of 127 * 127 (through the sign trick below).
 *
 * - Q8: codes are signed, so the unsigned operand is |w| and x takes w's sign
 *   (vpsignb); the row scale multiplies the sum once at the end. A tail of K % 32 weights
 *   is done in float from x itself (exact).
 * - Q4: codes are nibbles c = q + 8 (unsigned as they are); sum (c - 8) xq = sum c xq -
 *   8 sum xq, the second term taken off per group from sums made with x (xc below). One
 *   32-byte load holds two blocks (16 bytes each: weight j low nibble, j + 16 high); one
 *   mask gives both blocks' weights 0..15, a shift and the mask their weights 16..31, and
 *   x is stored in that order (a "slot" of two blocks: x of both blocks' first 16, then of
 *   both blocks' last 16), so no shuffle runs per weight. A row with an odd number of
 *   blocks ends in a slot with one block (16-byte load; the slot's other half of x is 0).
 *   A group's two slots sum in int16; the factor per (group, row) is the row's group
 *   scale times x's d, made once per tile for 8 rows.
 *
 * Error: each product x w is off by at most |w| d / 2 (d of x's block or group), bounded
 * exactly by tests/unit/test_cpu_ops.c; far below int8's / int4's own rounding of w (and
 * measured: docs/PERFORMANCE.md, next-token KL per format). A non-finite x makes its
 * block's or group's d NaN, so outputs that use it are NaN as in float.
 *
 * Several W rows per pass (8 for one row of x, 4 for two, 2 for more, in x blocks of up to
 * 4 rows; the W rows then come from L1 for the next x block), so each group of x is loaded
 * once for many rows and each row's stream is long and sequential. Each tile prefetches
 * the next tile's codes and its scales (one stream each, running ahead of the 8 rows).
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* ---- x rounded to int8 ------------------------------------------------------------------ */

#define QX_BPG (CVLM_QX_GROUP / 32) /* blocks per group */

/* One row of x, 64-byte aligned:
 * - Q8: per block of 32, 64 bytes: the 32 codes, then the block's d as 8 floats;
 * - Q4: per slot of two blocks, 64 bytes: x of both blocks' weights 0..15, then of their
 *   weights 16..31; after the slots per group d (ng floats), then xc[g] = 8 d sum(xq)
 *   over the group (the -8 offset).
 * The kernels address W and x's codes with one index (x's stride 2 times W's). */
static size_t qx_slots(int K)
{
    return (size_t)(K / 32 + 1) / 2;
}

static size_t qx_groups(int K)
{
    return (size_t)(K / 32 + QX_BPG - 1) / QX_BPG;
}

static size_t qx_row_floats(int K)
{
    size_t q8 = (size_t)(K / 32) * 16, q4 = qx_slots(K) * 16 + 2 * qx_groups(K);
    return ((q8 > q4 ? q8 : q4) + 15) / 16 * 16;
}

size_t cvlm_cpu_qx_floats(int M, int K)
{
    return (size_t)M * qx_row_floats(K);
}

/* max |x| over the nb blocks of 32 at x; *bad when one of them is NaN. */
INLINE2 float group_max(const float *x, int nb, int *bad)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int i = 0; i < nb * 4; i++) {
        __m256 v = _mm256_loadu_ps(x + i * 8);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    *bad = _mm256_movemask_ps(nan) != 0;
    return _mm_cvtss_f32(h);
}

/* 127 / mx: the factor that takes the group's largest |x| to 127 (0 for mx 0 or inf). */
static inline float scale_inv(float mx)
{
    return mx > 0 && mx <= 3.4e38f ? 127.0f / mx : 0.0f;
}

/* One block of 32 x values times id as int8 codes (natural order); *sum += their sum. */
INLINE2 __m256i quant_block(const float *x, float id, int *sum)
{
    __m256i q[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i * 8), _mm256_set1_ps(id)));
    /* int32 -> int8 keeping the order: packs work per 128-bit lane, a permute fixes it */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p);
    __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    *sum += _mm_cvtsi128_si32(t);
    return p;
}

AVX2 void cvlm_cpu_quant_x_avx2(float *qx, const float *x, int ldx, int M, int K,
                                enum cvlm_dtype dt)
{
    const int nb = K / 32, ng = (int)qx_groups(K);
    const size_t rf = qx_row_floats(K), ns = qx_slots(K);
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * ldx;
        char *xq = (char *)(qx + (size_t)m * rf);
        float *dg = qx + (size_t)m * rf + ns * 16, *xc = dg + ng;
        for (int g = 0; g < ng; g++) {
            int b0 = g * QX_BPG, b1 = b0 + QX_BPG < nb ? b0 + QX_BPG : nb, bad, sum = 0;
            if (dt == CVLM_DTYPE_Q8) { /* a scale per block */
                for (int b = b0; b < b1; b++) {
                    float mx = group_max(xr + (size_t)b * 32, 1, &bad), d = mx / 127.0f;
                    __m256i p = quant_block(xr + (size_t)b * 32, scale_inv(mx), &sum);
                    _mm256_store_si256((__m256i *)(xq + (size_t)b * 64), p);
                    _mm256_store_ps((float *)(xq + (size_t)b * 64 + 32),
                                    _mm256_set1_ps(bad ? NAN : d));
                }
                continue;
            }
            float mx = group_max(xr + (size_t)b0 * 32, b1 - b0, &bad);
            dg[g] = bad ? NAN : mx / 127.0f; /* inf: id 0, d inf: 0 * inf = NaN */
            float id = scale_inv(mx);
            __m256i prev = _mm256_setzero_si256();
            for (int b = b0; b < b1; b++) {
                __m256i p = quant_block(xr + (size_t)b * 32, id, &sum);
                if (b % 2 == 0 && b + 1 < nb) {
                    prev = p;
                    continue;
                }
                __m256i a = b % 2 ? prev : p, c = b % 2 ? p : _mm256_setzero_si256();
                char *o = xq + (size_t)(b / 2) * 64;
                _mm256_store_si256((__m256i *)o, _mm256_permute2x128_si256(a, c, 0x20));
                _mm256_store_si256((__m256i *)(o + 32), _mm256_permute2x128_si256(a, c, 0x31));
            }
            xc[g] = 8.0f * dg[g] * (float)sum;
        }
    }
}

/* ---- Q8 --------------------------------------------------------------------------------- */

/* y[m][n + r] for r < R W rows (R, MX compile-time constants), m < MX rows of x. */
INLINE2 void q8_tile(float *y, int ldy, const float *qx, size_t rf, const float *x, int ldx,
                     const struct cvlm_tensor *w, size_t n, int rows, int K, const char *pf,
                     const int R, const int MX)
{
    const int nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    const signed char *wr[8];
    __m256 acc[8][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        wr[r] = (const signed char *)w->data + (n + (size_t)(r < rows ? r : 0)) * (size_t)K;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            acc[r][m] = _mm256_setzero_ps();
    }
    for (size_t o = 0; o < (size_t)nb * 32; o += 32) {
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            if (o % 64 == 0)
                _mm_prefetch(pf + o * R + (size_t)r * 64, _MM_HINT_T0);
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wr[r] + o));
            __m256i aw = _mm256_abs_epi8(wv);
#pragma GCC unroll 4
            for (int m = 0; m < MX; m++) {
                const char *q = (const char *)(qx + (size_t)m * rf) + o * 2;
                __m256i xv = _mm256_load_si256((const __m256i *)q);
                __m256i p =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
                acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                            _mm256_load_ps((const float *)(q + 32)), acc[r][m]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        if (r >= rows)
            break;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            y[(size_t)m * ldy + n + (size_t)r] = cvlm_cpu_q8_finish(
                hsum8(acc[r][m]), x + (size_t)m * ldx, wr[r], nb * 32, K, w->scales[n + (size_t)r]);
    }
}

/* ---- Q4 --------------------------------------------------------------------------------- */

#define Q4_SC_GROUPS 64 /* groups whose scales a tile copies at a time */

/* a[m] = the int16 sums of n_slots slots (two blocks each, the last one lone: one block,
 * 16 bytes of codes, when `lone`) of W row wr from byte o, against MX rows of x. */
INLINE2 void q4_slots(__m256i *a, const unsigned char *wr, size_t o, const float *qx, size_t rf,
                      const int MX, int lone, int n_slots)
{
    const __m256i m15 = _mm256_set1_epi8(15);
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++)
        a[m] = _mm256_setzero_si256();
    for (int sl = 0; sl < n_slots; sl++, o += 32) {
        __m256i v = lone && sl == n_slots - 1
                        ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(wr + o)))
                        : _mm256_loadu_si256((const __m256i *)(wr + o));
        __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++) {
            const char *q = (const char *)(qx + (size_t)m * rf) + o * 2;
            a[m] = _mm256_add_epi16(
                a[m], _mm256_add_epi16(
                          _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)q)),
                          _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(q + 32)))));
        }
    }
}

/* acc[m] += the group's int16 sums a[m] times the row's group scale sg (with one row of x
 * already times x's d, else times the d at float dgi of each x row). */
INLINE2 void q4_group(__m256 *acc, const __m256i *a, const float *qx, size_t rf, size_t dgi,
                      float sg, const int MX)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 s = _mm256_set1_ps(sg);
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(a[m], ones));
        if (MX > 1)
            f = _mm256_mul_ps(f, _mm256_broadcast_ss(qx + (size_t)m * rf + dgi));
        acc[m] = _mm256_fmadd_ps(f, s, acc[m]);
    }
}

INLINE2 void q4_tile(float *y, int ldy, const float *qx, size_t rf, const struct cvlm_tensor *w,
                     size_t n, int rows, int K, const char *pf, const int R, const int MX)
{
    const int nb = K / 32, ng = (int)cvlm_quant_groups(w), nfull = K / CVLM_Q4_GROUP;
    const size_t ns = qx_slots(K), dgo = ns * 16;
    const unsigned char *wr[8];
    const float *sr[8];
    /* the next tile's scales (rows follow rows: one stream), prefetched a line per group */
    const char *spf = cvlm_cpu_q4_scales_at(w, pf, K);
    const size_t spf_bytes = (size_t)R * ng * sizeof(float);
    /* [group][row]: the rows' group scales; with one row of x, times x's d of the group */
    float sc[Q4_SC_GROUPS][8] __attribute__((aligned(32)));
    __m256 acc[8][4], corr[4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        size_t ni = n + (size_t)(r < rows ? r : 0); /* missing rows repeat row n */
        wr[r] = (const unsigned char *)w->data + ni * (size_t)(K / 2);
        sr[r] = w->scales + ni * (size_t)ng;
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            acc[r][m] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++)
        corr[m] = _mm256_setzero_ps();
    for (int g0 = 0; g0 < ng; g0 += Q4_SC_GROUPS) {
        int g1 = g0 + Q4_SC_GROUPS < ng ? g0 + Q4_SC_GROUPS : ng;
        for (int g = g0; g < g1; g++) {
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++)
                sc[g - g0][r] = sr[r < R ? r : 0][g];
        }
        /* the offsets' share: sum over groups of scale * xc, 8 rows a vector; then, with
         * one row of x, the scales times its d */
        for (int g = g0; g < g1; g++) {
            __m256 sv = _mm256_load_ps(sc[g - g0]);
#pragma GCC unroll 4
            for (int m = 0; m < MX; m++)
                corr[m] = _mm256_fmadd_ps(
                    sv, _mm256_broadcast_ss(qx + (size_t)m * rf + dgo + ng + g), corr[m]);
            if (MX == 1)
                _mm256_store_ps(sc[g - g0], _mm256_mul_ps(sv, _mm256_broadcast_ss(qx + dgo + g)));
        }
        int gf = g1 < nfull ? g1 : nfull;
        for (int g = g0; g < gf; g++) { /* whole groups: two full slots */
            if ((size_t)g * 64 < spf_bytes)
                _mm_prefetch(spf + (size_t)g * 64, _MM_HINT_T0);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m256i a[4];
                _mm_prefetch(pf + (size_t)g * 64 * R + (size_t)r * 64, _MM_HINT_T0);
                q4_slots(a, wr[r], (size_t)g * 64, qx, rf, MX, 0, 2);
                q4_group(acc[r], a, qx, rf, dgo + (size_t)g, sc[g - g0][r], MX);
            }
        }
        for (int g = gf; g < g1; g++) { /* a short last group: 1..3 blocks */
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m256i a[4];
                q4_slots(a, wr[r], (size_t)g * 64, qx, rf, MX, nb % 2, (int)ns - g * 2);
                q4_group(acc[r], a, qx, rf, dgo + (size_t)g, sc[g - g0][r], MX);
            }
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        float c[8];
        _mm256_storeu_ps(c, corr[m]);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
            if (r < rows)
                y[(size_t)m * ldy + n + (size_t)r] = hsum8(acc[r][m]) - c[r];
    }
}

/* ---- Q4 GEMM (prefill) -------------------------------------------------------------------- */

/* The same rounded x and the same int16 group sums as the decode kernel, tiled for many
 * rows of x: QT_MX x rows against QT_R W rows, so each unpacked W slot serves QT_MX rows
 * and each x load QT_R rows. A row's group is finished (int16 -> int32 -> float, one FMA
 * by the product of the two scales) before the next row's starts, so the accumulators,
 * the x rows' sums and the unpacked slot fit the 16 registers without spills (finishing
 * all rows together spilled and ran ~15 % slower). 2 x 3 measured best of 2x2, 2x3, 3x2,
 * 4x2 and 2x4, by little (Zen 3, one thread, 128 x 64 x 2048 from L2: up to 74 GMAC/s,
 * about 2.6x the float GEMM on dequantized panels; docs/PERFORMANCE.md). The driver
 * (gemm.c) gives each task 64 W rows, which stay in L2 while the x rows pass over them. */

#define QG_CHUNK 64 /* groups whose products of scales a tile makes at a time */
#ifndef QT_R
#define QT_R 2  /* W rows per tile (<= 4) */
#define QT_MX 3 /* x rows per tile (2..4) */
#endif

/* cnt (< 8) floats at p, the rest 0. */
INLINE2 __m256 load_part(const float *p, int cnt)
{
    float t[8] = {0};
    for (int i = 0; i < cnt; i++)
        t[i] = p[i];
    return _mm256_loadu_ps(t);
}

/* y[m][n + r] for r < R (1..QT_R) W rows and m < MX (1..QT_MX) rows of x, all of K: a tile of the
 * prefill GEMM. Per whole group and row pair: 2 loads and 6 unpacking instructions per W
 * row, then per (row, x row) 4 vpmaddubsw and 3 int16 adds, one vpmaddwd, one conversion
 * and one FMA by (scale x d), the factor made for 8 groups in one multiply. A short last
 * group goes through q4_slots; the -8 offset comes off at the end (xc). */
INLINE2 void q4_gemm_tile(float *y, int ldy, const float *qx, size_t rf,
                          const struct cvlm_tensor *w, size_t n, int K, const int R, const int MX)
{
    const int nb = K / 32, ng = (int)cvlm_quant_groups(w), nfull = K / CVLM_Q4_GROUP;
    const size_t ns = qx_slots(K), dgo = ns * 16;
    const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const unsigned char *wr[4];
    const float *sr[4], *dg[4];
    const char *xq[4];
    /* [r * MX + m][group]: row r's group scale times x row m's d */
    float sd[QT_R * QT_MX][QG_CHUNK] __attribute__((aligned(32)));
    __m256 acc[4][4];
    float corr[4][4] = {{0}};
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        wr[r] = (const unsigned char *)w->data + (n + (size_t)r) * (size_t)(K / 2);
        sr[r] = w->scales + (n + (size_t)r) * (size_t)ng;
    }
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        xq[m] = (const char *)(qx + (size_t)m * rf);
        dg[m] = qx + (size_t)m * rf + dgo;
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            acc[r][m] = _mm256_setzero_ps();
    for (int g0 = 0; g0 < ng; g0 += QG_CHUNK) {
        int g1 = g0 + QG_CHUNK < ng ? g0 + QG_CHUNK : ng, g = g0;
        __m256 cs[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int m = 0; m < MX; m++)
                cs[r][m] = _mm256_setzero_ps();
        /* the factors, and the offsets' share: sum over groups of scale * xc */
        for (; g < g1; g += 8) {
            int cnt = g1 - g < 8 ? g1 - g : 8;
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                __m256 sv = cnt == 8 ? _mm256_loadu_ps(sr[r] + g) : load_part(sr[r] + g, cnt);
#pragma GCC unroll 4
                for (int m = 0; m < MX; m++) {
                    __m256 dv = cnt == 8 ? _mm256_loadu_ps(dg[m] + g) : load_part(dg[m] + g, cnt),
                           cv = cnt == 8 ? _mm256_loadu_ps(dg[m] + ng + g)
                                         : load_part(dg[m] + ng + g, cnt);
                    _mm256_store_ps(sd[r * MX + m] + (g - g0), _mm256_mul_ps(sv, dv));
                    cs[r][m] = _mm256_fmadd_ps(sv, cv, cs[r][m]);
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int m = 0; m < MX; m++)
                corr[r][m] += hsum8(cs[r][m]);
        int gf = g1 < nfull ? g1 : nfull;
        for (g = g0; g < gf; g++) { /* whole groups: two full slots */
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) { /* a row's group done before the next: fewer live */
                __m256i a[4];
#pragma GCC unroll 4
                for (int sl = 0; sl < 2; sl++) {
                    __m256i v =
                        _mm256_loadu_si256((const __m256i *)(wr[r] + (size_t)g * 64 + sl * 32));
                    __m256i lo = _mm256_and_si256(v, m15),
                            hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
#pragma GCC unroll 4
                    for (int m = 0; m < MX; m++) {
                        const char *q = xq[m] + (size_t)g * 128 + sl * 64;
                        __m256i p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)q)),
                            _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(q + 32))));
                        a[m] = sl ? _mm256_add_epi16(a[m], p) : p;
                    }
                }
#pragma GCC unroll 4
                for (int m = 0; m < MX; m++)
                    acc[r][m] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a[m], ones)),
                                        _mm256_broadcast_ss(sd[r * MX + m] + (g - g0)), acc[r][m]);
            }
        }
        for (g = gf; g < g1; g++) { /* a short last group: 1..3 blocks */
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                __m256i a[4];
                q4_slots(a, wr[r], (size_t)g * 64, qx, rf, MX, nb % 2, (int)ns - g * 2);
#pragma GCC unroll 4
                for (int m = 0; m < MX; m++)
                    acc[r][m] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a[m], ones)),
                                        _mm256_broadcast_ss(sd[r * MX + m] + (g - g0)), acc[r][m]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++)
            y[(size_t)m * ldy + n + (size_t)r] = hsum8(acc[r][m]) - corr[r][m];
}

/* Rows [m, m + mx) of x (mx 1..QT_MX) against W rows [n0, n1), QT_R at a time. */
INLINE2 void q4_gemm_rows(float *y, int ldy, const float *qx, size_t rf,
                          const struct cvlm_tensor *w, int n0, int n1, int K, const int MX)
{
    int n = n0;
    for (; n + QT_R <= n1; n += QT_R)
        q4_gemm_tile(y, ldy, qx, rf, w, (size_t)n, K, QT_R, MX);
    for (; n < n1; n++)
        q4_gemm_tile(y, ldy, qx, rf, w, (size_t)n, K, 1, MX);
}

AVX2 void cvlm_cpu_gemm_q4dot_avx2(float *y, int ldy, const float *qx, int M,
                                   const struct cvlm_tensor *w, int n0, int n1, int K)
{
    const size_t rf = qx_row_floats(K);
    for (int m = 0; m < M; m += QT_MX) {
        float *ym = y + (size_t)m * ldy;
        const float *qm = qx + (size_t)m * rf;
        switch (M - m < QT_MX ? M - m : QT_MX) {
        case 1: q4_gemm_rows(ym, ldy, qm, rf, w, n0, n1, K, 1); break;
        case 2: q4_gemm_rows(ym, ldy, qm, rf, w, n0, n1, K, 2); break;
        default: q4_gemm_rows(ym, ldy, qm, rf, w, n0, n1, K, QT_MX); break;
        }
    }
}

/* ---- driver ----------------------------------------------------------------------------- */

/* Rows [n0, n1) of W, R at a time, against all M rows of x in blocks of MX (then one block
 * of the rest: W rows come from L1 for the blocks after the first). Each tile prefetches
 * the next one (rows are contiguous: one sequential stream) while it runs. */
INLINE2 void qdot_rows(const int dt, float *y, int ldy, const float *qx, const float *x, int ldx,
                       int M, const struct cvlm_tensor *w, int n0, int n1, int K, const int R,
                       const int MX)
{
    const size_t rf = qx_row_floats(K), rb = dt == CVLM_DTYPE_Q4 ? (size_t)K / 2 : (size_t)K;
    for (int n = n0; n < n1; n += R) {
        const char *pf = (const char *)w->data + (size_t)(n + R < n1 ? n + R : n) * rb;
        int m = 0;
        for (; m + MX <= M; m += MX) {
            float *ym = y + (size_t)m * ldy;
            const float *qm = qx + (size_t)m * rf, *xm = x + (size_t)m * ldx;
            if (dt == CVLM_DTYPE_Q8)
                q8_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, MX);
            else
                q4_tile(ym, ldy, qm, rf, w, (size_t)n, n1 - n, K, pf, R, MX);
        }
        float *ym = y + (size_t)m * ldy;
        const float *qm = qx + (size_t)m * rf, *xm = x + (size_t)m * ldx;
        switch (MX > 1 ? M - m : 0) {
        case 0: break;
        case 1:
            if (dt == CVLM_DTYPE_Q8)
                q8_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 1);
            else
                q4_tile(ym, ldy, qm, rf, w, (size_t)n, n1 - n, K, pf, R, 1);
            break;
        case 2:
            if (dt == CVLM_DTYPE_Q8)
                q8_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 2);
            else
                q4_tile(ym, ldy, qm, rf, w, (size_t)n, n1 - n, K, pf, R, 2);
            break;
        default:
            if (dt == CVLM_DTYPE_Q8)
                q8_tile(ym, ldy, qm, rf, xm, ldx, w, (size_t)n, n1 - n, K, pf, R, 3);
            else
                q4_tile(ym, ldy, qm, rf, w, (size_t)n, n1 - n, K, pf, R, 3);
            break;
        }
    }
}

/* 8 W rows at a time against one row of x, 4 against two, else (Q8) 2 or (Q4: fewer
 * registers to spare) 1 against blocks of up to 4 rows of x. */
INLINE2 void qdot_range(const int dt, float *y, int ldy, const float *qx, const float *x, int ldx,
                        int M, const struct cvlm_tensor *w, int n0, int n1, int K)
{
    if (M == 1)
        qdot_rows(dt, y, ldy, qx, x, ldx, M, w, n0, n1, K, 8, 1);
    else if (M == 2)
        qdot_rows(dt, y, ldy, qx, x, ldx, M, w, n0, n1, K, 4, 2);
    else if (dt == CVLM_DTYPE_Q4)
        qdot_rows(dt, y, ldy, qx, x, ldx, M, w, n0, n1, K, 1, 4);
    else
        qdot_rows(dt, y, ldy, qx, x, ldx, M, w, n0, n1, K, 2, 4);
}

AVX2 void cvlm_cpu_gemv_qdot_avx2(float *y, int ldy, const float *qx, const float *x, int ldx,
                                  int M, const struct cvlm_tensor *w, int n0, int n1, int K)
{
    if (w->dtype == CVLM_DTYPE_Q4)
        qdot_range(CVLM_DTYPE_Q4, y, ldy, qx, x, ldx, M, w, n0, n1, K);
    else
        qdot_range(CVLM_DTYPE_Q8, y, ldy, qx, x, ldx, M, w, n0, n1, K);
}

#endif /* __x86_64__ */
