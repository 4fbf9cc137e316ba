/* backend_cpu.c - the CPU backend: op table, ISA detection, memory, and the element-wise
 * and norm ops.
 *
 * Activations are F32 host memory. Every op is split over the backend's thread pool by
 * rows or chunks. GEMM lives in gemm*.c, attention in attention*.c, the vectorised
 * element-wise helpers in vec_*.c (one file per ISA, chosen once at creation).
 */
#include "kernels/cpu/cpu.h"

#include "engine/error.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE ((size_t)2 << 20)

/* 64-byte aligned memory; large blocks are 2 MiB aligned and asked to be backed by
 * transparent huge pages (weights and activations are streamed: fewer TLB misses). */
static void *big_alloc(size_t bytes)
{
    if (bytes < 2 * HUGE_PAGE)
        return aligned_alloc(64, (bytes + 63) / 64 * 64);
    bytes = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
    void *p = aligned_alloc(HUGE_PAGE, bytes);
#if defined(MADV_HUGEPAGE)
    if (p)
        madvise(p, bytes, MADV_HUGEPAGE); /* a hint: failure changes nothing */
#endif
    return p;
}

float *cvlm_cpu_scratch(struct cpu_backend *cb, size_t n)
{
    if (n > cb->scratch_cap) {
        float *p = big_alloc(n * sizeof(float));
        if (!p)
            return NULL;
        free(cb->scratch);
        cb->scratch = p;
        cb->scratch_cap = n;
    }
    return cb->scratch;
}

static void *cpu_alloc(struct cvlm_backend *be, size_t bytes)
{
    (void)be;
    return big_alloc(bytes + 64);
}

static void cpu_free(struct cvlm_backend *be, void *p)
{
    (void)be;
    free(p);
}

static void cpu_to_host(struct cvlm_backend *be, float *dst, const void *src, size_t n)
{
    (void)be;
    memcpy(dst, src, n * sizeof(float));
}

static void cpu_from_host(struct cvlm_backend *be, void *dst, const float *src, size_t n)
{
    (void)be;
    memcpy(dst, src, n * sizeof(float));
}

static void cpu_copy_rows(struct cvlm_backend *be, void *dst, const void *src, const int32_t *rows,
                          int n, int width)
{
    (void)be;
    for (int i = 0; i < n; i++)
        memcpy((float *)dst + (size_t)i * width, (const float *)src + (size_t)rows[i] * width,
               (size_t)width * sizeof(float));
}

static void cpu_embed(struct cvlm_backend *be, void *out, const struct cvlm_tensor *table,
                      const int32_t *ids, int M, int D)
{
    (void)be;
    for (int i = 0; i < M; i++)
        cvlm_cpu_widen(table, ids[i], D, (float *)out + (size_t)i * D);
}

/* ---- row-parallel helpers ----------------------------------------------------------- */

struct norm_job {
    float *y;
    const float *x;
    const struct cvlm_tensor *w, *b;
    int M, D;
    float eps;
    float *wf, *bf; /* widened weight/bias */
    float *acc;     /* add_rmsnorm: the residual x, updated in place (x == acc) */
    const float *r; /* add_rmsnorm: what is added to it first */
};

static void rms_task(void *ctx, int i, int thread)
{
    struct norm_job *j = ctx;
    const float *x = j->x + (size_t)i * j->D;
    float *y = j->y + (size_t)i * j->D;
    double ss = 0; /* double accumulation: D can be 4096+, keep the mean exact to float */
    (void)thread;
    for (int d = 0; d < j->D; d++)
        ss += (double)x[d] * x[d];
    float r = 1.0f / sqrtf((float)(ss / j->D) + j->eps);
    for (int d = 0; d < j->D; d++)
        y[d] = x[d] * r * j->wf[d];
}

/* x += r, then the RMS norm of the row: each row is finished (added) before it is read
 * for the norm, so y may alias r. */
static void add_rms_task(void *ctx, int i, int thread)
{
    struct norm_job *j = ctx;
    float *x = j->acc + (size_t)i * j->D;
    const float *r = j->r + (size_t)i * j->D;
    for (int d = 0; d < j->D; d++)
        x[d] += r[d];
    rms_task(ctx, i, thread);
}

static void ln_task(void *ctx, int i, int thread)
{
    struct norm_job *j = ctx;
    const float *x = j->x + (size_t)i * j->D;
    float *y = j->y + (size_t)i * j->D;
    double s = 0, ss = 0;
    (void)thread;
    for (int d = 0; d < j->D; d++)
        s += x[d];
    float mean = (float)(s / j->D);
    for (int d = 0; d < j->D; d++)
        ss += (double)(x[d] - mean) * (x[d] - mean);
    float r = 1.0f / sqrtf((float)(ss / j->D) + j->eps);
    for (int d = 0; d < j->D; d++)
        y[d] = (x[d] - mean) * r * j->wf[d] + j->bf[d];
}

/* Widens the norm's weight and bias once into scratch, then runs one task per row. */
static void run_norm(struct cvlm_backend *be, struct norm_job *j, cvlm_pool_fn fn)
{
    float *wf = cvlm_cpu_scratch(cpu_of(be), (size_t)j->D * 2);
    if (!wf) /* cannot happen for sane D after the first GEMM grew the scratch */
        return;
    j->wf = wf;
    j->bf = wf + j->D;
    cvlm_cpu_widen(j->w, 0, j->D, j->wf);
    if (j->b)
        cvlm_cpu_widen(j->b, 0, j->D, j->bf);
    cvlm_pool_run(cpu_of(be)->pool, j->M, fn, j);
}

static void cpu_rmsnorm(struct cvlm_backend *be, void *y, const void *x,
                        const struct cvlm_tensor *w, int M, int D, float eps)
{
    struct norm_job j = {y, x, w, NULL, M, D, eps, NULL, NULL, NULL, NULL};
    run_norm(be, &j, rms_task);
}

static void cpu_add_rmsnorm(struct cvlm_backend *be, void *y, void *x, const void *r,
                            const struct cvlm_tensor *w, int M, int D, float eps)
{
    struct norm_job j = {y, x, w, NULL, M, D, eps, NULL, NULL, x, r};
    run_norm(be, &j, add_rms_task);
}

static void cpu_layernorm(struct cvlm_backend *be, void *y, const void *x,
                          const struct cvlm_tensor *w, const struct cvlm_tensor *b, int M, int D,
                          float eps)
{
    struct norm_job j = {y, x, w, b, M, D, eps, NULL, NULL, NULL, NULL};
    run_norm(be, &j, ln_task);
}

/* ---- element-wise ops ---------------------------------------------------------------- */

struct ew_job {
    float *y;
    const float *x, *x2;
    size_t n, chunk;
    int M, N, stride;
    const struct cpu_vec_ops *vec;
};

#define EW_CHUNK 16384

static void add_task(void *ctx, int t, int thread)
{
    struct ew_job *j = ctx;
    size_t a = (size_t)t * j->chunk, b = a + j->chunk < j->n ? a + j->chunk : j->n;
    (void)thread;
    j->vec->add(j->y + a, j->x + a, b - a);
}

static void cpu_add(struct cvlm_backend *be, void *y, const void *x, size_t n)
{
    struct ew_job j = {.y = y, .x = x, .n = n, .chunk = EW_CHUNK, .vec = cpu_of(be)->vec};
    cvlm_pool_run(cpu_of(be)->pool, (int)((n + EW_CHUNK - 1) / EW_CHUNK), add_task, &j);
}

static void cpu_add_row(struct cvlm_backend *be, void *y, const struct cvlm_tensor *b, int M, int D)
{
    float *bf = cvlm_cpu_scratch(cpu_of(be), (size_t)D);
    if (!bf)
        return;
    cvlm_cpu_widen(b, 0, D, bf);
    for (int i = 0; i < M; i++)
        for (int d = 0; d < D; d++)
            ((float *)y)[(size_t)i * D + d] += bf[d];
}

static void gelu_task(void *ctx, int t, int thread)
{
    struct ew_job *j = ctx;
    size_t a = (size_t)t * j->chunk, b = a + j->chunk < j->n ? a + j->chunk : j->n;
    (void)thread;
    j->vec->gelu(j->y + a, b - a);
}

static void cpu_gelu(struct cvlm_backend *be, void *x, size_t n)
{
    struct ew_job j = {.y = x, .n = n, .chunk = EW_CHUNK, .vec = cpu_of(be)->vec};
    cvlm_pool_run(cpu_of(be)->pool, (int)((n + EW_CHUNK - 1) / EW_CHUNK), gelu_task, &j);
}

static void silu_task(void *ctx, int i, int thread)
{
    struct ew_job *j = ctx;
    const float *g = j->x + (size_t)i * j->stride, *u = j->x2 + (size_t)i * j->stride;
    float *o = j->y + (size_t)i * j->N;
    (void)thread;
    j->vec->silu_mul(o, g, u, j->N);
}

static void cpu_silu_mul(struct cvlm_backend *be, void *out, const void *gate, const void *up,
                         int g_stride, int M, int N)
{
    struct ew_job j = {
        .y = out, .x = gate, .x2 = up, .M = M, .N = N, .stride = g_stride, .vec = cpu_of(be)->vec};
    cvlm_pool_run(cpu_of(be)->pool, M, silu_task, &j);
}

struct rope_job {
    float *x;
    int stride, n_heads, head_dim;
    const int32_t *pos;
    const float *inv_freq;
};

static void rope_task(void *ctx, int i, int thread)
{
    struct rope_job *j = ctx;
    float *row = j->x + (size_t)i * j->stride;
    int half = j->head_dim / 2;
    (void)thread;
    for (int k = 0; k < half; k++) {
        float ang = (float)j->pos[i] * j->inv_freq[k];
        float c = cosf(ang), s = sinf(ang);
        for (int h = 0; h < j->n_heads; h++) {
            float *v = row + (size_t)h * j->head_dim;
            float a = v[k], b = v[k + half];
            v[k] = a * c - b * s;
            v[k + half] = b * c + a * s;
        }
    }
}

static void cpu_rope(struct cvlm_backend *be, void *x, int stride, const int32_t *pos, int M,
                     int n_heads, int head_dim, const float *inv_freq)
{
    struct rope_job j = {x, stride, n_heads, head_dim, pos, inv_freq};
    cvlm_pool_run(cpu_of(be)->pool, M, rope_task, &j);
}

static void cpu_patchify(struct cvlm_backend *be, void *out, const float *px, int C, int H, int W,
                         int P)
{
    int gw = W / P, gh = H / P, row = C * P * P;
    (void)be;
    for (int py = 0; py < gh; py++)
        for (int pxi = 0; pxi < gw; pxi++) {
            float *o = (float *)out + ((size_t)py * gw + pxi) * row;
            for (int c = 0; c < C; c++)
                for (int ky = 0; ky < P; ky++)
                    memcpy(o + ((size_t)c * P + ky) * P,
                           px + ((size_t)c * H + (size_t)py * P + ky) * W + (size_t)pxi * P,
                           (size_t)P * sizeof(float));
        }
}

/* ---- weights -------------------------------------------------------------------------- */

/* A value of a generated tensor: a counter-based hash of (seed, tensor, element), so any
 * element is computed independently (as a device backend does it in parallel). */
static float fill_value(enum cvlm_fill fill, uint64_t key, size_t i)
{
    if (fill != CVLM_FILL_RANDOM)
        return fill == CVLM_FILL_ONES ? 1.0f : 0.0f;
    uint64_t z = key + (uint64_t)i * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    /* uniform [-a, a) with a = 0.02 * sqrt(3): standard deviation 0.02 */
    return ((float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f) * 0.034641016f;
}

/* IEEE half of a generated value (|v| < 1 or exactly 1): normals rounded to nearest,
 * magnitudes below the smallest normal half flushed to zero. */
static uint16_t f16_small(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    int e = (int)((u >> 23) & 0xffu) - 127 + 15;
    if (e <= 0)
        return sign;
    uint32_t h = ((uint32_t)e << 10) | ((u & 0x7fffffu) >> 13);
    h += (u >> 12) & 1u; /* round half up: a carry into the exponent is still correct */
    return (uint16_t)(sign | h);
}

static void fill_tensor(struct cvlm_tensor *t, void *dst, uint64_t key)
{
    size_t n = (size_t)cvlm_tensor_numel(t);
    for (size_t i = 0; i < n; i++) {
        float v = fill_value(t->fill, key, i);
        if (t->dtype == CVLM_DTYPE_F32)
            ((float *)dst)[i] = v;
        else if (t->dtype == CVLM_DTYPE_BF16)
            ((uint16_t *)dst)[i] = cvlm_f32_to_bf16(v);
        else /* F16: the values are small and normal; truncating the mantissa is enough */
            ((uint16_t *)dst)[i] = f16_small(v);
    }
    t->data = dst;
}

/* Host memory is this backend's memory: tensors with data stay where they are (the mmap);
 * tensors to generate get one buffer for all of them. */
static int cpu_upload_weights(struct cvlm_backend *be, struct cvlm_tensor *const *ts, int n,
                              uint64_t seed)
{
    struct cpu_backend *cb = cpu_of(be);
    size_t bytes = 0, at = 0;
    for (int i = 0; i < n; i++)
        if (!ts[i]->data && ts[i]->fill != CVLM_FILL_NONE)
            bytes += ((size_t)cvlm_tensor_numel(ts[i]) * cvlm_dtype_size(ts[i]->dtype) + 63) &
                     ~(size_t)63;
    if (!bytes)
        return 0;
    if (cb->weights)
        return cvlm_errf(CVLM_ESTATE, "the CPU backend generates one set of weights");
    if (!(cb->weights = big_alloc(bytes)))
        return cvlm_errf(CVLM_ENOMEM, "out of memory for %zu bytes of weights", bytes);
    for (int i = 0; i < n; i++) {
        struct cvlm_tensor *t = ts[i];
        if (t->data || t->fill == CVLM_FILL_NONE)
            continue;
        fill_tensor(t, (char *)cb->weights + at, seed * 0x100000001b3ull + (uint64_t)i);
        at += ((size_t)cvlm_tensor_numel(t) * cvlm_dtype_size(t->dtype) + 63) & ~(size_t)63;
    }
    return 0;
}

static int cpu_status(struct cvlm_backend *be)
{
    (void)be;
    return 0; /* every op completes before it returns and cannot fail */
}

static void cpu_destroy(struct cvlm_backend *be)
{
    struct cpu_backend *cb = cpu_of(be);
    if (!cb)
        return;
    cvlm_pool_destroy(cb->pool);
    free(cb->scratch);
    free(cb->weights);
    free(cb);
}

static const struct cvlm_backend_i cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .to_host = cpu_to_host,
    .from_host = cpu_from_host,
    .copy_rows = cpu_copy_rows,
    .gemm = cvlm_cpu_gemm,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .layernorm = cpu_layernorm,
    .add = cpu_add,
    .add_rmsnorm = cpu_add_rmsnorm,
    .add_row = cpu_add_row,
    .gelu = cpu_gelu,
    .silu_mul = cpu_silu_mul,
    .rope = cpu_rope,
    .attention_full = cvlm_cpu_attention_full,
    .kv_write = cvlm_cpu_kv_write,
    .attention_paged = cvlm_cpu_attention_paged,
    .patchify = cpu_patchify,
    .upload_weights = cpu_upload_weights,
    .status = cpu_status,
    .destroy = cpu_destroy,
};

const char *cvlm_cpu_isa_name(enum cpu_isa isa)
{
    static const char *const names[] = {"scalar", "avx2", "avx512", "avx512bf16"};
    return names[isa];
}

#if defined(__x86_64__)
/* CPUID leaf 1, ECX bit 29 (not every compiler's __builtin_cpu_supports knows "f16c") */
static int has_f16c(void)
{
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

enum cpu_isa cvlm_cpu_detect_isa(void)
{
    enum cpu_isa isa = CPU_ISA_SCALAR;
    const char *env = getenv("COGVLM_CPU_ISA");
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c()) {
        isa = CPU_ISA_AVX2;
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
            isa = CPU_ISA_AVX512;
        if (isa == CPU_ISA_AVX512 && __builtin_cpu_supports("avx512bf16"))
            isa = CPU_ISA_AVX512BF16;
    }
#endif
    /* a forced path may only lower the choice: never run code the CPU lacks */
    for (int i = CPU_ISA_SCALAR; env && i < (int)isa; i++)
        if (!strcmp(env, cvlm_cpu_isa_name((enum cpu_isa)i)))
            isa = (enum cpu_isa)i;
    return isa;
}

struct cvlm_backend *cvlm_backend_cpu_create(int n_threads)
{
    struct cpu_backend *cb = calloc(1, sizeof(*cb));
    if (!cb)
        return NULL;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    cb->pool = cvlm_pool_create(n_threads);
    if (!cb->pool) {
        free(cb);
        return NULL;
    }
    cb->base.ops = &cpu_ops;
    cb->base.act_dtype = CVLM_DTYPE_F32;
    cb->base.n_threads = cvlm_pool_size(cb->pool);
    cb->isa = cvlm_cpu_detect_isa();
    cb->has_avx2 = cb->isa >= CPU_ISA_AVX2;
    cb->has_avx512 = cb->isa >= CPU_ISA_AVX512;
#if defined(__x86_64__)
    cb->has_vnni = cb->has_avx512 && __builtin_cpu_supports("avx512vnni");
#endif
    cb->vec = cvlm_cpu_vec_ops(cb->isa);
    return &cb->base;
}
