/* gemm.c - y = x . W^T (+ b) for F32 activations and F32/F16/BF16 weights: the driver
 * (blocking, threading, kernel choice) and the portable scalar kernels.
 *
 * Two regimes:
 * - Few rows of x (decode, M <= GEMV_MAX_M): weight-bandwidth bound. Threads own
 *   disjoint ranges of W rows; a matrix-vector kernel streams each W row once, widening
 *   in registers, and serves up to GEMV_MMAX rows of x per pass (more rows: another pass,
 *   the W rows then come from cache).
 * - Many rows (prefill, the ViT): compute bound. Blocked like a classic packed GEMM:
 *   x is packed once into MR-row micro-panels (all of K; shared by the threads), then
 *   every thread takes blocks of NC output columns and, slice by slice of KC, widens and
 *   transposes its W block into NR-column micro-panels (per-thread scratch, reused by all
 *   M rows) and runs the MR x NR register-blocked micro-kernel over it.
 * All accumulation is F32; the k order differs from a naive loop only by blocking.
 * Quantized weights on AVX2 (q_dot_avx2.c; q_dot_avx512.c's VNNI versions where the CPU
 * has AVX512_VNNI) round x to int8 and run integer dot products instead: one row of x
 * (decode) through the matrix-vector kernel, and for Q4 (and Q8 on VNNI) every M above
 * the matrix-vector range (prefill) through an integer GEMM, tasks of 64 W rows.
 * Quantized weights with GPTQ's extras (engine/backend.h) reach the kernels as a plain
 * matrix: with perm, x is gathered into the stored column order once per call; with mins,
 * the offsets' share (sum over the groups of mins[n][g] * sum of x over group g) is added
 * to each output after the kernels, from group sums taken once per call. Without either,
 * nothing of this runs.
 */
#include "kernels/cpu/cpu.h"

#include <string.h>

#define GEMV_MAX_M 8 /* scalar and AVX-512: above this, the packed GEMM wins */
#ifndef GEMM_NC
#define GEMM_NC 256 /* max output columns per task */
#endif

/* ---- scalar kernels -------------------------------------------------------------------- */

void cvlm_cpu_widen(const struct cvlm_tensor *w, int64_t row, int64_t n, float *out)
{
    const int64_t off = row * n; /* rows are n elements long */
    if (cvlm_dtype_is_quant(w->dtype)) {
        for (int64_t i = 0; i < n; i++)
            out[i] = cvlm_tensor_get_f32(w, off + i);
    } else if (w->dtype == CVLM_DTYPE_F32) {
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

/* Widens n elements of W starting at element `off` (scalar paths only; quantized weights
 * dequantized element by element). */
static void widen_at(const struct cvlm_tensor *w, size_t off, int n, float *out)
{
    const uint16_t *s = (const uint16_t *)w->data + off;
    if (cvlm_dtype_is_quant(w->dtype)) /* q * scale: mins are the driver's (add_mins) */
        for (int i = 0; i < n; i++)
            out[i] = cvlm_quant_get_scaled(w, (int64_t)off + i);
    else if (w->dtype == CVLM_DTYPE_F32)
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
            y[(size_t)m * ldy + n] =
                ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
    }
}

void cvlm_cpu_pack_b_scalar(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0, int kc,
                            int K)
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

/* The kernels for a weight dtype: quantized weights use the AVX2 matrix-vector kernel and
 * packer on every x86 path that has AVX2 (with the ISA's own micro-kernel), else scalar. */
static struct cpu_gemm_kernels kernels_for(enum cpu_isa isa, enum cvlm_dtype dt)
{
    struct cpu_gemm_kernels k = cvlm_cpu_gemm_kernels(isa);
    if (!cvlm_dtype_is_quant(dt))
        return k;
#if defined(__x86_64__)
    if (isa >= CPU_ISA_AVX2) {
        k.gemv = cvlm_cpu_gemv_q_avx2;
        k.pack_b = cvlm_cpu_pack_b_q_avx2;
        k.gemv_rows = k.gemv_max_m = CVLM_CPU_AVX2_GEMV_MAX_M;
    }
#endif
    return k;
}

struct cpu_gemm_kernels cvlm_cpu_gemm_kernels(enum cpu_isa isa)
{
    struct cpu_gemm_kernels k = {cvlm_cpu_gemv_scalar, cvlm_cpu_pack_b_scalar, cvlm_cpu_tile_scalar,
                                 GEMV_MMAX, GEMV_MAX_M};
#if defined(__x86_64__)
    if (isa >= CPU_ISA_AVX512)
        k = (struct cpu_gemm_kernels){cvlm_cpu_gemv_avx512, cvlm_cpu_pack_b_avx512,
                                      cvlm_cpu_tile_avx512, GEMV_MMAX, GEMV_MAX_M};
    else if (isa >= CPU_ISA_AVX2)
        k = (struct cpu_gemm_kernels){cvlm_cpu_gemv_avx2, cvlm_cpu_pack_b_avx2, cvlm_cpu_tile_avx2,
                                      CVLM_CPU_AVX2_GEMV_MAX_M, CVLM_CPU_AVX2_GEMV_MAX_M};
#else
    (void)isa;
#endif
    return k;
}

struct gemm_job {
    float *y;
    const float *x;
    const uint16_t *xs; /* x split into BF16 hi/lo terms (BF16 weights, AVX512_BF16) */
    const float *qx;    /* x rounded to int8 (quantized weights: decode; integer GEMM) */
    int vnni;           /* the int8-x kernels may use their AVX-512 VNNI versions */
    int x_stride;
    const struct cvlm_tensor *w, *bias;
    int M, N, K;
    struct cpu_gemm_kernels kn;
    const struct cpu_vec_ops *vec;
    int cols_per_task; /* a multiple of 4 (gemv) or GEMM_NR (packed) */
    /* packed path */
    float *ap;        /* [ceil(M/MR)][K][MR] */
    float *bp;        /* per thread: [NC/NR][KC][NR] */
    size_t bp_stride; /* floats per thread */
    float *bias_f;    /* widened bias [N] or NULL */
    float *xsum;      /* w->mins: [M][groups] sums of x over each group, else NULL */
};

/* y[m][n] += sum_g mins[n][g] * xsum[m][g] for n in [n0, n1): GPTQ's group offsets. */
static void add_mins(const struct gemm_job *j, int n0, int n1)
{
    const int ng = j->xsum ? (int)cvlm_quant_groups(j->w) : 0;
    for (int m = 0; m < j->M && ng; m++) {
        const float *xs = j->xsum + (size_t)m * ng;
        float *yr = j->y + (size_t)m * j->N;
        for (int n = n0; n < n1; n++) {
            const float *mn = j->w->mins + (size_t)n * ng;
            float a = 0;
            for (int g = 0; g < ng; g++)
                a += mn[g] * xs[g];
            yr[n] += a;
        }
    }
}

/* Floats of scratch the GPTQ extras take: the gathered x, the group sums. */
static size_t gptq_floats(const struct cvlm_tensor *w, int M, int K)
{
    size_t f = w->perm ? (size_t)M * K : 0;
    return (f + 15) / 16 * 16 + (w->mins ? (size_t)M * cvlm_quant_groups(w) : 0);
}

/* x in stored column order (perm) into s, and its group sums (mins) after it; points the
 * job at them. */
static void gptq_prepare(struct gemm_job *j, float *s)
{
    const struct cvlm_tensor *w = j->w;
    const int K = j->K, ng = (int)cvlm_quant_groups(w), G = (int)cvlm_quant_group(w);
    if (w->perm) {
        for (int m = 0; m < j->M; m++) {
            const float *xr = j->x + (size_t)m * j->x_stride;
            float *o = s + (size_t)m * K;
            for (int k = 0; k < K; k++)
                o[k] = xr[w->perm[k]];
        }
        j->x = s;
        j->x_stride = K;
        s += ((size_t)j->M * K + 15) / 16 * 16;
    }
    if (!w->mins)
        return;
    for (int m = 0; m < j->M; m++)
        for (int g = 0; g < ng; g++) {
            const float *xr = j->x + (size_t)m * j->x_stride;
            float a = 0;
            for (int k = g * G; k < K && k < (g + 1) * G; k++)
                a += xr[k];
            s[(size_t)m * ng + g] = a;
        }
    j->xsum = s;
}

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
    int n0 = task * j->cols_per_task,
        n1 = n0 + j->cols_per_task < j->N ? n0 + j->cols_per_task : j->N;
    (void)thread;
#if defined(__x86_64__)
    if (j->qx && j->vnni)
        cvlm_cpu_gemv_qdot_avx512vnni(j->y, j->N, j->qx, j->x, j->x_stride, j->M, j->w, n0, n1,
                                      j->K);
    else if (j->qx)
        cvlm_cpu_gemv_qdot_avx2(j->y, j->N, j->qx, j->x, j->x_stride, j->M, j->w, n0, n1, j->K);
#endif
    for (int m = 0; m < j->M && !j->qx; m += j->kn.gemv_rows) {
        int mc = j->M - m < j->kn.gemv_rows ? j->M - m : j->kn.gemv_rows;
#if defined(__x86_64__)
        if (j->xs) {
            cvlm_cpu_gemv_bf16x2_avx512(j->y + (size_t)m * j->N, j->N,
                                        j->xs + (size_t)m * 2 * GEMV_KPAD(j->K), mc, j->w, n0, n1,
                                        j->K);
            continue;
        }
#endif
        j->kn.gemv(j->y + (size_t)m * j->N, j->N, j->x + (size_t)m * j->x_stride, j->x_stride, mc,
                   j->w, n0, n1, j->K);
    }
    add_mins(j, n0, n1);
    add_bias(j, n0, n1);
}

/* Packs rows [m0, m0 + MR) of x, all of K, into ap[k][i] (zero rows past M). */
static void pack_a_task(void *ctx, int mb, int thread)
{
    struct gemm_job *j = ctx;
    float *ap = j->ap + (size_t)mb * j->K * GEMM_MR;
    int m0 = mb * GEMM_MR, mr = j->M - m0 < GEMM_MR ? j->M - m0 : GEMM_MR;
    (void)thread;
    if (mr < GEMM_MR)
        memset(ap, 0, (size_t)j->K * GEMM_MR * sizeof(float));
    j->vec->transpose(ap, GEMM_MR, j->x + (size_t)m0 * j->x_stride, j->x_stride, mr, j->K);
}

/* One task: output columns [n0, n1) for all rows, K in GEMM_KC slices; each slice of W
 * is widened into the thread's panels once and used by every row. */
static void packed_task(void *ctx, int task, int thread)
{
    struct gemm_job *j = ctx;
    int n0 = task * j->cols_per_task;
    int n1 = n0 + j->cols_per_task < j->N ? n0 + j->cols_per_task : j->N;
    int np = (n1 - n0 + GEMM_NR - 1) / GEMM_NR;
    float *bp = j->bp + (size_t)thread * j->bp_stride;
    for (int k0 = 0; k0 < j->K; k0 += GEMM_KC) {
        int kc = j->K - k0 < GEMM_KC ? j->K - k0 : GEMM_KC;
        size_t panel = (size_t)kc * GEMM_NR;
        for (int p = 0; p < np; p++)
            j->kn.pack_b(bp + p * panel, j->w, n0 + p * GEMM_NR, n1, k0, kc, j->K);
        /* an x micro-panel stays in L1 while the thread's W panels stream from L2 */
        for (int m = 0; m < j->M; m += GEMM_MR) {
            int mr = j->M - m < GEMM_MR ? j->M - m : GEMM_MR;
            const float *ap = j->ap + (size_t)(m / GEMM_MR) * j->K * GEMM_MR + (size_t)k0 * GEMM_MR;
            for (int p = 0; p < np; p++) {
                int n = n0 + p * GEMM_NR, nr = n1 - n < GEMM_NR ? n1 - n : GEMM_NR;
                j->kn.tile(ap, bp + p * panel, kc, j->y + (size_t)m * j->N + n, j->N, mr, nr,
                           k0 > 0);
            }
        }
    }
    add_mins(j, n0, n1);
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

/* x packed once (all of K), then one task per block of output columns: two hand-offs
 * to the pool per GEMM (a barrier per K slice measured a few % slower). */
static void gemm_packed(struct cpu_backend *cb, struct gemm_job *j, int nt)
{
    j->cols_per_task = split_cols(j->N, nt, GEMM_NR, GEMM_NC);
    j->bp_stride = (size_t)j->cols_per_task * GEMM_KC;
    cvlm_pool_run(cb->pool, (j->M + GEMM_MR - 1) / GEMM_MR, pack_a_task, j);
    cvlm_pool_run(cb->pool, (j->N + j->cols_per_task - 1) / j->cols_per_task, packed_task, j);
}

/* Floats of the packed x, rounded up to whole 64-byte lines. */
static size_t ap_floats(int M, int K)
{
    return ((size_t)((M + GEMM_MR - 1) / GEMM_MR) * GEMM_MR * (size_t)K + 15) / 16 * 16;
}

/* Floats of scratch a call needs, and where the widened bias goes in it. */
static size_t scratch_plan(const struct gemm_job *j, int nt, int split, size_t *bias_off)
{
    *bias_off = 0;
    if (split == 1) /* xs: M x 2 x Kp uint16 = M x Kp floats */
        *bias_off = (size_t)j->M * GEMV_KPAD(j->K);
#if defined(__x86_64__)
    else if (split >= 2) /* qx */
        *bias_off = cvlm_cpu_qx_floats(j->M, j->K);
#endif
    else if (j->M > j->kn.gemv_max_m) /* ap, then one bp per thread */
        *bias_off =
            ap_floats(j->M, j->K) + (size_t)nt * split_cols(j->N, nt, GEMM_NR, GEMM_NC) * GEMM_KC;
    return *bias_off + (j->bias ? (size_t)j->N : 0) + 1;
}

/* Without scratch memory: the matrix-vector kernels need none (slow for large M); GPTQ's
 * extras element by element. */
static void gemm_no_scratch(struct gemm_job *j)
{
    const struct cvlm_tensor *bias = j->bias, *w = j->w;
    if (w->perm || w->mins) {
        for (int m = 0; m < j->M; m++)
            for (int n = 0; n < j->N; n++) {
                const float *xr = j->x + (size_t)m * j->x_stride;
                float a = bias ? cvlm_tensor_get_f32(bias, n) : 0.0f;
                for (int k = 0; k < j->K; k++)
                    a += xr[w->perm ? w->perm[k] : k] *
                         cvlm_tensor_get_f32(w, (int64_t)n * j->K + k);
                j->y[(size_t)m * j->N + n] = a;
            }
        return;
    }
    j->bias = NULL;
    j->cols_per_task = j->N;
    gemv_task(j, 0, 0);
    for (int m = 0; bias && m < j->M; m++)
        for (int n = 0; n < j->N; n++)
            j->y[(size_t)m * j->N + n] += cvlm_tensor_get_f32(bias, n);
}

#if defined(__x86_64__)
#define QX_ROWS_PER_TASK 16

/* Rows [16 task, 16 task + 16) of x rounded into qx (the integer GEMM's first pass). */
static void quant_x_task(void *ctx, int task, int thread)
{
    struct gemm_job *j = ctx;
    int m0 = task * QX_ROWS_PER_TASK,
        mc = j->M - m0 < QX_ROWS_PER_TASK ? j->M - m0 : QX_ROWS_PER_TASK;
    (void)thread;
    cvlm_cpu_quant_x_avx2((float *)j->qx + cvlm_cpu_qx_floats(m0, j->K),
                          j->x + (size_t)m0 * j->x_stride, j->x_stride, mc, j->K, j->w->dtype);
}

static void qdot_task(void *ctx, int task, int thread)
{
    struct gemm_job *j = ctx;
    int n0 = task * j->cols_per_task,
        n1 = n0 + j->cols_per_task < j->N ? n0 + j->cols_per_task : j->N;
    (void)thread;
    if (j->w->dtype == CVLM_DTYPE_Q8) /* VNNI only */
        cvlm_cpu_gemm_q8dot_avx512vnni(j->y, j->N, j->qx, j->x, j->x_stride, j->M, j->w, n0, n1,
                                       j->K);
    else if (j->vnni)
        cvlm_cpu_gemm_q4dot_avx512vnni(j->y, j->N, j->qx, j->M, j->w, n0, n1, j->K);
    else
        cvlm_cpu_gemm_q4dot_avx2(j->y, j->N, j->qx, j->M, j->w, n0, n1, j->K);
    add_mins(j, n0, n1);
    add_bias(j, n0, n1);
}

/* Q4 weights (AVX2, or AVX-512 VNNI where the CPU has it) or Q8 weights (VNNI only: with
 * AVX2's sign trick the integer product is no faster than the float GEMM), many rows of x:
 * x rounded to int8 once (rows split among the threads), then blocks of 64 W rows per
 * task: a task's W rows (<= 64 x K bytes) stay in L2 while each tile of x rows passes over
 * them. */
static void gemm_qdot(struct cpu_backend *cb, struct gemm_job *j, int nt, float *s)
{
    j->qx = s;
    cvlm_pool_run(cb->pool, (j->M + QX_ROWS_PER_TASK - 1) / QX_ROWS_PER_TASK, quant_x_task, j);
    j->cols_per_task = split_cols(j->N, nt, 2, 64);
    cvlm_pool_run(cb->pool, (j->N + j->cols_per_task - 1) / j->cols_per_task, qdot_task, j);
}
#endif

static void gemm_vector(struct cpu_backend *cb, struct gemm_job *j, int nt, float *s, int split)
{
#if defined(__x86_64__)
    if (split == 1) {
        cvlm_cpu_split_bf16_avx512((uint16_t *)s, j->x, j->x_stride, j->M, j->K);
        j->xs = (const uint16_t *)s;
    } else if (split == 2) { /* after gptq_prepare: x in stored column order */
        cvlm_cpu_quant_x_avx2(s, j->x, j->x_stride, j->M, j->K, j->w->dtype);
        j->qx = s;
    }
#else
    (void)s;
    (void)split;
#endif
    /* about 4 tasks per thread to balance uneven progress, rows in groups of 8 */
    int N = j->N, max = N < 64 * nt ? 64 : (N + 4 * nt - 1) / (4 * nt);
    j->cols_per_task = split_cols(N, nt, 8, max);
    cvlm_pool_run(cb->pool, (N + j->cols_per_task - 1) / j->cols_per_task, gemv_task, j);
}

void cvlm_cpu_gemm(struct cvlm_backend *be, void *y, const void *x, int x_stride,
                   const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N, int K)
{
    struct cpu_backend *cb = cpu_of(be);
    int nt = cvlm_pool_size(cb->pool);
    struct gemm_job j = {.y = y,
                         .x = x,
                         .x_stride = x_stride,
                         .w = w,
                         .bias = bias,
                         .M = M,
                         .N = N,
                         .K = K,
                         .kn = kernels_for(cb->isa, w->dtype),
                         .vec = cb->vec,
                         .vnni = cb->has_vnni};
    /* x prepared once per call for the decode kernels: 1 split into BF16 terms, 2 int8 */
    int split = M <= GEMV_MAX_M && cb->isa >= CPU_ISA_AVX512BF16 && w->dtype == CVLM_DTYPE_BF16;
#if defined(__x86_64__)
    if (M <= CVLM_CPU_QDOT_USE_M && cb->isa >= CPU_ISA_AVX2 && cvlm_dtype_is_quant(w->dtype))
        split = 2;
    else if (M > j.kn.gemv_max_m && cb->isa >= CPU_ISA_AVX2 &&
             (w->dtype == CVLM_DTYPE_Q4 || (w->dtype == CVLM_DTYPE_Q8 && j.vnni)))
        split = 3;
#endif
    size_t bias_off, plan, extra = w->perm || w->mins ? gptq_floats(w, M, K) : 0;
    if (M <= 0 || N <= 0)
        return;
    plan = scratch_plan(&j, nt, split, &bias_off);
    plan = extra ? (plan + 15) / 16 * 16 : plan;
    float *s = cvlm_cpu_scratch(cb, plan + extra);
    if (!s) {
        gemm_no_scratch(&j);
        return;
    }
    if (extra && K > 0)
        gptq_prepare(&j, s + plan);
    if (bias) {
        j.bias_f = s + bias_off;
        cvlm_cpu_widen(bias, 0, N, j.bias_f);
    }
    if (K <= 0) { /* empty sum: y = bias or 0 */
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++)
                j.y[(size_t)m * N + n] = j.bias_f ? j.bias_f[n] : 0.0f;
#if defined(__x86_64__)
    } else if (split == 3) {
        gemm_qdot(cb, &j, nt, s);
#endif
    } else if (M <= j.kn.gemv_max_m) {
        gemm_vector(cb, &j, nt, s, split);
    } else {
        j.ap = s;
        j.bp = s + ap_floats(M, K); /* 64-byte aligned: the packers use aligned stores */
        gemm_packed(cb, &j, nt);
    }
}
