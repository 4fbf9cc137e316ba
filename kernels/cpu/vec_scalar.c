/* vec_scalar.c - portable element-wise and attention helpers (struct cpu_vec_ops), and
 * the choice of a helper set by instruction set.
 *
 * These use libm (erff, expf) and plain loops; they are the reference behaviour the
 * vectorised sets (vec_avx2.c, vec_avx512.c) approximate to a few ulp.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <string.h>

static void gelu(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

static void silu_mul(float *o, const float *g, const float *u, int n)
{
    for (int i = 0; i < n; i++)
        o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static float exp_sum(float *p, int n, float mx)
{
    float sum = 0;
    for (int j = 0; j < n; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    return sum;
}

static float dotf(const float *a, const float *b, int n)
{
    float acc[4] = {0, 0, 0, 0};
    int i = 0;
    for (; i + 4 <= n; i += 4)
        for (int l = 0; l < 4; l++)
            acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++)
        acc[0] += a[i] * b[i];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

static void scores(float *s, const float *q, const float *k, int ldk, int n, int hd, float scale)
{
    for (int j = 0; j < n; j++)
        s[j] = dotf(q, k + (size_t)j * ldk, hd) * scale;
}

static void pv(float *o, const float *p, const float *v, int ldv, int n, int hd)
{
    for (int j = 0; j < n; j++) {
        const float *vj = v + (size_t)j * ldv;
        for (int d = 0; d < hd; d++)
            o[d] += p[j] * vj[d];
    }
}

/* The same sums as dotf / pv with k and v widened element by element. */
static float dot16(const float *a, const uint16_t *b, int n, enum cvlm_dtype dt)
{
    float acc[4] = {0, 0, 0, 0};
    int i = 0;
    for (; i + 4 <= n; i += 4)
        for (int l = 0; l < 4; l++)
            acc[l] += a[i + l] * cvlm_cpu_kv_get(b, (size_t)(i + l), dt);
    for (; i < n; i++)
        acc[0] += a[i] * cvlm_cpu_kv_get(b, (size_t)i, dt);
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

static void scores16(float *s, const float *q, const uint16_t *k, int ldk, int n, int hd,
                     float scale, enum cvlm_dtype dt)
{
    for (int j = 0; j < n; j++)
        s[j] = dot16(q, k + (size_t)j * ldk, hd, dt) * scale;
}

static void pv16(float *o, const float *p, const uint16_t *v, int ldv, int n, int hd,
                 enum cvlm_dtype dt)
{
    for (int j = 0; j < n; j++) {
        const uint16_t *vj = v + (size_t)j * ldv;
        for (int d = 0; d < hd; d++)
            o[d] += p[j] * cvlm_cpu_kv_get(vj, (size_t)d, dt);
    }
}

void cvlm_cpu_widen_scalar(float *dst, const void *src, int n, enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    for (int i = 0; i < n; i++)
        dst[i] = cvlm_cpu_kv_get(src, (size_t)i, dt);
}

void cvlm_cpu_narrow_scalar(void *dst, const float *src, int n, enum cvlm_dtype dt)
{
    uint16_t *h = dst;
    if (dt == CVLM_DTYPE_F32)
        memcpy(dst, src, (size_t)n * sizeof(float));
    else if (dt == CVLM_DTYPE_F16)
        for (int i = 0; i < n; i++)
            h[i] = cvlm_f32_to_f16(src[i]);
    else
        for (int i = 0; i < n; i++)
            h[i] = cvlm_f32_to_bf16(src[i]);
}

/* int8 KV: the sums of dot16 / pv16 over the codes, each row's scale applied once */
static void scores8(float *s, const float *q, const int8_t *k, int ldk, const float *ks, int lds,
                    int n, int hd, float scale)
{
    for (int j = 0; j < n; j++) {
        const int8_t *kj = k + (size_t)j * ldk;
        float acc[4] = {0, 0, 0, 0};
        int i = 0;
        for (; i + 4 <= hd; i += 4)
            for (int l = 0; l < 4; l++)
                acc[l] += q[i + l] * (float)kj[i + l];
        for (; i < hd; i++)
            acc[0] += q[i] * (float)kj[i];
        s[j] = ((acc[0] + acc[2]) + (acc[1] + acc[3])) * (ks[(size_t)j * lds] * scale);
    }
}

static void pv8(float *o, const float *p, const int8_t *v, int ldv, const float *vs, int lds, int n,
                int hd)
{
    for (int j = 0; j < n; j++) {
        const int8_t *vj = v + (size_t)j * ldv;
        float w = p[j] * vs[(size_t)j * lds];
        for (int d = 0; d < hd; d++)
            o[d] += w * (float)vj[d];
    }
}

static void widen8(float *dst, const int8_t *src, int n, float scale)
{
    for (int i = 0; i < n; i++)
        dst[i] = (float)src[i] * scale;
}

void cvlm_cpu_narrow8_scalar(int8_t *dst, float *scale, const float *src, int n)
{
    float mx = 0;
    for (int i = 0; i < n; i++)
        mx = fabsf(src[i]) > mx ? fabsf(src[i]) : mx;
    float sc = mx / 127.0f;
    *scale = sc;
    for (int i = 0; i < n; i++) {
        float r = sc > 0 ? nearbyintf(src[i] / sc) : 0.0f; /* to nearest even */
        dst[i] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r == r ? r : 0); /* NaN: 0 */
    }
}

static void add(float *y, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] += x[i];
}

void cvlm_cpu_transpose_scalar(float *dst, int ldd, const float *src, int lds, int rows, int cols)
{
    for (int c = 0; c < cols; c++)
        for (int r = 0; r < rows; r++)
            dst[(size_t)c * ldd + r] = src[(size_t)r * lds + c];
}

const struct cpu_vec_ops cvlm_cpu_vec_scalar = {gelu,
                                                silu_mul,
                                                exp_sum,
                                                scores,
                                                pv,
                                                add,
                                                cvlm_cpu_transpose_scalar,
                                                scores16,
                                                pv16,
                                                cvlm_cpu_widen_scalar,
                                                cvlm_cpu_narrow_scalar,
                                                scores8,
                                                pv8,
                                                widen8,
                                                cvlm_cpu_narrow8_scalar};

const struct cpu_vec_ops *cvlm_cpu_vec_ops(enum cpu_isa isa)
{
#if defined(__x86_64__)
    if (isa >= CPU_ISA_AVX512)
        return &cvlm_cpu_vec_avx512;
    if (isa >= CPU_ISA_AVX2)
        return &cvlm_cpu_vec_avx2;
#else
    (void)isa;
#endif
    return &cvlm_cpu_vec_scalar;
}
