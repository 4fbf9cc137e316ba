/* attention.c - CPU attention: bidirectional (ViT) and causal over the paged KV cache.
 *
 * Scores are computed in F32 with an exact two-pass softmax (max, then exp and sum) per
 * (query, head), in per-thread scratch of one row of scores; no T x T matrix is formed.
 * Work is split over (head, block of queries) for the ViT and (token, head) for the LM.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <string.h>

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

/* p[0..n) = softmax(p) in place; returns nothing, exact two-pass form. */
static void softmax_inplace(float *p, int n)
{
    float mx = -INFINITY, sum = 0;
    for (int j = 0; j < n; j++)
        mx = p[j] > mx ? p[j] : mx;
    for (int j = 0; j < n; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < n; j++)
        p[j] *= inv;
}

/* ---- ViT: full attention over one sequence ------------------------------------------ */

#define QB 16 /* queries per task */

struct full_job {
    float *out;
    const float *qkv;
    int N, H, hd;
    float *scratch; /* per thread: N floats */
};

static void full_task(void *ctx, int task, int thread)
{
    struct full_job *j = ctx;
    int nqb = (j->N + QB - 1) / QB, h = task / nqb, q0 = (task % nqb) * QB;
    int q1 = q0 + QB < j->N ? q0 + QB : j->N, D = j->H * j->hd, row = 3 * D;
    float *p = j->scratch + (size_t)thread * j->N, scale = 1.0f / sqrtf((float)j->hd);
    for (int i = q0; i < q1; i++) {
        const float *q = j->qkv + (size_t)i * row + (size_t)h * j->hd;
        float *o = j->out + (size_t)i * D + (size_t)h * j->hd;
        for (int k = 0; k < j->N; k++)
            p[k] = dotf(q, j->qkv + (size_t)k * row + D + (size_t)h * j->hd, j->hd) * scale;
        softmax_inplace(p, j->N);
        memset(o, 0, (size_t)j->hd * sizeof(float));
        for (int k = 0; k < j->N; k++) {
            const float *v = j->qkv + (size_t)k * row + 2 * D + (size_t)h * j->hd;
            for (int d = 0; d < j->hd; d++)
                o[d] += p[k] * v[d];
        }
    }
}

void cvlm_cpu_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N,
                             int n_heads, int head_dim)
{
    struct cpu_backend *cb = cpu_of(be);
    struct full_job j = {out, qkv, N, n_heads, head_dim, NULL};
    j.scratch = cvlm_cpu_scratch(cb, (size_t)cvlm_pool_size(cb->pool) * N);
    if (!j.scratch)
        return;
    cvlm_pool_run(cb->pool, n_heads * ((N + QB - 1) / QB), full_task, &j);
}

/* ---- LM: paged KV ------------------------------------------------------------------- */

static size_t slot_offset(const struct cvlm_attn_batch *b, int seq, int slot, int width)
{
    const struct cvlm_seq_kv *s = &b->seqs[seq];
    int32_t block = s->block_table[slot / b->block_size];
    return ((size_t)block * b->block_size + (size_t)(slot % b->block_size)) * width;
}

void cvlm_cpu_kv_write(struct cvlm_backend *be, struct cvlm_kv_layer *kv, const void *k,
                       const void *v, int stride, const struct cvlm_attn_batch *b, int n_heads,
                       int head_dim)
{
    int width = n_heads * head_dim;
    (void)be;
    for (int t = 0; t < b->n_tokens; t++) {
        size_t off = slot_offset(b, b->seq[t], b->slot[t], width);
        memcpy((float *)kv->k + off, (const float *)k + (size_t)t * stride,
               (size_t)width * sizeof(float));
        memcpy((float *)kv->v + off, (const float *)v + (size_t)t * stride,
               (size_t)width * sizeof(float));
    }
}

struct paged_job {
    float *out;
    const float *q;
    int stride, H, hd;
    const struct cvlm_kv_layer *kv;
    const struct cvlm_attn_batch *b;
    float *scratch;
    int max_ctx;
};

static void paged_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    const struct cvlm_attn_batch *b = j->b;
    int t = task / j->H, h = task % j->H, width = j->H * j->hd, n = b->slot[t] + 1;
    const float *q = j->q + (size_t)t * j->stride + (size_t)h * j->hd;
    float *o = j->out + (size_t)t * width + (size_t)h * j->hd;
    float *p = j->scratch + (size_t)thread * j->max_ctx, scale = 1.0f / sqrtf((float)j->hd);
    for (int s = 0; s < n; s++) {
        size_t off = slot_offset(b, b->seq[t], s, width) + (size_t)h * j->hd;
        p[s] = dotf(q, (const float *)j->kv->k + off, j->hd) * scale;
    }
    softmax_inplace(p, n);
    memset(o, 0, (size_t)j->hd * sizeof(float));
    for (int s = 0; s < n; s++) {
        const float *v = (const float *)j->kv->v + slot_offset(b, b->seq[t], s, width) +
                         (size_t)h * j->hd;
        for (int d = 0; d < j->hd; d++)
            o[d] += p[s] * v[d];
    }
}

void cvlm_cpu_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                              const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                              int n_heads, int head_dim)
{
    struct cpu_backend *cb = cpu_of(be);
    struct paged_job j = {out, q, stride, n_heads, head_dim, kv, b, NULL, 1};
    for (int t = 0; t < b->n_tokens; t++)
        j.max_ctx = b->slot[t] + 1 > j.max_ctx ? b->slot[t] + 1 : j.max_ctx;
    j.scratch = cvlm_cpu_scratch(cb, (size_t)cvlm_pool_size(cb->pool) * j.max_ctx);
    if (!j.scratch)
        return;
    cvlm_pool_run(cb->pool, b->n_tokens * n_heads, paged_task, &j);
}
