/* attention.c - CPU attention: bidirectional (ViT) and causal over the paged KV cache.
 *
 * Scores are computed in F32 with a two-pass softmax (max, then exp and sum; the weighted
 * sum of values is divided by the sum at the end) per (query, head), in per-thread
 * scratch of one row of scores; no T x T matrix is formed. The dot products, exp and the
 * value accumulation are the backend's vector helpers (struct cpu_vec_ops).
 * Work is split over (head, block of queries) for the ViT and (token, head) for the LM.
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <string.h>

static float max_of(const float *p, int n)
{
    float mx = -INFINITY;
    for (int j = 0; j < n; j++)
        mx = p[j] > mx ? p[j] : mx;
    return mx;
}

/* o[0..hd) := o / sum */
static void scale_out(float *o, int hd, float sum)
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
        float sum = j->vec->exp_sum(p, j->N, max_of(p, j->N));
        memset(o, 0, (size_t)j->hd * sizeof(float));
        j->vec->pv(o, p, v, row, j->N, j->hd);
        scale_out(o, j->hd, sum);
    }
}

void cvlm_cpu_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N,
                             int n_heads, int head_dim)
{
    struct cpu_backend *cb = cpu_of(be);
    struct full_job j = {out, qkv, N, n_heads, head_dim, NULL, cb->vec};
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
    const struct cpu_vec_ops *vec;
};

/* One (token, head): scores over the sequence's slots 0..slot, block by block (slots of
 * a block are contiguous), softmax, then the weighted sum of the values. */
static void paged_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    const struct cvlm_attn_batch *b = j->b;
    /* head-major task order: a thread walks consecutive tokens of one head, whose keys and
     * values then stay in its L2 */
    int h = task / b->n_tokens, t = task % b->n_tokens, width = j->H * j->hd, n = b->slot[t] + 1;
    int bs = b->block_size;
    const int32_t *table = b->seqs[b->seq[t]].block_table;
    const float *q = j->q + (size_t)t * j->stride + (size_t)h * j->hd;
    const float *kb = (const float *)j->kv->k + (size_t)h * j->hd;
    const float *vb = (const float *)j->kv->v + (size_t)h * j->hd;
    float *o = j->out + (size_t)t * width + (size_t)h * j->hd;
    float *p = j->scratch + (size_t)thread * j->max_ctx, scale = 1.0f / sqrtf((float)j->hd);
    for (int s0 = 0; s0 < n; s0 += bs) {
        size_t at = (size_t)table[s0 / bs] * bs * width;
        j->vec->scores(p + s0, q, kb + at, width, n - s0 < bs ? n - s0 : bs, j->hd, scale);
    }
    float sum = j->vec->exp_sum(p, n, max_of(p, n));
    memset(o, 0, (size_t)j->hd * sizeof(float));
    for (int s0 = 0; s0 < n; s0 += bs) {
        size_t at = (size_t)table[s0 / bs] * bs * width;
        j->vec->pv(o, p + s0, vb + at, width, n - s0 < bs ? n - s0 : bs, j->hd);
    }
    scale_out(o, j->hd, sum);
}

void cvlm_cpu_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                              const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                              int n_heads, int head_dim)
{
    struct cpu_backend *cb = cpu_of(be);
    struct paged_job j = {out, q, stride, n_heads, head_dim, kv, b, NULL, 1, cb->vec};
    for (int t = 0; t < b->n_tokens; t++)
        j.max_ctx = b->slot[t] + 1 > j.max_ctx ? b->slot[t] + 1 : j.max_ctx;
    j.scratch = cvlm_cpu_scratch(cb, (size_t)cvlm_pool_size(cb->pool) * j.max_ctx);
    if (!j.scratch)
        return;
    cvlm_pool_run(cb->pool, b->n_tokens * n_heads, paged_task, &j);
}
