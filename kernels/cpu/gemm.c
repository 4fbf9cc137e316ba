/* gemm.c - y = x . W^T (+ b) for F32 activations and F32/F16/BF16 weights: the driver
 * (blocking, threading, kernel choice) and the portable scalar kernels.
 *
 * Two regimes:
 * - Few rows of x (decode, M <= GEMV_MAX_M): weight-bandwidth bound. Threads own
 *   disjoint ranges of W rows; a matrix-vector kernel streams each W row once, widening
 *   in registers, and serves up to GEMV_MMAX rows of x per pass (more rows: another pass,
 *   the W rows then come from cache).
 * - Many rows (prefill, the ViT): compute bound. Blocked like a classic packed GEMM:
 *   for each slice of KC columns of K, x is packed once into MR-row micro-panels (shared
 *   by all threads), then every thread takes blocks of NC output columns, widens and
 *   transposes its W block into NR-column micro-panels (per-thread scratch, reused by
 *   all M rows), and runs the MR x NR register-blocked micro-kernel over it.
 * All accumulation is F32; the k order differs from a naive loop only by blocking.
 */
#include "kernels/cpu/cpu.h"

#include <string.h>

#define GEMV_MAX_M 8 /* above this, the packed GEMM wins */
#ifndef GEMM_MC
#define GEMM_MC 192 /* rows of x per pass over a thread's W block (L2), multiple of MR */
#endif
#ifndef GEMM_NC
#define GEMM_NC 256 /* max output columns per task */
#endif

/* ---- scalar kernels -------------------------------------------------------------------- */

void cvlm_cpu_widen(const struct cvlm_tensor *w, int64_t row, int64_t n, float *out)
{
    const int64_t off = row * n; /* rows are n elements long */
    if (w->dtype == CVLM_DTYPE_F32) {
        memcpy(out, (const float *)w->data + off, (size_t)n * 4);
    } else if (w->dtype == CVLM_DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)w->data + off;
        for (int64_t i = 0; i < n; i++)
            out[i] = cvlm_bf16_to_f32(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)w->data + off;
        for (int64_t i = 0; i < n; i++)
            out[i] = cvlm_f16_to_f32(s[i]);
    }
}

/* Widens n elements of W starting at element `off` (scalar paths only). */
static void widen_at(const struct cvlm_tensor *w, size_t off, int n, float *out)
{
    const uint16_t *s = (const uint16_t *)w->data + off;
    if (w->dtype == CVLM_DTYPE_F32)
        memcpy(out, (const float *)w->data + off, (size_t)n * sizeof(float));
    else if (w->dtype == CVLM_DTYPE_BF16)
        for (int i = 0; i < n; i++)
            out[i] = cvlm_bf16_to_f32(s[i]);
    else
        for (int i = 0; i < n; i++)
            out[i] = cvlm_f16_to_f32(s[i]);
}

void cvlm_cpu_gemv_scalar(float *y, int ldy, const float *x, int ldx, int M,
                          const struct cvlm_tensor *w, int n0, int n1, int K)
{
    float wr[256];
    for (int n = n0; n < n1; n++) {
        float acc[GEMV_MMAX][8] = {{0}};
        for (int k0 = 0; k0 < K; k0 += 256) {
            int kc = K - k0 < 256 ? K - k0 : 256;
            widen_at(w, (size_t)n * K + k0, kc, wr);
            for (int m = 0; m < M; m++) {
                const float *xr = x + (size_t)m * ldx + k0;
                for (int k = 0; k < kc; k++)
                    acc[m][k & 7] += xr[k] * wr[k];
            }
        }
        for (int m = 0; m < M; m++) {
            float *a = acc[m];
            y[(size_t)m * ldy + n] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
    }
}

void cvlm_cpu_pack_b_scalar(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0,
                            int kc, int K)
{
    float wr[GEMM_KC];
    for (int c = 0; c < GEMM_NR; c++) {
        int n = n0 + c;
        if (n < N)
            widen_at(w, (size_t)n * K + k0, kc, wr);
        for (int k = 0; k < kc; k++)
            bp[(size_t)k * GEMM_NR + c] = n < N ? wr[k] : 0.0f;
    }
}

void cvlm_cpu_tile_scalar(const float *ap, const float *bp, int kc, float *c, int ldc, int mr,
                          int nr, int acc)
{
    float t[GEMM_MR][GEMM_NR] = {{0}};
    for (int k = 0; k < kc; k++) {
        const float *a = ap + (size_t)k * GEMM_MR, *b = bp + (size_t)k * GEMM_NR;
        for (int i = 0; i < GEMM_MR; i++)
            for (int j = 0; j < GEMM_NR; j++)
                t[i][j] += a[i] * b[j];
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            c[(size_t)i * ldc + j] = acc ? c[(size_t)i * ldc + j] + t[i][j] : t[i][j];
}

/* ---- driver ----------------------------------------------------------------------------- */

struct cpu_gemm_kernels cvlm_cpu_gemm_kernels(enum cpu_isa isa)
{
    struct cpu_gemm_kernels k = {cvlm_cpu_gemv_scalar, cvlm_cpu_pack_b_scalar,
                                 cvlm_cpu_tile_scalar};
#if defined(__x86_64__)
    if (isa >= CPU_ISA_AVX512)
        k = (struct cpu_gemm_kernels){cvlm_cpu_gemv_avx512, cvlm_cpu_pack_b_avx512,
                                      cvlm_cpu_tile_avx512};
    else if (isa >= CPU_ISA_AVX2)
        k = (struct cpu_gemm_kernels){cvlm_cpu_gemv_avx2, cvlm_cpu_pack_b_avx2,
                                      cvlm_cpu_tile_avx2};
#else
    (void)isa;
#endif
    return k;
}

struct gemm_job {
    float *y;
    const float *x;
    const uint16_t *xs; /* x split into BF16 hi/lo terms (BF16 weights, AVX512_BF16) */
    int x_stride;
    const struct cvlm_tensor *w, *bias;
    int M, N, K;
    struct cpu_gemm_kernels kn;
    int cols_per_task; /* a multiple of 4 (gemv) or GEMM_NR (packed) */
    /* packed path */
    int k0, kc;
    float *ap;          /* [ceil(M/MR)][kc][MR] */
    float *bp;          /* per thread: [NC/NR][kc][NR] */
    size_t bp_stride;   /* floats per thread */
    float *bias_f;      /* widened bias [N] or NULL */
};

static void add_bias(const struct gemm_job *j, int n0, int n1)
{
    if (!j->bias_f)
        return;
    for (int m = 0; m < j->M; m++) {
        float *yr = j->y + (size_t)m * j->N;
        for (int n = n0; n < n1; n++)
            yr[n] += j->bias_f[n];
    }
}

static void gemv_task(void *ctx, int task, int thread)
{
    struct gemm_job *j = ctx;
    int n0 = task * j->cols_per_task, n1 = n0 + j->cols_per_task < j->N ? n0 + j->cols_per_task
                                                                         : j->N;
    (void)thread;
    for (int m = 0; m < j->M; m += GEMV_MMAX) {
        int mc = j->M - m < GEMV_MMAX ? j->M - m : GEMV_MMAX;
#if defined(__x86_64__)
        if (j->xs) {
            cvlm_cpu_gemv_bf16x2_avx512(j->y + (size_t)m * j->N, j->N,
                                        j->xs + (size_t)m * 2 * GEMV_KPAD(j->K), mc, j->w, n0,
                                        n1, j->K);
            continue;
        }
#endif
        j->kn.gemv(j->y + (size_t)m * j->N, j->N, j->x + (size_t)m * j->x_stride, j->x_stride,
                   mc, j->w, n0, n1, j->K);
    }
    add_bias(j, n0, n1);
}

/* Packs rows [m0, m0 + MR) of x's current k slice into ap[k][i] (zero rows past M). */
static void pack_a_task(void *ctx, int mb, int thread)
{
    struct gemm_job *j = ctx;
    float *ap = j->ap + (size_t)mb * j->kc * GEMM_MR;
    int m0 = mb * GEMM_MR;
    (void)thread;
    for (int i = 0; i < GEMM_MR; i++) {
        const float *xr = j->x + (size_t)(m0 + i) * j->x_stride + j->k0;
        if (m0 + i >= j->M) {
            for (int k = 0; k < j->kc; k++)
                ap[(size_t)k * GEMM_MR + i] = 0.0f;
            continue;
        }
        for (int k = 0; k < j->kc; k++)
            ap[(size_t)k * GEMM_MR + i] = xr[k];
    }
}

static void packed_task(void *ctx, int task, int thread)
{
    struct gemm_job *j = ctx;
    int n0 = task * j->cols_per_task;
    int n1 = n0 + j->cols_per_task < j->N ? n0 + j->cols_per_task : j->N;
    int np = (n1 - n0 + GEMM_NR - 1) / GEMM_NR, acc = j->k0 > 0;
    size_t panel = (size_t)j->kc * GEMM_NR;
    float *bp = j->bp + (size_t)thread * j->bp_stride;
    for (int p = 0; p < np; p++)
        j->kn.pack_b(bp + p * panel, j->w, n0 + p * GEMM_NR, n1, j->k0, j->kc, j->K);
    for (int mc = 0; mc < j->M; mc += GEMM_MC) {
        int mc_end = mc + GEMM_MC < j->M ? mc + GEMM_MC : j->M;
        for (int p = 0; p < np; p++) {
            int n = n0 + p * GEMM_NR, nr = n1 - n < GEMM_NR ? n1 - n : GEMM_NR;
            for (int m = mc; m < mc_end; m += GEMM_MR) {
                int mr = mc_end - m < GEMM_MR ? mc_end - m : GEMM_MR;
                j->kn.tile(j->ap + (size_t)(m / GEMM_MR) * j->kc * GEMM_MR, bp + p * panel,
                           j->kc, j->y + (size_t)m * j->N + n, j->N, mr, nr, acc);
            }
        }
    }
    if (j->k0 + j->kc == j->K)
        add_bias(j, n0, n1);
}

/* Columns per task: a multiple of `unit`, at most `max`, and a task count that is a
 * multiple of the thread count where N allows (so no thread idles in the last round). */
static int split_cols(int N, int nt, int unit, int max)
{
    int rounds = (N + nt * max - 1) / (nt * max);
    int per = (N + nt * rounds - 1) / (nt * rounds);
    per = (per + unit - 1) / unit * unit;
    return per < unit ? unit : per;
}

static void gemm_packed(struct cpu_backend *cb, struct gemm_job *j, int nt)
{
    int mblocks = (j->M + GEMM_MR - 1) / GEMM_MR;
    j->cols_per_task = split_cols(j->N, nt, GEMM_NR, GEMM_NC);
    int tasks = (j->N + j->cols_per_task - 1) / j->cols_per_task;
    j->bp_stride = (size_t)j->cols_per_task * GEMM_KC;
    for (j->k0 = 0; j->k0 < j->K; j->k0 += GEMM_KC) {
        j->kc = j->K - j->k0 < GEMM_KC ? j->K - j->k0 : GEMM_KC;
        cvlm_pool_run(cb->pool, mblocks, pack_a_task, j);
        cvlm_pool_run(cb->pool, tasks, packed_task, j);
    }
}

void cvlm_cpu_gemm(struct cvlm_backend *be, void *y, const void *x, int x_stride,
                   const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N,
                   int K)
{
    struct cpu_backend *cb = cpu_of(be);
    int nt = cvlm_pool_size(cb->pool);
    struct gemm_job j = {.y = y, .x = x, .x_stride = x_stride, .w = w, .bias = bias,
                         .M = M, .N = N, .K = K, .kn = cvlm_cpu_gemm_kernels(cb->isa)};
    if (M <= 0 || N <= 0)
        return;
    size_t need = bias ? (size_t)N : 0, bias_off = 0;
    int split = M <= GEMV_MAX_M && cb->isa >= CPU_ISA_AVX512BF16 && w->dtype == CVLM_DTYPE_BF16;
    if (split) { /* xs: M x 2 x Kp uint16 = M x Kp floats, then the bias */
        bias_off = (size_t)M * GEMV_KPAD(K);
        need += bias_off;
    } else if (M > GEMV_MAX_M) {
        int cols = split_cols(N, nt, GEMM_NR, GEMM_NC);
        bias_off = (size_t)((M + GEMM_MR - 1) / GEMM_MR) * GEMM_MR * GEMM_KC +
                   (size_t)nt * cols * GEMM_KC;
        need += bias_off;
    }
    float *s = cvlm_cpu_scratch(cb, need ? need : 1);
    if (!s) { /* no memory for scratch: the matrix-vector path needs none */
        j.bias = NULL;
        j.cols_per_task = N;
        gemv_task(&j, 0, 0);
        for (int m = 0; bias && m < M; m++)
            for (int n = 0; n < N; n++)
                ((float *)y)[(size_t)m * N + n] += cvlm_tensor_get_f32(bias, n);
        return;
    }
    if (bias) {
        j.bias_f = s + bias_off;
        cvlm_cpu_widen(bias, 0, N, j.bias_f);
    }
    if (K <= 0) { /* empty sum: y = bias or 0 */
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++)
                ((float *)y)[(size_t)m * N + n] = j.bias_f ? j.bias_f[n] : 0.0f;
        return;
    }
    if (M <= GEMV_MAX_M) {
#if defined(__x86_64__)
        if (split) {
            cvlm_cpu_split_bf16_avx512((uint16_t *)s, x, x_stride, M, K);
            j.xs = (const uint16_t *)s;
        }
#endif
        /* enough tasks to balance uneven progress; rows in groups of 8 for the kernels */
        j.cols_per_task = split_cols(N, nt, 8, N < 64 * nt ? 64 : (N + 4 * nt - 1) / (4 * nt));
        cvlm_pool_run(cb->pool, (N + j.cols_per_task - 1) / j.cols_per_task, gemv_task, &j);
        return;
    }
    j.ap = s;
    j.bp = s + (size_t)((M + GEMM_MR - 1) / GEMM_MR) * GEMM_MR * GEMM_KC;
    gemm_packed(cb, &j, nt);
}
