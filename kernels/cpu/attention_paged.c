/* attention_paged.c - causal attention of the language model over the paged KV cache,
 * and the cache writes.
 *
 * A batch mixes prefill chunks (runs of consecutive slots of one sequence) and decode
 * tokens. Runs of at least GEMM_MR tokens take the blocked path: per (run, head) the keys
 * 0..last slot are gathered from their blocks into GEMM_NR-key panels [hd][NR] and the
 * values into [keys][NR] column panels, once; then a task takes GEMM_MR queries of one
 * head and runs the GEMM micro-kernel for S = (scale q) K^T over the key panels the block
 * needs, masks keys past each query's slot (exactly zero weight), softmax, and O = P V.
 * Every other token (decode) takes the split path: its context in chunks of CHUNK_SLOTS
 * slots, one task per (token, chunk, group of heads) reading the group's part of each
 * block's rows as one stream (scores block by block, softmax, weighted sum of the values,
 * with the vector helpers), then, for a context of several chunks, a merge of the chunks'
 * partial softmax results per (token, head). Heads are grouped only as far as it takes to
 * give every thread work (one decode token at a short context); a task per (token, head)
 * reads a 128-512 byte slice of every 2-16 KB row, which the hardware prefetchers do not
 * follow (that per-token path remains as the fallback when scratch memory is short). All
 * are F32 with a two-pass softmax (per chunk on the split path) whose normalisation is
 * applied to the output.
 * Grouped-query attention (b->n_kv_heads < n_heads): the cache holds Hkv heads per slot and
 * query head h reads KV head h / (H / Hkv) in place; the blocked path packs each (run, KV
 * head) once and every query head of its group reads that pack.
 * The cache is F32, F16, BF16 or Q8 (kv->dtype): kv_write rounds the rows to it; the per-token
 * path widens 16-bit keys and values in registers (scores16 / pv16), the blocked path while
 * packing, so everything after the loads is the same F32 arithmetic for every dtype.
 * An int8 cache (Q8) has one scale per (slot, KV head) for K and for V (kv->scales, the
 * slot's 2 * Hkv of them in a row): kv_write quantizes head by head (narrow8); the per-token
 * path widens the codes in registers and applies each slot's scale once (to the key's dot
 * product, to the value's softmax weight: scores8 / pv8), the blocked path dequantizes while
 * packing (widen8).
 */
#include "kernels/cpu/cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Slots per chunk of the split path (rounded up to whole blocks): a decode token whose
 * context is longer is split; 128 keeps the merge's cost (hd + 2 floats per chunk and head)
 * small against the chunk's reads and gives a 1300-token image prompt 11 tasks. */
#define CHUNK_SLOTS 128

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
    size_t es = cvlm_dtype_size(kv->dtype);
    const struct cpu_vec_ops *vec = cpu_of(be)->vec;
    for (int t = 0; t < b->n_tokens; t++) {
        size_t off = slot_offset(b, b->seq[t], b->slot[t], width) * es;
        if (kv->dtype == CVLM_DTYPE_Q8) { /* per head: codes and the slot's 2 * H scales */
            float *sc = kv->scales + off / (size_t)head_dim * 2;
            const float *kr = (const float *)k + (size_t)t * stride;
            const float *vr = (const float *)v + (size_t)t * stride;
            for (int h = 0; h < n_heads; h++) {
                size_t at = off + (size_t)h * head_dim;
                vec->narrow8((int8_t *)kv->k + at, sc + h, kr + (size_t)h * head_dim, head_dim);
                vec->narrow8((int8_t *)kv->v + at, sc + n_heads + h, vr + (size_t)h * head_dim,
                             head_dim);
            }
            continue;
        }
        vec->narrow((char *)kv->k + off, (const float *)k + (size_t)t * stride, width, kv->dtype);
        vec->narrow((char *)kv->v + off, (const float *)v + (size_t)t * stride, width, kv->dtype);
    }
}

/* Tokens t0..t0+len-1 of one sequence at slots s0..s0+len-1. */
struct run {
    int t0, len, seq, s0;
    int qb0;       /* index of its first query block among all runs' blocks */
    size_t kp, vp; /* offsets of its packed keys / values (head 0) in the scratch */
};

struct paged_job {
    float *out;
    const float *q;
    int stride, H, hd, width, nvp;
    int Hkv, kvw, group; /* KV heads, the cache's row width Hkv * hd, H / Hkv */
    float scale;
    const struct cvlm_kv_layer *kv;
    const struct cvlm_attn_batch *b;
    const struct cpu_vec_ops *vec;
    struct cpu_gemm_kernels kn;
    /* per-token path (the fallback: every token in order) */
    int n_left, max_ctx;
    float *scratch; /* per thread: max_ctx floats */
    /* split path: item = (token, chunk), numbered token by token; a task = (item, group) */
    int chunk, n_split, n_items;
    int n_groups;        /* head groups per item (whole KV heads' query heads) */
    int multi;           /* some token has several chunks: the merge runs */
    int32_t *split_tok;  /* [n_split] */
    int32_t *split_item; /* [n_split + 1]: each token's first item */
    float *part;         /* [n_items][H][hd + 2] */
    float *cscratch;     /* per thread: [H][chunk] scores */
    int nt;              /* threads */
    /* blocked path */
    struct run *runs;
    int n_runs, n_qb;
    float *pack; /* keys and values of every (run, head) */
    float *tls;  /* per thread: S [MR][np], qp [hd][MR], pt [nk][MR] */
    size_t tls_stride;
};

static int keys_of(const struct run *r)
{
    return r->s0 + r->len;
}

static size_t kp_size(const struct paged_job *j, const struct run *r)
{
    return (size_t)((keys_of(r) + GEMM_NR - 1) / GEMM_NR) * j->hd * GEMM_NR;
}

static size_t vp_size(const struct paged_job *j, const struct run *r)
{
    return (size_t)j->nvp * keys_of(r) * GEMM_NR;
}

/* ---- per-token path ------------------------------------------------------------------ */

/* p[0..cnt) = scale q_h . K[slot] for the cnt slots of the block at element offset `at`
 * (query head h reads its KV head h / group). */
static void head_scores(const struct paged_job *j, int h, float *p, const float *q, size_t at,
                        int cnt)
{
    size_t head = (size_t)(h / j->group) * j->hd; /* this query head's KV head */
    enum cvlm_dtype dt = j->kv->dtype;
    if (dt == CVLM_DTYPE_F32)
        j->vec->scores(p, q, (const float *)j->kv->k + head + at, j->kvw, cnt, j->hd, j->scale);
    else if (dt == CVLM_DTYPE_Q8) /* a slot's K and V scales: 2 * Hkv floats per slot row */
        j->vec->scores8(p, q, (const int8_t *)j->kv->k + head + at, j->kvw,
                        j->kv->scales + h / j->group + at / j->hd * 2, 2 * j->Hkv, cnt, j->hd,
                        j->scale);
    else
        j->vec->scores16(p, q, (const uint16_t *)j->kv->k + head + at, j->kvw, cnt, j->hd, j->scale,
                         dt);
}

/* o += sum over the block's cnt slots of p[slot] V[slot] (query head h's KV head). */
static void head_pv(const struct paged_job *j, int h, float *o, const float *p, size_t at, int cnt)
{
    size_t head = (size_t)(h / j->group) * j->hd;
    enum cvlm_dtype dt = j->kv->dtype;
    if (dt == CVLM_DTYPE_F32)
        j->vec->pv(o, p, (const float *)j->kv->v + head + at, j->kvw, cnt, j->hd);
    else if (dt == CVLM_DTYPE_Q8)
        j->vec->pv8(o, p, (const int8_t *)j->kv->v + head + at, j->kvw,
                    j->kv->scales + j->Hkv + h / j->group + at / j->hd * 2, 2 * j->Hkv, cnt, j->hd);
    else
        j->vec->pv16(o, p, (const uint16_t *)j->kv->v + head + at, j->kvw, cnt, j->hd, dt);
}

static void token_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    const struct cvlm_attn_batch *b = j->b;
    /* head-major order: a thread walks consecutive tokens of one head (keys stay in L2) */
    int h = task / j->n_left, t = task % j->n_left, n;
    n = b->slot[t] + 1;
    int bs = b->block_size;
    const int32_t *table = b->seqs[b->seq[t]].block_table;
    const float *q = j->q + (size_t)t * j->stride + (size_t)h * j->hd;
    float *o = j->out + (size_t)t * j->width + (size_t)h * j->hd;
    float *p = j->scratch + (size_t)thread * j->max_ctx;
    for (int s0 = 0; s0 < n; s0 += bs)
        head_scores(j, h, p + s0, q, (size_t)table[s0 / bs] * bs * j->kvw,
                    n - s0 < bs ? n - s0 : bs);
    float sum = j->vec->exp_sum(p, n, cvlm_cpu_max_of(p, n));
    memset(o, 0, (size_t)j->hd * sizeof(float));
    for (int s0 = 0; s0 < n; s0 += bs)
        head_pv(j, h, o, p + s0, (size_t)table[s0 / bs] * bs * j->kvw, n - s0 < bs ? n - s0 : bs);
    cvlm_cpu_scale_out(o, j->hd, sum);
}

/* ---- split path: a context in chunks of slots, heads in groups -------------------------- */

/* Task = (item i = (token, chunk c), head group g): slots [c C, min(n, (c + 1) C)) for the
 * group's heads, block by block with the heads inside (the group's part of a block's rows
 * is contiguous, so the cache is read as a stream). Per head it leaves the chunk's score
 * maximum, exp-sum and unnormalised output in `part` for merge_task, or, when the chunk is
 * the token's whole context, the normalised output. The chunks are fixed by slot index
 * and a head's arithmetic does not depend on its group, so a token's result depends on
 * its context only (not on the batch or the thread count). */
static void chunk_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    const struct cvlm_attn_batch *b = j->b;
    int i = task / j->n_groups, g = task % j->n_groups;
    int h0 = g * j->Hkv / j->n_groups * j->group, h1 = (g + 1) * j->Hkv / j->n_groups * j->group;
    int lo = 0, hi = j->n_split - 1; /* the token whose items hold i */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (j->split_item[mid] <= i)
            lo = mid;
        else
            hi = mid - 1;
    }
    int t = j->split_tok[lo], c = i - j->split_item[lo], C = j->chunk, bs = b->block_size;
    int n = b->slot[t] + 1, s0 = c * C, s1 = n < s0 + C ? n : s0 + C, H = j->H, hd = j->hd;
    const int32_t *table = b->seqs[b->seq[t]].block_table;
    float *p = j->cscratch + (size_t)thread * H * C;  /* [H][C] */
    float *part = j->part + (size_t)i * H * (hd + 2); /* per head: o[hd], max, sum */
    const float *q = j->q + (size_t)t * j->stride;
    int whole = j->split_item[lo + 1] - j->split_item[lo] == 1;
    float *out = j->out + (size_t)t * j->width;
    for (int s = s0; s < s1; s += bs) {
        size_t at = (size_t)table[s / bs] * bs * j->kvw;
        for (int h = h0; h < h1; h++)
            head_scores(j, h, p + (size_t)h * C + (s - s0), q + (size_t)h * hd, at,
                        s1 - s < bs ? s1 - s : bs);
    }
    for (int h = h0; h < h1; h++) {
        float *ph = p + (size_t)h * C, *o = part + (size_t)h * (hd + 2);
        o[hd] = cvlm_cpu_max_of(ph, s1 - s0);
        o[hd + 1] = j->vec->exp_sum(ph, s1 - s0, o[hd]);
        memset(whole ? out + (size_t)h * hd : o, 0, (size_t)hd * sizeof(float));
    }
    for (int s = s0; s < s1; s += bs) {
        size_t at = (size_t)table[s / bs] * bs * j->kvw;
        for (int h = h0; h < h1; h++)
            head_pv(j, h, whole ? out + (size_t)h * hd : part + (size_t)h * (hd + 2),
                    p + (size_t)h * C + (s - s0), at, s1 - s < bs ? s1 - s : bs);
    }
    for (int h = h0; h < h1 && whole; h++)
        cvlm_cpu_scale_out(out + (size_t)h * hd, hd, part[(size_t)h * (hd + 2) + hd + 1]);
}

/* (split token l, head h) of a token with several chunks:
 * out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c. */
static void merge_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    int l = task / j->H, h = task % j->H, hd = j->hd, t = j->split_tok[l];
    int i0 = j->split_item[l], i1 = j->split_item[l + 1];
    size_t ps = (size_t)j->H * (hd + 2);
    const float *first = j->part + (size_t)i0 * ps + (size_t)h * (hd + 2);
    float *o = j->out + (size_t)t * j->width + (size_t)h * hd, mx = first[hd], sum = 0;
    (void)thread;
    if (i1 - i0 == 1) /* written by chunk_task */
        return;
    for (int i = i0 + 1; i < i1; i++) {
        float m = j->part[(size_t)i * ps + (size_t)h * (hd + 2) + hd];
        mx = m > mx ? m : mx;
    }
    memset(o, 0, (size_t)hd * sizeof(float));
    for (int i = i0; i < i1; i++) {
        const float *pc = j->part + (size_t)i * ps + (size_t)h * (hd + 2);
        float w = expf(pc[hd] - mx);
        sum += w * pc[hd + 1];
        for (int d = 0; d < hd; d++)
            o[d] += w * pc[d];
    }
    cvlm_cpu_scale_out(o, hd, sum);
}

/* ---- blocked path ---------------------------------------------------------------------- */

/* kp[p][d][c] = K[slot p * NR + c][h * hd + d] (0 past the last key); vp[p][s][c] =
 * V[slot s][h * hd + p * NR + c] (0 past hd). Slots are gathered block by block; a 16-bit
 * or int8 cache's key rows are widened into the thread's tls area first (up to 16 rows of
 * hd), its value rows straight into the panels (int8: times their slot's scale). */
static void pack_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    const struct run *r = &j->runs[task / j->Hkv];
    int h = task % j->Hkv, nk = keys_of(r), bs = j->b->block_size, hd = j->hd; /* KV head */
    const int32_t *table = j->b->seqs[r->seq].block_table;
    float *kp = j->pack + r->kp + (size_t)h * kp_size(j, r);
    float *vp = j->pack + r->vp + (size_t)h * vp_size(j, r);
    float *wide = j->tls + (size_t)thread * j->tls_stride; /* [16][hd] */
    enum cvlm_dtype dt = j->kv->dtype;
    size_t es = cvlm_dtype_size(dt);
    if (nk % GEMM_NR) /* the last panel's columns past the keys */
        memset(kp + (size_t)(nk / GEMM_NR) * hd * GEMM_NR, 0, (size_t)hd * GEMM_NR * 4);
    for (int s = 0; s < nk;) {
        int c0 = s % GEMM_NR, in_blk = s % bs, cnt = bs - in_blk;
        cnt = cnt < GEMM_NR - c0 ? cnt : GEMM_NR - c0;
        cnt = cnt < 16 ? cnt : 16;
        cnt = cnt < nk - s ? cnt : nk - s;
        size_t at = ((size_t)table[s / bs] * bs + in_blk) * j->kvw + (size_t)h * hd;
        const float *ks = (const float *)j->kv->k + at;
        int lds = j->kvw;
        /* Q8: the first slot's 2 * Hkv scales (at / hd - h: the slot row * Hkv) */
        const float *sc = dt == CVLM_DTYPE_Q8 ? j->kv->scales + (at / hd - h) * 2 : NULL;
        if (dt == CVLM_DTYPE_Q8) {
            for (int i = 0; i < cnt; i++)
                j->vec->widen8(wide + (size_t)i * hd,
                               (const int8_t *)j->kv->k + at + (size_t)i * j->kvw, hd,
                               sc[(size_t)i * 2 * j->Hkv + h]);
            ks = wide;
            lds = hd;
        } else if (dt != CVLM_DTYPE_F32) {
            for (int i = 0; i < cnt; i++)
                j->vec->widen(wide + (size_t)i * hd,
                              (const char *)j->kv->k + (at + (size_t)i * j->kvw) * es, hd, dt);
            ks = wide;
            lds = hd;
        }
        j->vec->transpose(kp + (size_t)(s / GEMM_NR) * hd * GEMM_NR + c0, GEMM_NR, ks, lds, cnt,
                          hd);
        for (int i = 0; i < cnt; i++) {
            const char *src = (const char *)j->kv->v + (at + (size_t)i * j->kvw) * es;
            for (int p = 0; p < j->nvp; p++) {
                int w = hd - p * GEMM_NR < GEMM_NR ? hd - p * GEMM_NR : GEMM_NR;
                float *dst = vp + ((size_t)p * nk + s + i) * GEMM_NR;
                if (dt == CVLM_DTYPE_F32)
                    memcpy(dst, src + (size_t)p * GEMM_NR * 4, (size_t)w * 4);
                else if (dt == CVLM_DTYPE_Q8)
                    j->vec->widen8(dst, (const int8_t *)src + (size_t)p * GEMM_NR, w,
                                   sc[(size_t)i * 2 * j->Hkv + j->Hkv + h]);
                else
                    j->vec->widen(dst, src + (size_t)p * GEMM_NR * es, w, dt);
                memset(dst + w, 0, (size_t)(GEMM_NR - w) * 4);
            }
        }
        s += cnt;
    }
}

/* Row i of S (query at slot `last`): softmax over keys 0..last, exactly 0 after. */
static float causal_softmax(const struct cpu_vec_ops *vec, float *row, int last, int nk)
{
    float sum = vec->exp_sum(row, last + 1, cvlm_cpu_max_of(row, last + 1));
    if (nk > last + 1)
        memset(row + last + 1, 0, (size_t)(nk - last - 1) * sizeof(float));
    return sum;
}

static void block_task(void *ctx, int task, int thread)
{
    struct paged_job *j = ctx;
    int h = task / j->n_qb, qb = task % j->n_qb, ri = 0, hd = j->hd;
    while (ri + 1 < j->n_runs && j->runs[ri + 1].qb0 <= qb)
        ri++;
    const struct run *r = &j->runs[ri];
    int i0 = (qb - r->qb0) * GEMM_MR, mr = r->len - i0 < GEMM_MR ? r->len - i0 : GEMM_MR;
    int nk = r->s0 + i0 + mr, nkp = (nk + GEMM_NR - 1) / GEMM_NR, np = nkp * GEMM_NR;
    float *S = j->tls + (size_t)thread * j->tls_stride, sum[GEMM_MR];
    float *qp = S + (size_t)GEMM_MR * np, *pt = qp + (size_t)hd * GEMM_MR;
    const float *kp = j->pack + r->kp + (size_t)(h / j->group) * kp_size(j, r);
    const float *vp = j->pack + r->vp + (size_t)(h / j->group) * vp_size(j, r);
    for (int d = 0; d < hd; d++)
        for (int i = 0; i < GEMM_MR; i++)
            qp[d * GEMM_MR + i] =
                i < mr ? j->scale * j->q[(size_t)(r->t0 + i0 + i) * j->stride + h * hd + d] : 0;
    for (int p = 0; p < nkp; p++)
        j->kn.tile(qp, kp + (size_t)p * hd * GEMM_NR, hd, S + p * GEMM_NR, np, mr, GEMM_NR, 0);
    for (int i = 0; i < GEMM_MR; i++) {
        if (i < mr)
            sum[i] = causal_softmax(j->vec, S + (size_t)i * np, r->s0 + i0 + i, nk);
        else
            memset(S + (size_t)i * np, 0, (size_t)nk * sizeof(float));
    }
    j->vec->transpose(pt, GEMM_MR, S, np, GEMM_MR, nk);
    float *o = j->out + (size_t)(r->t0 + i0) * j->width + (size_t)h * hd;
    for (int p = 0; p < j->nvp; p++) {
        int nr = hd - p * GEMM_NR < GEMM_NR ? hd - p * GEMM_NR : GEMM_NR;
        j->kn.tile(pt, vp + (size_t)p * keys_of(r) * GEMM_NR, nk, o + p * GEMM_NR, j->width, mr, nr,
                   0);
    }
    for (int i = 0; i < mr; i++)
        cvlm_cpu_scale_out(o + (size_t)i * j->width, hd, sum[i]);
}

/* ---- planning -------------------------------------------------------------------------- */

/* Splits the batch into runs (>= GEMM_MR consecutive slots of one sequence) and leftover
 * tokens; returns the scratch floats the runs need, or 0 if there are none. */
static size_t plan(struct paged_job *j, int32_t *left, struct run *runs)
{
    const struct cvlm_attn_batch *b = j->b;
    size_t at = 0, max_np = 0, max_nk = 0;
    j->n_runs = j->n_left = j->n_qb = 0;
    for (int t = 0; t < b->n_tokens;) {
        int e = t + 1;
        while (e < b->n_tokens && b->seq[e] == b->seq[t] && b->slot[e] == b->slot[e - 1] + 1)
            e++;
        if (e - t < GEMM_MR) {
            for (int i = t; i < e; i++)
                left[j->n_left++] = i;
        } else {
            struct run *r = &runs[j->n_runs++];
            *r = (struct run){t, e - t, b->seq[t], b->slot[t], j->n_qb, 0, 0};
            j->n_qb += (e - t + GEMM_MR - 1) / GEMM_MR;
            r->kp = at;
            r->vp = at + (size_t)j->Hkv * kp_size(j, r);
            at = r->vp + (size_t)j->Hkv * vp_size(j, r);
            size_t nk = (size_t)keys_of(r), np = (nk + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
            max_np = np > max_np ? np : max_np;
            max_nk = nk > max_nk ? nk : max_nk;
        }
        t = e;
    }
    j->tls_stride = (size_t)GEMM_MR * (max_np + (size_t)j->hd + max_nk) + 16;
    if (j->tls_stride < (size_t)16 * j->hd + 16) /* pack_task's widened key rows */
        j->tls_stride = (size_t)16 * j->hd + 16;
    return j->n_runs ? at : 0;
}

/* Moves the per-token path's tokens to the split path (j->split_tok, their first items) and
 * groups the heads so that there are at least two tasks per thread; returns the floats the
 * split path needs (partial results and each thread's chunk scores), 0 without tokens. */
static size_t split_tokens(struct paged_job *j, int32_t *left)
{
    int bs = j->b->block_size, nt = j->nt;
    j->chunk = (CHUNK_SLOTS + bs - 1) / bs * bs;
    j->n_split = j->n_items = j->multi = 0;
    j->n_groups = 1;
    if (!j->split_tok)
        return 0;
    for (int i = 0; i < j->n_left; i++) {
        int t = left[i], c = (j->b->slot[t] + j->chunk) / j->chunk; /* chunks of slot + 1 */
        j->split_item[j->n_split] = j->n_items;
        j->split_tok[j->n_split++] = t;
        j->n_items += c;
        j->multi |= c > 1;
    }
    j->n_left = 0;
    j->split_item[j->n_split] = j->n_items;
    if (!j->n_items)
        return 0;
    if (j->n_items < 2 * nt) {
        j->n_groups = (2 * nt + j->n_items - 1) / j->n_items;
        j->n_groups = j->n_groups < j->Hkv ? j->n_groups : j->Hkv;
    }
    return (size_t)j->n_items * j->H * (j->hd + 2) + (size_t)nt * j->H * j->chunk;
}

void cvlm_cpu_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                              const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                              int n_heads, int head_dim)
{
    struct cpu_backend *cb = cpu_of(be);
    int nt = cvlm_pool_size(cb->pool), n = b->n_tokens;
    int Hkv = b->n_kv_heads > 0 ? b->n_kv_heads : n_heads;
    struct paged_job j = {.out = out,
                          .q = q,
                          .stride = stride,
                          .H = n_heads,
                          .hd = head_dim,
                          .width = n_heads * head_dim,
                          .Hkv = Hkv,
                          .kvw = Hkv * head_dim,
                          .group = n_heads / Hkv,
                          .scale = 1.0f / sqrtf((float)head_dim),
                          .nvp = (head_dim + GEMM_NR - 1) / GEMM_NR,
                          .kv = kv,
                          .b = b,
                          .vec = cb->vec,
                          .kn = cvlm_cpu_gemm_kernels(cb->isa),
                          .max_ctx = 1,
                          .nt = nt};
    int32_t *left = malloc((size_t)n * sizeof(int32_t));
    struct run *runs = malloc((size_t)(n / GEMM_MR + 1) * sizeof(struct run));
    j.split_tok = malloc((size_t)(2 * n + 1) * sizeof(int32_t));
    j.split_item = j.split_tok ? j.split_tok + n : NULL;
    for (int t = 0; t < n; t++)
        j.max_ctx = b->slot[t] + 1 > j.max_ctx ? b->slot[t] + 1 : j.max_ctx;
    size_t pack = left && runs && j.split_tok ? plan(&j, left, runs) : 0;
    size_t need = pack ? pack + (size_t)nt * j.tls_stride : 0, part = split_tokens(&j, left);
    float *s = left && runs && j.split_tok
                   ? cvlm_cpu_scratch(cb, need + (size_t)nt * j.max_ctx + part)
                   : NULL;
    if (s) {
        j.runs = runs;
        j.pack = s;
        j.tls = s + pack;
        j.scratch = s + need;
        j.part = j.scratch + (size_t)nt * j.max_ctx;
        j.cscratch = j.part + (size_t)j.n_items * n_heads * (head_dim + 2);
        if (j.n_runs) {
            cvlm_pool_run(cb->pool, j.n_runs * Hkv, pack_task, &j);
            cvlm_pool_run(cb->pool, j.n_qb * n_heads, block_task, &j);
        }
        if (j.n_items)
            cvlm_pool_run(cb->pool, j.n_items * j.n_groups, chunk_task, &j);
        if (j.multi)
            cvlm_pool_run(cb->pool, j.n_split * n_heads, merge_task, &j);
    } else if ((j.scratch = cvlm_cpu_scratch(cb, (size_t)nt * j.max_ctx))) {
        /* low memory: every token on the per-token path, in order */
        j.n_left = n;
        cvlm_pool_run(cb->pool, n * n_heads, token_task, &j);
    }
    free(left);
    free(runs);
    free(j.split_tok);
}
