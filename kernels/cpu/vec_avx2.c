/* vec_avx2.c - AVX2 + FMA element-wise and attention helpers (struct cpu_vec_ops).
 *
 * Same approximations as vec_avx512.c (exp: range reduction + degree-7 polynomial, 2^n
 * built in the exponent bits; erf: Abramowitz & Stegun 7.1.26); tails run the scalar
 * formulas on a zero-padded 8-lane buffer so every element takes the vector path.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE2 static inline __attribute__((always_inline, target("avx2,fma")))

INLINE2 __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* n in [-126, 128]: 2^n as (n + 127) << 23; n = 128 only at the clamp edge, split */
    __m256i e = _mm256_cvtps_epi32(n);
    __m256i e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
    __m256 s1 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
    __m256 s2 =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

INLINE2 __m256 gelu8(__m256 x)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                             _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    __m256 e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a));
    __m256 erf = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
    erf = _mm256_or_ps(erf, _mm256_and_ps(x, sign));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x),
                         _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

AVX2 static void gelu(float *x, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        float buf[8] = {0};
        memcpy(buf, x + i, (n - i) * sizeof(float));
        _mm256_storeu_ps(buf, gelu8(_mm256_loadu_ps(buf)));
        memcpy(x + i, buf, (n - i) * sizeof(float));
    }
}

INLINE2 __m256 silu_mul8(__m256 g, __m256 u)
{
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

AVX2 static void silu_mul(float *o, const float *g, const float *u, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        float bg[8] = {0}, bu[8] = {0};
        memcpy(bg, g + i, (size_t)(n - i) * sizeof(float));
        memcpy(bu, u + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(bg, silu_mul8(_mm256_loadu_ps(bg), _mm256_loadu_ps(bu)));
        memcpy(o + i, bg, (size_t)(n - i) * sizeof(float));
    }
}

AVX2 static float exp_sum(float *p, int n, float mx)
{
    __m256 s = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
        _mm256_storeu_ps(p + j, e);
        s = _mm256_add_ps(s, e);
    }
    float sum = hsum8(s);
    if (j < n) {
        float buf[8];
        for (int i = 0; i < 8; i++)
            buf[i] = j + i < n ? p[j + i] - mx : -INFINITY;
        _mm256_storeu_ps(buf, exp8(_mm256_loadu_ps(buf)));
        for (int i = 0; j + i < n; i++) {
            p[j + i] = buf[i];
            sum += buf[i];
        }
    }
    return sum;
}

/* Up to 64 output columns stay in 8 accumulators while the value rows stream by. */
AVX2 static void pv(float *o, const float *p, const float *v, int ldv, int n, int hd)
{
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        __m256 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
        for (int j = 0; j < n; j++) {
            __m256 pj = _mm256_set1_ps(p[j]);
            const float *vr = v + (size_t)j * ldv + d0;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * i), acc[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        __m256 acc = _mm256_loadu_ps(o + d0);
        for (int j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + (size_t)j * ldv + d0),
                                  acc);
        _mm256_storeu_ps(o + d0, acc);
    }
    for (; d0 < hd; d0++)
        for (int j = 0; j < n; j++)
            o[d0] += p[j] * v[(size_t)j * ldv + d0];
}

/* ---- 16-bit KV cache: keys and values widened in registers ------------------------- */

#define AVX2H __attribute__((target("avx2,fma,f16c")))
#define INLINE2H static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* 8 F16 / BF16 elements at p as floats (BF16: the bits moved to the top half). */
INLINE2H __m256 ld8h(const uint16_t *p, enum cvlm_dtype dt)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return dt == CVLM_DTYPE_F16
               ? _mm256_cvtph_ps(h)
               : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 elements of a key row of type dt (F32, F16, BF16 or Q8 codes) from element i. */
INLINE2H __m256 ld8k(const void *row, int i, const enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F32)
        return _mm256_loadu_ps((const float *)row + i);
    if (dt == CVLM_DTYPE_Q8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + i))));
    return ld8h((const uint16_t *)row + i, dt);
}

INLINE2H float ld1k(const void *row, int i, const enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F32)
        return ((const float *)row)[i];
    if (dt == CVLM_DTYPE_Q8)
        return (float)((const int8_t *)row)[i];
    return cvlm_cpu_kv_get(row, (size_t)i, dt);
}

/* s[j] = q . K[j] * scale (Q8: times the key's scale ks[j * lds]) for n keys ldk elements
 * apart: four keys at a time, one accumulator each (four independent FMA chains), the four
 * reduced together by horizontal adds; then one key at a time. */
INLINE2H void scores_k(float *s, const float *q, const void *k, int ldk, int n, int hd, float scale,
                       const float *ks, int lds, const enum cvlm_dtype dt)
{
    const size_t es = dt == CVLM_DTYPE_F32 ? 4 : dt == CVLM_DTYPE_Q8 ? 1 : 2;
    const char *kr = k;
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const char *r[4];
        __m256 a[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            r[u] = kr + (size_t)(j + u) * ldk * es;
            a[u] = _mm256_setzero_ps();
        }
        int i = 0;
        for (; i + 8 <= hd; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++)
                a[u] = _mm256_fmadd_ps(qv, ld8k(r[u], i, dt), a[u]);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        float d[4];
        _mm_storeu_ps(d, t);
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            for (int ii = i; ii < hd; ii++)
                d[u] += q[ii] * ld1k(r[u], ii, dt);
            s[j + u] = d[u] * (ks ? ks[(size_t)(j + u) * lds] * scale : scale);
        }
    }
    for (; j < n; j++) {
        const char *r = kr + (size_t)j * ldk * es;
        __m256 a = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= hd; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), ld8k(r, i, dt), a);
        float d = hsum8(a);
        for (; i < hd; i++)
            d += q[i] * ld1k(r, i, dt);
        s[j] = d * (ks ? ks[(size_t)j * lds] * scale : scale);
    }
}

AVX2H static void scores16(float *s, const float *q, const uint16_t *k, int ldk, int n, int hd,
                           float scale, enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F16)
        scores_k(s, q, k, ldk, n, hd, scale, NULL, 0, CVLM_DTYPE_F16);
    else
        scores_k(s, q, k, ldk, n, hd, scale, NULL, 0, CVLM_DTYPE_BF16);
}

AVX2H static void scores(float *s, const float *q, const float *k, int ldk, int n, int hd,
                         float scale)
{
    scores_k(s, q, k, ldk, n, hd, scale, NULL, 0, CVLM_DTYPE_F32);
}

/* pv with the value rows widened: 64 columns in 8 accumulators, then 8 at a time */
INLINE2H void pv_h(float *o, const float *p, const uint16_t *v, int ldv, int n, int hd,
                   enum cvlm_dtype dt)
{
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        __m256 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
        for (int j = 0; j < n; j++) {
            __m256 pj = _mm256_set1_ps(p[j]);
            const uint16_t *vr = v + (size_t)j * ldv + d0;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_fmadd_ps(pj, ld8h(vr + 8 * i, dt), acc[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        __m256 acc = _mm256_loadu_ps(o + d0);
        for (int j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), ld8h(v + (size_t)j * ldv + d0, dt), acc);
        _mm256_storeu_ps(o + d0, acc);
    }
    for (; d0 < hd; d0++)
        for (int j = 0; j < n; j++)
            o[d0] += p[j] * cvlm_cpu_kv_get(v, (size_t)j * ldv + d0, dt);
}

AVX2H static void pv16(float *o, const float *p, const uint16_t *v, int ldv, int n, int hd,
                       enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F16)
        pv_h(o, p, v, ldv, n, hd, CVLM_DTYPE_F16);
    else
        pv_h(o, p, v, ldv, n, hd, CVLM_DTYPE_BF16);
}

AVX2H static void widen(float *dst, const void *src, int n, enum cvlm_dtype dt)
{
    int i = 0;
    if (dt == CVLM_DTYPE_F16)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, ld8h((const uint16_t *)src + i, CVLM_DTYPE_F16));
    else if (dt == CVLM_DTYPE_BF16)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, ld8h((const uint16_t *)src + i, CVLM_DTYPE_BF16));
    if (dt == CVLM_DTYPE_F32)
        memcpy(dst, src, (size_t)n * sizeof(float));
    else if (i < n)
        cvlm_cpu_widen_scalar(dst + i, (const uint16_t *)src + i, n - i, dt);
}

/* F16 by vcvtps2ph (round to nearest even, as cvlm_f32_to_f16); BF16 and tails scalar */
AVX2H static void narrow(void *dst, const float *src, int n, enum cvlm_dtype dt)
{
    int i = 0;
    if (dt == CVLM_DTYPE_F16)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (dt == CVLM_DTYPE_F32)
        cvlm_cpu_narrow_scalar(dst, src, n, dt);
    else if (i < n)
        cvlm_cpu_narrow_scalar((uint16_t *)dst + i, src + i, n - i, dt);
}

/* ---- int8 KV cache: codes widened in registers, one scale per (slot, KV head) ---------
 * Also the AVX-512 set's int8 helpers (vec_avx512.c has no int8 path of its own). */

/* 8 int8 codes at p as floats */
INLINE2 __m256 ld8b(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2H void cvlm_cpu_scores8_avx2(float *s, const float *q, const int8_t *k, int ldk,
                                 const float *ks, int lds, int n, int hd, float scale)
{
    scores_k(s, q, k, ldk, n, hd, scale, ks, lds, CVLM_DTYPE_Q8);
}

/* pv_h over codes: row j weighs p[j] * its scale; 64 columns in 8 accumulators, then 8 */
AVX2 void cvlm_cpu_pv8_avx2(float *o, const float *p, const int8_t *v, int ldv, const float *vs,
                            int lds, int n, int hd)
{
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        __m256 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
        for (int j = 0; j < n; j++) {
            __m256 pj = _mm256_set1_ps(p[j] * vs[(size_t)j * lds]);
            const int8_t *vr = v + (size_t)j * ldv + d0;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                acc[i] = _mm256_fmadd_ps(pj, ld8b(vr + 8 * i), acc[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        __m256 acc = _mm256_loadu_ps(o + d0);
        for (int j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j] * vs[(size_t)j * lds]),
                                  ld8b(v + (size_t)j * ldv + d0), acc);
        _mm256_storeu_ps(o + d0, acc);
    }
    for (; d0 < hd; d0++)
        for (int j = 0; j < n; j++)
            o[d0] += p[j] * vs[(size_t)j * lds] * (float)v[(size_t)j * ldv + d0];
}

AVX2 void cvlm_cpu_widen8_avx2(float *dst, const int8_t *src, int n, float scale)
{
    __m256 sc = _mm256_set1_ps(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(ld8b(src + i), sc));
    for (; i < n; i++)
        dst[i] = (float)src[i] * scale;
}

/* The scalar quantizer's bits: max |x| (max_ps(x, m) keeps m over a NaN x, as the scalar
 * compare does), the same division, vcvtps2dq's nearest even; packs saturate to int8. */
AVX2 void cvlm_cpu_narrow8_avx2(int8_t *dst, float *scale, const float *src, int n)
{
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8)
        m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(src + i), abs), m);
    float lanes[8], mx = 0;
    _mm256_storeu_ps(lanes, m);
    for (int l = 0; l < 8; l++)
        mx = lanes[l] > mx ? lanes[l] : mx;
    for (; i < n; i++)
        mx = fabsf(src[i]) > mx ? fabsf(src[i]) : mx;
    float sc = mx / 127.0f;
    *scale = sc;
    if (!(sc > 0)) {
        memset(dst, 0, (size_t)n);
        return;
    }
    __m256 vs = _mm256_set1_ps(sc);
    for (i = 0; i + 8 <= n; i += 8) {
        __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(src + i), vs));
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
        _mm_storel_epi64((__m128i *)(dst + i), _mm_packs_epi16(w, w));
    }
    for (; i < n; i++) {
        float r = nearbyintf(src[i] / sc);
        dst[i] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r == r ? r : 0);
    }
}

AVX2 static void add(float *y, const float *x, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (; i < n; i++)
        y[i] += x[i];
}

const struct cpu_vec_ops cvlm_cpu_vec_avx2 = {gelu,
                                              silu_mul,
                                              exp_sum,
                                              scores,
                                              pv,
                                              add,
                                              cvlm_cpu_transpose_scalar,
                                              scores16,
                                              pv16,
                                              widen,
                                              narrow,
                                              cvlm_cpu_scores8_avx2,
                                              cvlm_cpu_pv8_avx2,
                                              cvlm_cpu_widen8_avx2,
                                              cvlm_cpu_narrow8_avx2};

#endif /* __x86_64__ */
