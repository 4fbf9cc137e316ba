/* gemv_q_dot_avx2.c - AVX2 integer-dot matrix-vector kernels for quantized weights (Q8 per
 * output channel, Q4 in groups of 128: engine/backend.h) against 1..CVLM_CPU_QDOT_MAX_M
 * rows of x (decode), as llama.cpp's Q8_0 / Q4_0 x Q8_0 dot products do.
 *
 * x is rounded once per call (cvlm_cpu_quant_x_avx2, before the threads start) to int8 in
 * blocks of 32: xq = round(x / d), d = max |x| of the block / 127. Each W row then costs
 * per 32 weights a handful of integer instructions instead of widening every weight to a
 * float: vpmaddubsw (unsigned x signed bytes, pairs summed into int16) and vpmaddwd by 1
 * (into int32), one int -> float conversion and one FMA by the block's d (times the group
 * scale for Q4). No int16 sum can saturate: |pair| <= 128 * 127 * 2 (Q8, through the
 * sign trick below) or 15 * 127 * 4 (Q4, two pairs added).
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
 *
 * Error: each product x w is off by at most |w| d / 2 (d of x's block), bounded exactly by
 * tests/unit/test_cpu_ops.c; far below int8's / int4's own rounding of w. A non-finite x
 * makes its block's d NaN, so outputs that use it are NaN as in float.
 *
 * Several W rows per pass (8 for one row of x, 4 for two, 2 for more, in x blocks of up to
 * 4 rows; the W rows then come from L1 for the next x block), so each block of x is loaded
 * once for many rows and each row's stream is long and sequential.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* ---- x rounded to int8 ------------------------------------------------------------------ */

/* One row of x, 64-byte aligned:
 * - Q8: per block of 32, 64 bytes: the 32 codes, then d as 8 floats;
 * - Q4: per slot of two blocks, 128 bytes: x of both blocks' weights 0..15, of their weights
 *   16..31 (32 bytes each), then [d0 x 4, d1 x 4] (the int32 lanes' d), 32 bytes unused;
 *   after the slots xc[g] = 8 * sum over group g's blocks of d sum(xq) (the -8 offset).
 * The kernels address W and x with one index (x's stride 2 or 4 times W's). */
static size_t qx_slots(int K)
{
    return (size_t)(K / 32 + 1) / 2;
}

static size_t qx_row_floats(int K)
{
    return (qx_slots(K) * 32 + (size_t)(K + CVLM_Q4_GROUP - 1) / CVLM_Q4_GROUP + 15) / 16 * 16;
}

size_t cvlm_cpu_qx_floats(int M, int K)
{
    return (size_t)M * qx_row_floats(K);
}

/* One block of 32 x values: its codes (natural order) and d; *sum = sum of the codes. */
INLINE2 __m256i quant_block(const float *x, float *d, int *sum)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + i * 8);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float m = _mm_cvtss_f32(h), id = m > 0 && m <= 3.4e38f ? 127.0f / m : 0.0f;
    *d = _mm256_movemask_ps(bad) ? NAN : m / 127.0f; /* inf: id 0, d inf: 0 * inf = NaN */
    __m256i q[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
    /* int32 -> int8 keeping the order: packs work per 128-bit lane, a permute fixes it */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p);
    __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    *sum = _mm_cvtsi128_si32(t);
    return p;
}

AVX2 void cvlm_cpu_quant_x_avx2(float *qx, const float *x, int ldx, int M, int K,
                                enum cvlm_dtype dt)
{
    const int nb = K / 32, bpg = CVLM_Q4_GROUP / 32;
    const size_t rf = qx_row_floats(K);
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * ldx;
        char *xq = (char *)(qx + (size_t)m * rf);
        float *xc = qx + (size_t)m * rf + qx_slots(K) * 32;
        __m256i prev = _mm256_setzero_si256();
        float dprev = 0;
        for (int b = 0; b < nb; b++) {
            float d;
            int sum;
            __m256i p = quant_block(xr + (size_t)b * 32, &d, &sum);
            if (dt == CVLM_DTYPE_Q8) {
                _mm256_store_si256((__m256i *)(xq + (size_t)b * 64), p);
                _mm256_store_ps((float *)(xq + (size_t)b * 64 + 32), _mm256_set1_ps(d));
                continue;
            }
            if (b % bpg == 0)
                xc[b / bpg] = 0;
            xc[b / bpg] += 8.0f * d * (float)sum;
            if (b % 2 == 0 && b + 1 < nb) {
                prev = p;
                dprev = d;
                continue;
            }
            __m256i a = b % 2 ? prev : p, c = b % 2 ? p : _mm256_setzero_si256();
            float da = b % 2 ? dprev : d, dc = b % 2 ? d : 0.0f;
            char *o = xq + (size_t)(b / 2) * 128;
            _mm256_store_si256((__m256i *)o, _mm256_permute2x128_si256(a, c, 0x20));
            _mm256_store_si256((__m256i *)(o + 32), _mm256_permute2x128_si256(a, c, 0x31));
            _mm256_store_ps((float *)(o + 64), _mm256_set_m128(_mm_set1_ps(dc), _mm_set1_ps(da)));
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
        float s = w->scales[n + (size_t)r];
#pragma GCC unroll 4
        for (int m = 0; m < MX; m++) {
            float a = hsum8(acc[r][m]);
            for (int k = nb * 32; k < K; k++)
                a += x[(size_t)m * ldx + k] * (float)wr[r][k];
            y[(size_t)m * ldy + n + (size_t)r] = a * s;
        }
    }
}

/* ---- Q4 --------------------------------------------------------------------------------- */

#define Q4_SC_GROUPS 64 /* groups whose scales a tile copies at a time */

/* One slot (two blocks; lone: one, 16 bytes of codes) of W row wr at byte o against MX rows
 * of x: t[m] (+)= (int32 sums) * d. */
INLINE2 void q4_slot(__m256 *t, const unsigned char *wr, size_t o, const float *qx, size_t rf,
                     const int MX, const int first, int lone)
{
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256i v = lone ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(wr + o)))
                     : _mm256_loadu_si256((const __m256i *)(wr + o));
    __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
#pragma GCC unroll 4
    for (int m = 0; m < MX; m++) {
        const char *q = (const char *)(qx + (size_t)m * rf) + o * 4;
        __m256i p = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)q)),
            _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(q + 32))));
        __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
        __m256 d = _mm256_load_ps((const float *)(q + 64));
        t[m] = first ? _mm256_mul_ps(f, d) : _mm256_fmadd_ps(f, d, t[m]);
    }
}

INLINE2 void q4_tile(float *y, int ldy, const float *qx, size_t rf, const struct cvlm_tensor *w,
                     size_t n, int rows, int K, const char *pf, const int R, const int MX)
{
    const int nb = K / 32, ng = (int)cvlm_quant_groups(w), nfull = K / CVLM_Q4_GROUP;
    const size_t ns = qx_slots(K);
    const unsigned char *wr[8];
    const float *sr[8];
    float sc[Q4_SC_GROUPS][8] __attribute__((aligned(32))); /* [group][row] */
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
        /* the offsets' share: sum over groups of scale * xc, 8 rows a vector */
        for (int g = g0; g < g1; g++) {
            __m256 sv = _mm256_load_ps(sc[g - g0]);
#pragma GCC unroll 4
            for (int m = 0; m < MX; m++)
                corr[m] = _mm256_fmadd_ps(
                    sv, _mm256_broadcast_ss(qx + (size_t)m * rf + ns * 32 + g), corr[m]);
        }
        int gf = g1 < nfull ? g1 : nfull;
        for (int g = g0; g < gf; g++) { /* whole groups: two full slots */
            size_t o = (size_t)g * 64;
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m256 t[4];
                _mm_prefetch(pf + o * R + (size_t)r * 64, _MM_HINT_T0);
                q4_slot(t, wr[r], o, qx, rf, MX, 1, 0);
                q4_slot(t, wr[r], o + 32, qx, rf, MX, 0, 0);
                __m256 sg = _mm256_broadcast_ss(&sc[g - g0][r]);
#pragma GCC unroll 4
                for (int m = 0; m < MX; m++)
                    acc[r][m] = _mm256_fmadd_ps(t[m], sg, acc[r][m]);
            }
        }
        for (int g = gf; g < g1; g++) { /* a short last group: 1..3 blocks */
            int s0 = g * 2, s1 = (int)ns;
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                __m256 t[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                               _mm256_setzero_ps()};
                for (int s = s0; s < s1; s++)
                    q4_slot(t, wr[r], (size_t)s * 32, qx, rf, MX, 0, s * 2 + 1 >= nb);
                __m256 sg = _mm256_broadcast_ss(&sc[g - g0][r]);
#pragma GCC unroll 4
                for (int m = 0; m < MX; m++)
                    acc[r][m] = _mm256_fmadd_ps(t[m], sg, acc[r][m]);
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
