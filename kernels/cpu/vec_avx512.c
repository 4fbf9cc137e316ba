/* vec_avx512.c - AVX-512 element-wise and attention helpers (struct cpu_vec_ops).
 *
 * exp: range reduction x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two parts), a degree-7
 * Taylor polynomial (truncation < 1e-8 relative), then scalef by 2^n: within 2 ulp.
 * erf (for GELU): Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7 absolute, the same
 * approximation PyTorch's vectorised CPU GELU uses. Tails use masked loads and stores.
 * Only reached when the backend detected AVX-512 F/BW/VL/DQ.
 */
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/simd.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define INLINE512 \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

static inline __mmask16 tail_mask(int n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

INLINE512 __m512 exp16(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

INLINE512 __m512 gelu16(__m512 x)
{
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 a = _mm512_andnot_ps(sign, _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                             _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a));
    __m512 erf = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f)); /* erf(|x| / sqrt 2) */
    erf = _mm512_or_ps(erf, _mm512_and_ps(x, sign));           /* odd function */
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                         _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

AVX512 static void gelu(float *x, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, gelu16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = tail_mask((int)(n - i));
        _mm512_mask_storeu_ps(x + i, m, gelu16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

INLINE512 __m512 silu_mul16(__m512 g, __m512 u)
{
    __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

AVX512 static void silu_mul(float *o, const float *g, const float *u, int n)
{
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, silu_mul16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
    if (i < n) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(
            o + i, m, silu_mul16(_mm512_maskz_loadu_ps(m, g + i), _mm512_maskz_loadu_ps(m, u + i)));
    }
}

AVX512 static float exp_sum(float *p, int n, float mx)
{
    __m512 s = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx);
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), vm));
        _mm512_storeu_ps(p + j, e);
        s = _mm512_add_ps(s, e);
    }
    if (j < n) {
        __mmask16 m = tail_mask(n - j);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + j), vm));
        _mm512_mask_storeu_ps(p + j, m, e);
        s = _mm512_mask_add_ps(s, m, s, e);
    }
    return _mm512_reduce_add_ps(s);
}

/* 16 elements at p + d: a plain load for whole chunks (masked loads cost more on some
 * cores), a masked one for the tail. */
INLINE512 __m512 ld(const float *p, int d, int n)
{
    return d + 16 <= n ? _mm512_loadu_ps(p + d) : _mm512_maskz_loadu_ps(tail_mask(n - d), p + d);
}

/* Four keys at a time (independent FMA chains), the last < 4 one by one. */
AVX512 static void scores(float *s, const float *q, const float *k, int ldk, int n, int hd,
                          float scale)
{
    const __m128 vs = _mm_set1_ps(scale);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + (size_t)j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < hd; d += 16) {
            __m512 qv = ld(q, d, hd);
            a0 = _mm512_fmadd_ps(qv, ld(k0, d, hd), a0);
            a1 = _mm512_fmadd_ps(qv, ld(k1, d, hd), a1);
            a2 = _mm512_fmadd_ps(qv, ld(k2, d, hd), a2);
            a3 = _mm512_fmadd_ps(qv, ld(k3, d, hd), a3);
        }
        _mm_storeu_ps(s + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), vs));
    }
    for (; j < n; j++) {
        const float *kj = k + (size_t)j * ldk;
        __m512 a = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 16)
            a = _mm512_fmadd_ps(ld(q, d, hd), ld(kj, d, hd), a);
        s[j] = _mm512_reduce_add_ps(a) * scale;
    }
}

/* Up to 128 output columns stay in 8 accumulators while all n value rows stream by. */
AVX512 static void pv(float *o, const float *p, const float *v, int ldv, int n, int hd)
{
    for (int d0 = 0; d0 < hd; d0 += 128) {
        int w = hd - d0 < 128 ? hd - d0 : 128, nv = (w + 15) / 16;
        __m512 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            acc[i] = _mm512_setzero_ps();
        for (int j = 0; j < n; j++) {
            __m512 pj = _mm512_set1_ps(p[j]);
            const float *vr = v + (size_t)j * ldv + d0;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < nv)
                    acc[i] = _mm512_fmadd_ps(pj, ld(vr, 16 * i, w), acc[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            if (i < nv) {
                __mmask16 m = tail_mask(w - 16 * i);
                float *od = o + d0 + 16 * i;
                _mm512_mask_storeu_ps(od, m, _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(m, od)));
            }
    }
}

/* ---- 16-bit KV cache: keys and values widened in registers ------------------------- */

/* 16 F16 / BF16 elements at p + d as floats (masked past n, like ld). */
INLINE512 __m512 ldh(const uint16_t *p, int d, int n, enum cvlm_dtype dt)
{
    __m256i h = d + 16 <= n ? _mm256_loadu_si256((const __m256i *)(p + d))
                            : _mm256_maskz_loadu_epi16(tail_mask(n - d), p + d);
    return dt == CVLM_DTYPE_F16
               ? _mm512_cvtph_ps(h)
               : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* scores with the keys widened: four keys at a time, the last < 4 one by one */
INLINE512 void scores_h(float *s, const float *q, const uint16_t *k, int ldk, int n, int hd,
                        float scale, enum cvlm_dtype dt)
{
    const __m128 vs = _mm_set1_ps(scale);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const uint16_t *k0 = k + (size_t)j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < hd; d += 16) {
            __m512 qv = ld(q, d, hd);
            a0 = _mm512_fmadd_ps(qv, ldh(k0, d, hd, dt), a0);
            a1 = _mm512_fmadd_ps(qv, ldh(k1, d, hd, dt), a1);
            a2 = _mm512_fmadd_ps(qv, ldh(k2, d, hd, dt), a2);
            a3 = _mm512_fmadd_ps(qv, ldh(k3, d, hd, dt), a3);
        }
        _mm_storeu_ps(s + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), vs));
    }
    for (; j < n; j++) {
        const uint16_t *kj = k + (size_t)j * ldk;
        __m512 a = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 16)
            a = _mm512_fmadd_ps(ld(q, d, hd), ldh(kj, d, hd, dt), a);
        s[j] = _mm512_reduce_add_ps(a) * scale;
    }
}

AVX512 static void scores16(float *s, const float *q, const uint16_t *k, int ldk, int n, int hd,
                            float scale, enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F16)
        scores_h(s, q, k, ldk, n, hd, scale, CVLM_DTYPE_F16);
    else
        scores_h(s, q, k, ldk, n, hd, scale, CVLM_DTYPE_BF16);
}

/* pv with the value rows widened: up to 128 output columns in 8 accumulators */
INLINE512 void pv_h(float *o, const float *p, const uint16_t *v, int ldv, int n, int hd,
                    enum cvlm_dtype dt)
{
    for (int d0 = 0; d0 < hd; d0 += 128) {
        int w = hd - d0 < 128 ? hd - d0 : 128, nv = (w + 15) / 16;
        __m512 acc[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            acc[i] = _mm512_setzero_ps();
        for (int j = 0; j < n; j++) {
            __m512 pj = _mm512_set1_ps(p[j]);
            const uint16_t *vr = v + (size_t)j * ldv + d0;
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                if (i < nv)
                    acc[i] = _mm512_fmadd_ps(pj, ldh(vr, 16 * i, w, dt), acc[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            if (i < nv) {
                __mmask16 m = tail_mask(w - 16 * i);
                float *od = o + d0 + 16 * i;
                _mm512_mask_storeu_ps(od, m, _mm512_add_ps(acc[i], _mm512_maskz_loadu_ps(m, od)));
            }
    }
}

AVX512 static void pv16(float *o, const float *p, const uint16_t *v, int ldv, int n, int hd,
                        enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F16)
        pv_h(o, p, v, ldv, n, hd, CVLM_DTYPE_F16);
    else
        pv_h(o, p, v, ldv, n, hd, CVLM_DTYPE_BF16);
}

AVX512 static void widen(float *dst, const void *src, int n, enum cvlm_dtype dt)
{
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 x = dt == CVLM_DTYPE_F32   ? ld((const float *)src, i, n)
                   : dt == CVLM_DTYPE_F16 ? ldh(src, i, n, CVLM_DTYPE_F16)
                                          : ldh(src, i, n, CVLM_DTYPE_BF16);
        _mm512_mask_storeu_ps(dst + i, m, x);
    }
}

/* F16 by vcvtps2ph (round to nearest even, as cvlm_f32_to_f16); BF16 and tails scalar */
AVX512 static void narrow(void *dst, const float *src, int n, enum cvlm_dtype dt)
{
    int i = 0;
    if (dt == CVLM_DTYPE_F16)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (dt == CVLM_DTYPE_F32)
        cvlm_cpu_narrow_scalar(dst, src, n, dt);
    else if (i < n)
        cvlm_cpu_narrow_scalar((uint16_t *)dst + i, src + i, n - i, dt);
}

AVX512 static void add(float *y, const float *x, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = tail_mask((int)(n - i));
        _mm512_mask_storeu_ps(
            y + i, m,
            _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* 16-column slabs: rows loaded (masked), transposed in registers, rows-wide stores. */
AVX512 static void transpose(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    __mmask16 rm = tail_mask(rows);
    __m512 r[16];
    for (int c0 = 0; c0 < cols; c0 += 16) {
        __mmask16 cm = tail_mask(cols - c0);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++)
            r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + (size_t)i * lds + c0)
                            : _mm512_setzero_ps();
        transpose16(r);
#pragma GCC unroll 16
        for (int c = 0; c < 16; c++)
            if (c0 + c < cols)
                _mm512_mask_storeu_ps(dst + (size_t)(c0 + c) * ldd, rm, r[c]);
    }
}

const struct cpu_vec_ops cvlm_cpu_vec_avx512 = {
    gelu, silu_mul, exp_sum, scores, pv, add, transpose, scores16, pv16, widen, narrow,
    /* int8 KV: the AVX2 helpers (vec_avx2.c) */
    cvlm_cpu_scores8_avx2, cvlm_cpu_pv8_avx2, cvlm_cpu_widen8_avx2, cvlm_cpu_narrow8_avx2};

#endif /* __x86_64__ */
