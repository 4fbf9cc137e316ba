/* attention.c - CPU attention: bidirectional (ViT); the causal paged one is in
 * attention_paged.c.
 *
 * Scores are computed in F32 with a two-pass softmax (max, then exp and sum; the weighted
 * sum of values is divided by the sum at the end) per (query, head), in per-thread
 * scratch of one row of scores; no T x T matrix is formed. The dot products, exp and the
 * value accumulation are the backend's vector helpers (struct cpu_vec_ops).
 * Work is split over (head, block of queries). The ViT's attention (N = 1226 keys per
 * query) runs in a blocked GEMM form, see below; the per-query form is the fallback.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <string.h>

float cvlm_cpu_max_of(const float *p, int n)
{
    float mx = -INFINITY;
    for (int j = 0; j < n; j++)
        mx = p[j] > mx ? p[j] : mx;
    return mx;
}

void cvlm_cpu_scale_out(float *o, int hd, float sum)
{
    float inv = 1.0f / sum;
    for (int d = 0; d < hd; d++)
        o[d] *= inv;
}

/* ---- ViT: full attention over one sequence ------------------------------------------ */

#define QB 16 /* queries per task */

struct full_job {
    float *out;
    const float *qkv;
    int N, H, hd;
    float *scratch; /* per thread: N floats */
    const struct cpu_vec_ops *vec;
};

static void full_task(void *ctx, int task, int thread)
{
    struct full_job *j = ctx;
    int nqb = (j->N + QB - 1) / QB, h = task / nqb, q0 = (task % nqb) * QB;
    int q1 = q0 + QB < j->N ? q0 + QB : j->N, D = j->H * j->hd, row = 3 * D;
    float *p = j->scratch + (size_t)thread * j->N, scale = 1.0f / sqrtf((float)j->hd);
    const float *k = j->qkv + D + (size_t)h * j->hd, *v = j->qkv + 2 * D + (size_t)h * j->hd;
    for (int i = q0; i < q1; i++) {
        const float *q = j->qkv + (size_t)i * row + (size_t)h * j->hd;
        float *o = j->out + (size_t)i * D + (size_t)h * j->hd;
        j->vec->scores(p, q, k, row, j->N, j->hd, scale);
        float sum = j->vec->exp_sum(p, j->N, cvlm_cpu_max_of(p, j->N));
        memset(o, 0, (size_t)j->hd * sizeof(float));
        j->vec->pv(o, p, v, row, j->N, j->hd);
        cvlm_cpu_scale_out(o, j->hd, sum);
    }
}

/* Blocked form: per head, the keys are packed once as GEMM_NR-key panels [hd][NR] and the
 * values as NR-column panels [N][NR]; a task takes GEMM_MR queries of one head and runs
 * the GEMM micro-kernel twice: S = (scale q) K^T over all key panels, then after the
 * row softmax O = P V over the value panels (P transposed into the [N][MR] layout the
 * kernel reads). Same F32 arithmetic as the GEMMs; about 4x the per-query path. */
struct blocked_job {
    float *out;
    const float *qkv;
    int N, H, hd, D, nkp, nvp, np; /* np: N rounded up to GEMM_NR */
    float scale;
    float *kp, *vp; /* per head: nkp * hd * NR, nvp * N * NR */
    float *tls;     /* per thread: S [MR][np], qp [hd][MR], pt [N][MR] */
    size_t tls_stride;
    struct cpu_gemm_kernels kn;
    const struct cpu_vec_ops *vec;
};

static void pack_head_task(void *ctx, int h, int thread)
{
    struct blocked_job *j = ctx;
    struct cvlm_tensor kview = {
        .dtype = CVLM_DTYPE_F32, .ndim = 2, .shape = {j->N, 3 * j->D}, .data = j->qkv};
    float *kp = j->kp + (size_t)h * j->nkp * j->hd * GEMM_NR;
    float *vp = j->vp + (size_t)h * j->nvp * j->N * GEMM_NR;
    (void)thread;
    for (int p = 0; p < j->nkp; p++) /* kp[p][d][c] = K[p * NR + c][h * hd + d] */
        j->kn.pack_b(kp + (size_t)p * j->hd * GEMM_NR, &kview, p * GEMM_NR, j->N, j->D + h * j->hd,
                     j->hd, 3 * j->D);
    for (int p = 0; p < j->nvp; p++) { /* vp[p][n][c] = V[n][h * hd + p * NR + c] */
        int d0 = p * GEMM_NR, w = j->hd - d0 < GEMM_NR ? j->hd - d0 : GEMM_NR;
        for (int n = 0; n < j->N; n++) {
            float *dst = vp + ((size_t)p * j->N + n) * GEMM_NR;
            memcpy(dst, j->qkv + (size_t)n * 3 * j->D + 2 * j->D + h * j->hd + d0,
                   (size_t)w * sizeof(float));
            memset(dst + w, 0, (size_t)(GEMM_NR - w) * sizeof(float));
        }
    }
}

static void blocked_task(void *ctx, int task, int thread)
{
    struct blocked_job *j = ctx;
    int nqb = (j->N + GEMM_MR - 1) / GEMM_MR, h = task / nqb, q0 = (task % nqb) * GEMM_MR;
    int mr = j->N - q0 < GEMM_MR ? j->N - q0 : GEMM_MR, hd = j->hd;
    float *S = j->tls + (size_t)thread * j->tls_stride, *qp = S + (size_t)GEMM_MR * j->np;
    float *pt = qp + (size_t)hd * GEMM_MR, sum[GEMM_MR];
    const float *kp = j->kp + (size_t)h * j->nkp * hd * GEMM_NR;
    const float *vp = j->vp + (size_t)h * j->nvp * j->N * GEMM_NR;
    for (int d = 0; d < hd; d++) /* qp[d][i] = scale * Q[q0 + i][h * hd + d] */
        for (int i = 0; i < GEMM_MR; i++)
            qp[d * GEMM_MR + i] =
                i < mr ? j->scale * j->qkv[(size_t)(q0 + i) * 3 * j->D + h * hd + d] : 0.0f;
    for (int p = 0; p < j->nkp; p++)
        j->kn.tile(qp, kp + (size_t)p * hd * GEMM_NR, hd, S + p * GEMM_NR, j->np, mr, GEMM_NR, 0);
    for (int i = 0; i < mr; i++) {
        float *row = S + (size_t)i * j->np;
        sum[i] = j->vec->exp_sum(row, j->N, cvlm_cpu_max_of(row, j->N));
    }
    for (int i = mr; i < GEMM_MR; i++) /* rows past the last query: zero weights */
        memset(S + (size_t)i * j->np, 0, (size_t)j->N * sizeof(float));
    j->vec->transpose(pt, GEMM_MR, S, j->np, GEMM_MR, j->N);
    for (int p = 0; p < j->nvp; p++) {
        int d0 = p * GEMM_NR, nr = hd - d0 < GEMM_NR ? hd - d0 : GEMM_NR;
        j->kn.tile(pt, vp + (size_t)p * j->N * GEMM_NR, j->N,
                   j->out + (size_t)q0 * j->D + h * hd + d0, j->D, mr, nr, 0);
    }
    for (int i = 0; i < mr; i++)
        cvlm_cpu_scale_out(j->out + (size_t)(q0 + i) * j->D + h * hd, hd, sum[i]);
}

void cvlm_cpu_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N,
                             int n_heads, int head_dim)
{
    struct cpu_backend *cb = cpu_of(be);
    int nt = cvlm_pool_size(cb->pool);
    struct blocked_job b = {.out = out,
                            .qkv = qkv,
                            .N = N,
                            .H = n_heads,
                            .hd = head_dim,
                            .D = n_heads * head_dim,
                            .scale = 1.0f / sqrtf((float)head_dim),
                            .kn = cvlm_cpu_gemm_kernels(cb->isa),
                            .vec = cb->vec};
    b.nkp = (N + GEMM_NR - 1) / GEMM_NR;
    b.np = b.nkp * GEMM_NR;
    b.nvp = (head_dim + GEMM_NR - 1) / GEMM_NR;
    size_t kp = (size_t)n_heads * b.nkp * head_dim * GEMM_NR;
    size_t vp = (size_t)n_heads * b.nvp * N * GEMM_NR;
    b.tls_stride = (size_t)GEMM_MR * (b.np + head_dim + N) + 16;
    float *s = cvlm_cpu_scratch(cb, kp + vp + (size_t)nt * b.tls_stride);
    if (!s) { /* the per-query path needs N floats per thread only */
        struct full_job j = {out, qkv, N, n_heads, head_dim, NULL, cb->vec};
        if ((j.scratch = cvlm_cpu_scratch(cb, (size_t)nt * N)))
            cvlm_pool_run(cb->pool, n_heads * ((N + QB - 1) / QB), full_task, &j);
        return;
    }
    b.kp = s;
    b.vp = s + kp;
    b.tls = s + kp + vp;
    cvlm_pool_run(cb->pool, n_heads, pack_head_task, &b);
    cvlm_pool_run(cb->pool, n_heads * ((N + GEMM_MR - 1) / GEMM_MR), blocked_task, &b);
}
