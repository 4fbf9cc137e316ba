/* model_rank.c - THE CogVLM definition: vision tower, GLU adapter and the visual-expert LLaMA
 * decoder, written once against the backend op table (backend.h), for one tensor-parallel
 * rank (model_rank.h; engine/model/model_group.c drives the ranks).
 *
 * Tensor parallelism (cogvlm-model.md §8): a rank holds H/tp heads and I/tp MLP columns
 * (weights_shard.c). Widths below: D, d the full hidden sizes; Dl = D/tp the rank's
 * attention width (its heads), KVl = Hkv*hd/tp its KV width (= Dl unless the model has
 * grouped-query attention, CogVLM2), Il = I/tp its MLP width, and likewise dl, Fl in the ViT.
 * Rows: T = max_tokens (n of them used in a step), N = num_patches + 1 ViT rows (CLS
 * first), np = num_patches, na = the adapter's rows (np, or CogVLM2's conv outputs np/4).
 * Every buffer's shape is written at struct cvlm_rank; the op table checks them at entry
 * in debug and sanitized builds (backend_check.h).
 * The residual stream x is full width and identical on all ranks; the row-parallel GEMMs
 * (dense, down, ViT dense and fc2) produce partial sums that one all-reduce completes
 * before they are added to it. With tp == 1 the all-reduce is a no-op.
 *
 * Expert routing (cogvlm-model.md §4.2): at the start of a step the tokens are permuted
 * once so that all language-expert tokens come first and all vision-expert tokens after
 * them; every per-token op then runs on the permuted rows, and each expert's GEMMs run on
 * one contiguous group. Only the embedding lookup (done directly in permuted order) and
 * the logits rows (gathered back in batch order) see the permutation.
 *
 * Ownership: the model borrows the weights and the backend (both must outlive it) and
 * owns the activation arena, the KV cache memory and host scratch, sized at creation.
 */
#include "engine/model/model_rank.h"

#include "engine/error.h"
#include "engine/model/vision2.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LOGIT_ROWS 64 /* lm_head rows computed per chunk */

struct cvlm_rank {
    struct cvlm_weights *w; /* this rank's shard */
    const struct cvlm_config *c;
    struct cvlm_backend *be;
    const struct cvlm_backend_i *op;
    struct cvlm_comm *comm;
    int comm_rc;        /* the first failed all-reduce since the last status */
    char comm_err[256]; /* ... and where it was (file:line) */
    int rank, tp;
    int Dl, Hl, Il, dl, vHl, Fl; /* the rank's widths (see the top of the file) */
    int Hkvl, KVl;               /* the rank's KV heads and their width (GQA) */
    int max_tokens, block_size, kv_blocks;
    float *inv_freq;          /* [head_dim/2] host */
    struct cvlm_kv_layer *kv; /* [num_layers], k and v [kv_blocks, block_size, KVl] each */
    /* LM arena in backend memory; T = max_tokens, rows in permuted order (experts
     * grouped). Only the first n rows of a step are used. */
    void *x; /* [T, D] residual stream, full width on every rank */
    /* [T, D] the sub-layer branch: RMS(x) going in; the attention dense / MLP down output
     * coming out (partial sums until the all-reduce); at the end the final-normed rows
     * whose logits are wanted */
    void *branch;
    void *qkv;          /* [T, Dl + 2*KVl] this rank's heads, [q | k | v], RoPE'd in place */
    void *attn_out;     /* [T, Dl] attention output of this rank's heads */
    void *mlp_gate;     /* [T, Il] gate(h), then silu(gate) * up in place */
    void *mlp_up;       /* [T, Il] up(h) */
    void *logits_chunk; /* [LOGIT_ROWS, V] lm_head output, rank 0 only */
    /* host scratch for the per-token metadata, [T] each: perm[q] is the batch index of
     * permuted row q, inv its inverse; *_p the batch's arrays in permuted order */
    int32_t *perm, *inv, *ids_p, *pos_p, *seq_p, *slot_p, *img_p;
    int32_t *logit_rows; /* [T] permuted rows whose logits are wanted */
    float *dbg;          /* [2, T, D] host, allocated on first debug use */
    /* vision arena in backend memory (one image); N = num_patches + 1 (CLS first),
     * np = num_patches */
    void *vit_x;        /* [N, d] ViT residual stream */
    void *vit_qkv;      /* [N, 3*dl] this rank's heads, [q | k | v] */
    void *vit_attn_out; /* [N, dl] */
    /* [N, d] the branch output: position embeddings at the start, then dense / fc2
     * (partial sums until the all-reduce), LayerNorm'd in place */
    void *vit_branch;
    void *vit_mlp;        /* [N, Fl] fc1, GELU in place */
    void *vit_patches;    /* [np, C*P*P] patchified pixels, the patch conv's GEMM input */
    void *adapter_x;      /* [na, D] proj of its input rows, LayerNorm'd and GELU'd in place */
    void *adapter_gate;   /* [na, I] glu gate, then silu(gate) * up in place */
    void *adapter_up;     /* [na, I] glu up */
    int32_t *vit_pos_ids; /* [N] host: 0..N-1, the position-embedding rows */
    /* CogVLM2's conv (vision2.h): patch rows gathered per output token, and its output */
    void *conv_in;      /* [na, 4*d] */
    void *conv_out;     /* [na, d] */
    int32_t *conv_rows; /* [4*na] host: the gather */
};

/* All-reduce of n activations across the ranks (engine/comm.h). Every rank calls it (a
 * rank that skipped one would leave the others waiting); the first failure is kept with
 * its file:line and fails the step through cvlm_rank_comm_status(). */
#define ALLREDUCE(m, buf, n) allreduce_checked((m), (buf), (n), __FILE__, __LINE__)
static void allreduce_checked(struct cvlm_rank *m, void *buf, size_t n, const char *file, int line)
{
    int rc = cvlm_comm_allreduce(m->comm, buf, n);
    if (rc && !m->comm_rc) {
        m->comm_rc = rc;
        snprintf(m->comm_err, sizeof(m->comm_err), "%s:%d: all-reduce of %zu values: %s", file,
                 line, n, cvlm_last_error());
    }
}

int cvlm_rank_comm_status(struct cvlm_rank *m)
{
    int rc = m->comm_rc;
    m->comm_rc = 0;
    return rc ? cvlm_errf(rc, "%s", m->comm_err) : 0;
}

/* ---- creation ------------------------------------------------------------------------ */

static void *arena(struct cvlm_rank *m, size_t rows, size_t width, int *fail)
{
    void *p = m->op->alloc(m->be, rows * width * cvlm_dtype_size(m->be->act_dtype));
    *fail |= p == NULL;
    return p;
}

static int init_inv_freq(struct cvlm_rank *m, enum cvlm_rope_freq mode)
{
    const struct cvlm_tensor *f = &m->w->layers[0].inv_freq;
    int half = cvlm_config_head_dim(m->c) / 2;
    if (!(m->inv_freq = malloc((size_t)half * sizeof(float))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (mode == CVLM_ROPE_FREQ_FILE && !f->data)
        return cvlm_errf(CVLM_EINVAL, "rope inv_freq=file, but the checkpoint stores none");
    for (int j = 0; j < half; j++) {
        if (f->data && mode != CVLM_ROPE_FREQ_EXACT)
            m->inv_freq[j] = cvlm_tensor_get_f32(f, j);
        else /* torch: 1 / base ** (arange(0, dim, 2).float() / dim), all float32 */
            m->inv_freq[j] = 1.0f / powf(m->c->rope_theta, (float)(2 * j) / (float)(2 * half));
    }
    return 0;
}

static int alloc_lm(struct cvlm_rank *m, enum cvlm_dtype kv_dtype)
{
    const struct cvlm_config *c = m->c;
    size_t T = (size_t)m->max_tokens, D = (size_t)c->hidden_size, Dl = (size_t)m->Dl;
    size_t KVl = (size_t)m->KVl;
    size_t Il = (size_t)m->Il, kv_rows = (size_t)m->kv_blocks * (size_t)m->block_size;
    int fail = 0;
    m->x = arena(m, T, D, &fail);              /* [T, D] */
    m->branch = arena(m, T, D, &fail);         /* [T, D] */
    m->qkv = arena(m, T, Dl + 2 * KVl, &fail); /* [T, Dl + 2*KVl] */
    m->attn_out = arena(m, T, Dl, &fail);      /* [T, Dl] */
    m->mlp_gate = arena(m, T, Il, &fail);      /* [T, Il] */
    m->mlp_up = arena(m, T, Il, &fail);        /* [T, Il] */
    if (m->rank == 0)                          /* the only rank with lm_head: [LOGIT_ROWS, V] */
        m->logits_chunk = arena(m, LOGIT_ROWS, (size_t)c->vocab_size, &fail);
    m->kv = calloc((size_t)c->num_layers, sizeof(*m->kv));
    fail |= !m->kv;
    size_t kv_bytes = kv_rows * KVl * cvlm_dtype_size(kv_dtype);
    for (int l = 0; !fail && l < c->num_layers; l++) {
        m->kv[l].dtype = kv_dtype;
        m->kv[l].k = m->op->alloc(m->be, kv_bytes); /* [kv_blocks * block_size, KVl] */
        m->kv[l].v = m->op->alloc(m->be, kv_bytes); /* [kv_blocks * block_size, KVl] */
        fail |= !m->kv[l].k || !m->kv[l].v;
        if (kv_dtype == CVLM_DTYPE_Q8) { /* int8: [kv_blocks * block_size, 2, Hkvl] F32 */
            m->kv[l].scales = m->op->alloc(m->be, kv_rows * 2 * (size_t)m->Hkvl * sizeof(float));
            fail |= !m->kv[l].scales;
        }
    }
    int32_t **host[] = {&m->perm,  &m->inv,    &m->ids_p, &m->pos_p,
                        &m->seq_p, &m->slot_p, &m->img_p, &m->logit_rows}; /* [T] each */
    for (size_t i = 0; i < sizeof(host) / sizeof(host[0]); i++)
        fail |= !(*host[i] = malloc(T * sizeof(int32_t)));
    return fail ? cvlm_errf(CVLM_ENOMEM, "out of memory for the activation arena / KV cache") : 0;
}

static int alloc_vision(struct cvlm_rank *m)
{
    const struct cvlm_config *c = m->c;
    const struct cvlm_vision_config *v = &c->vision;
    if (!c->has_vision) /* a text-only model: no vision config to size anything from */
        return 0;
    size_t np = (size_t)cvlm_config_num_patches(c), N = np + 1, d = (size_t)v->hidden_size;
    size_t D = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
    size_t patch_row = (size_t)(v->in_channels * v->patch_size * v->patch_size);
    size_t na = (size_t)cvlm_config_vision_tokens(c);
    int fail = 0;
    m->vit_x = arena(m, N, d, &fail);                        /* [N, d] */
    m->vit_qkv = arena(m, N, 3 * (size_t)m->dl, &fail);      /* [N, 3*dl] */
    m->vit_attn_out = arena(m, N, (size_t)m->dl, &fail);     /* [N, dl] */
    m->vit_branch = arena(m, N, d, &fail);                   /* [N, d] */
    m->vit_mlp = arena(m, N, (size_t)m->Fl, &fail);          /* [N, Fl] */
    m->vit_patches = arena(m, np, patch_row, &fail);         /* [np, C*P*P] */
    m->adapter_x = arena(m, na, D, &fail);                   /* [na, D] */
    m->adapter_gate = arena(m, na, I, &fail);                /* [na, I] */
    m->adapter_up = arena(m, na, I, &fail);                  /* [na, I] */
    fail |= !(m->vit_pos_ids = malloc(N * sizeof(int32_t))); /* [N] host */
    for (size_t i = 0; !fail && i < N; i++)
        m->vit_pos_ids[i] = (int32_t)i;
    if (!fail && cvlm_config_has_conv(c)) {
        m->conv_in = arena(m, na, 4 * d, &fail);                    /* [na, 4*d] */
        m->conv_out = arena(m, na, d, &fail);                       /* [na, d] */
        fail |= !(m->conv_rows = malloc(4 * na * sizeof(int32_t))); /* [4*na] host */
        if (!fail)
            cvlm_vision2_conv_rows(v->image_size / v->patch_size, m->conv_rows);
    }
    return fail ? cvlm_errf(CVLM_ENOMEM, "out of memory for the vision arena") : 0;
}

/* Collects every weight slot of the shard for upload_weights. */
struct slots {
    struct cvlm_tensor **t;
    int n, cap;
};

static int collect(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                   const int64_t *shape, int optional)
{
    struct slots *s = ctx;
    (void)name, (void)ndim, (void)shape, (void)optional;
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 256;
        struct cvlm_tensor **t = realloc(s->t, (size_t)cap * sizeof(*t));
        if (!t)
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
        s->t = t;
        s->cap = cap;
    }
    s->t[s->n++] = slot;
    return 0;
}

/* Moves the shard into backend memory (after init_inv_freq, which reads it on the host). */
static int upload(struct cvlm_rank *m)
{
    struct slots s = {0};
    int rc = cvlm_weights_visit(m->w, collect, &s);
    /* the same seed on every rank: generated replicated tensors (embeddings, norms) agree */
    if (!rc)
        rc = m->op->upload_weights(m->be, s.t, s.n, 0x5eed0000u);
    free(s.t);
    return rc;
}

int cvlm_rank_create(struct cvlm_weights *shard, struct cvlm_backend *be, struct cvlm_comm *comm,
                     const struct cvlm_model_opts *o, struct cvlm_rank **out)
{
    struct cvlm_rank *m = calloc(1, sizeof(*m));
    int rc;
    *out = NULL;
    if (!m)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    m->w = shard;
    m->c = &shard->cfg;
    m->be = be;
    m->op = be->ops;
    m->comm = comm;
    m->rank = comm->rank;
    m->tp = comm->size;
    m->Dl = m->c->hidden_size / m->tp;
    m->Hl = m->c->num_heads / m->tp;
    m->Hkvl = cvlm_config_kv_heads(m->c) / m->tp;
    m->KVl = m->Hkvl * cvlm_config_head_dim(m->c);
    m->Il = m->c->intermediate_size / m->tp;
    if (m->c->has_vision) {
        m->dl = m->c->vision.hidden_size / m->tp;
        m->vHl = m->c->vision.num_heads / m->tp;
        m->Fl = m->c->vision.intermediate_size / m->tp;
    }
    m->max_tokens = o->max_tokens > 0 ? o->max_tokens : 512;
    m->block_size = o->block_size > 0 ? o->block_size : 16;
    m->kv_blocks =
        o->kv_blocks > 0 ? o->kv_blocks : (m->max_tokens * 4 + m->block_size - 1) / m->block_size;
    if ((rc = init_inv_freq(m, o->rope_freq)) || (rc = cvlm_vision2_prepare(shard)) ||
        (rc = upload(m)) ||
        (rc = alloc_lm(m, o->kv_cache_dtype ? cvlm_model_kv_dtype_of(o->kv_cache_dtype)
                                            : m->be->act_dtype)) ||
        (rc = alloc_vision(m))) {
        cvlm_rank_destroy(m);
        return rc;
    }
    *out = m;
    return 0;
}

void cvlm_rank_destroy(struct cvlm_rank *m)
{
    if (!m)
        return;
    void *dev[] = {m->x,          m->branch,       m->qkv,         m->attn_out,  m->mlp_gate,
                   m->mlp_up,     m->logits_chunk, m->vit_x,       m->vit_qkv,   m->vit_attn_out,
                   m->vit_branch, m->vit_mlp,      m->vit_patches, m->adapter_x, m->adapter_gate,
                   m->adapter_up, m->conv_in,      m->conv_out};
    for (size_t i = 0; i < sizeof(dev) / sizeof(dev[0]); i++)
        if (dev[i])
            m->op->free(m->be, dev[i]);
    for (int l = 0; m->kv && l < m->c->num_layers; l++) {
        if (m->kv[l].k)
            m->op->free(m->be, m->kv[l].k);
        if (m->kv[l].v)
            m->op->free(m->be, m->kv[l].v);
        if (m->kv[l].scales)
            m->op->free(m->be, m->kv[l].scales);
    }
    free(m->kv);
    void *host[] = {m->inv_freq, m->perm,  m->inv,        m->ids_p, m->pos_p,       m->seq_p,
                    m->slot_p,   m->img_p, m->logit_rows, m->dbg,   m->vit_pos_ids, m->conv_rows};
    for (size_t i = 0; i < sizeof(host) / sizeof(host[0]); i++)
        free(host[i]);
    free(m);
}

int cvlm_rank_block_size(const struct cvlm_rank *m)
{
    return m->block_size;
}
int cvlm_rank_kv_blocks(const struct cvlm_rank *m)
{
    return m->kv_blocks;
}
int cvlm_rank_max_tokens(const struct cvlm_rank *m)
{
    return m->max_tokens;
}

/* A bias a rank may lack (row-parallel biases live on rank 0 only). */
static const struct cvlm_tensor *opt(const struct cvlm_tensor *t)
{
    return t->data ? t : NULL;
}

/* ---- vision tower + adapter -------------------------------------------------------- */

/* One ViT block on the N rows of the image (CLS + patches). */
static void vit_layer(struct cvlm_rank *m, const struct cvlm_vit_layer *L, int N)
{
    const struct cvlm_backend_i *op = m->op;
    const struct cvlm_vision_config *v = &m->c->vision;
    int d = v->hidden_size, dl = m->dl, Fl = m->Fl, hd = d / v->num_heads;
    float eps = v->layer_norm_eps;
    void *x = m->vit_x;          /* [N, d] */
    void *qkv = m->vit_qkv;      /* [N, 3*dl] */
    void *att = m->vit_attn_out; /* [N, dl] */
    void *br = m->vit_branch;    /* [N, d] */
    void *mlp = m->vit_mlp;      /* [N, Fl] */
    /* x = x + LN_in(dense(attn(qkv(x))))   -- the norm is on the branch output, so it
     * comes after the all-reduce of dense's partial sums */
    op->gemm(m->be, qkv, x, d, &L->qkv_w, &L->qkv_b, N, 3 * dl, d);
    op->attention_full(m->be, att, qkv, N, m->vHl, hd);
    op->gemm(m->be, br, att, dl, &L->dense_w, opt(&L->dense_b), N, d, dl);
    ALLREDUCE(m, br, (size_t)N * d);
    op->layernorm(m->be, br, br, &L->ln_in_w, &L->ln_in_b, N, d, eps);
    op->add(m->be, x, br, (size_t)N * d);
    /* x = x + LN_post(fc2(gelu(fc1(x)))) */
    op->gemm(m->be, mlp, x, d, &L->fc1_w, &L->fc1_b, N, Fl, d);
    op->gelu(m->be, mlp, (size_t)N * Fl);
    op->gemm(m->be, br, mlp, Fl, &L->fc2_w, opt(&L->fc2_b), N, d, Fl);
    ALLREDUCE(m, br, (size_t)N * d);
    op->layernorm(m->be, br, br, &L->ln_post_w, &L->ln_post_b, N, d, eps);
    op->add(m->be, x, br, (size_t)N * d);
}

/* GLU adapter on its np input rows `patches` [np, d] (the patch rows, CLS dropped, or
 * CogVLM2's conv output): feats rows 1..np; boi/eoi around them. */
static void adapter(struct cvlm_rank *m, void *feats, const void *patches, int np)
{
    const struct cvlm_backend_i *op = m->op;
    const struct cvlm_weights *w = m->w;
    int d = m->c->vision.hidden_size, D = m->c->hidden_size, I = m->c->intermediate_size;
    int32_t zero = 0;
    void *h = m->adapter_x;                              /* [np, D] */
    void *gate = m->adapter_gate, *up = m->adapter_up;   /* [np, I] */
    void *out = cvlm_be_row(m->be, feats, 1, (size_t)D); /* [np, D] */
    /* h = gelu(LN(proj(patches))); out = down(silu(gate(h)) * up(h)) */
    op->gemm(m->be, h, patches, d, &w->proj, NULL, np, D, d);
    /* norm1 uses PyTorch's default LayerNorm eps 1e-5, not the ViT's eps (spec §3.5) */
    op->layernorm(m->be, h, h, &w->proj_norm_w, &w->proj_norm_b, np, D, 1e-5f);
    op->gelu(m->be, h, (size_t)np * D);
    op->gemm(m->be, gate, h, D, &w->glu_gate, NULL, np, I, D);
    op->gemm(m->be, up, h, D, &w->glu_up, NULL, np, I, D);
    op->silu_mul(m->be, gate, gate, up, I, np, I);
    op->gemm(m->be, out, gate, I, &w->glu_down, NULL, np, D, I);
    /* feats [np + 2, D] = [boi; out; eoi] */
    op->embed(m->be, feats, &w->boi, &zero, 1, D);
    op->embed(m->be, cvlm_be_row(m->be, feats, (size_t)np + 1, (size_t)D), &w->eoi, &zero, 1, D);
}

void cvlm_rank_encode_image(struct cvlm_rank *m, const float *pixels, struct cvlm_feats *f,
                            float *vit_out)
{
    void *feats = f->buf[m->rank]; /* [np + 2, D] */
    const struct cvlm_backend_i *op = m->op;
    const struct cvlm_weights *w = m->w;
    const struct cvlm_vision_config *v = &m->c->vision;
    int np = cvlm_config_num_patches(m->c), N = np + 1, d = v->hidden_size;
    int P = v->patch_size, S = v->image_size, C = v->in_channels, row = C * P * P;
    int32_t zero = 0;
    void *x = m->vit_x;                                    /* [N, d], CLS first */
    void *x_patches = cvlm_be_row(m->be, x, 1, (size_t)d); /* [np, d] */
    /* patch conv as a GEMM: the [d, C, P, P] kernel is a row-major [d, C*P*P] matrix */
    struct cvlm_tensor pw = w->patch_w;
    pw.ndim = 2;
    pw.shape[1] = row;
    op->patchify(m->be, m->vit_patches, pixels, C, S, S, P); /* [np, C*P*P] */
    op->gemm(m->be, x_patches, m->vit_patches, row, &pw, &w->patch_b, np, d, row);
    op->embed(m->be, x, &w->cls, &zero, 1, d);
    /* x += pos[0..N) (gathered into the branch buffer first) */
    op->embed(m->be, m->vit_branch, &w->pos, m->vit_pos_ids, N, d);
    op->add(m->be, x, m->vit_branch, (size_t)N * d);
    for (int j = 0; j < v->num_layers; j++)
        vit_layer(m, &w->vit[j], N);
    if (vit_out)
        op->to_host(m->be, vit_out, x, (size_t)N * d);
    if (!cvlm_config_has_conv(m->c)) {
        adapter(m, feats, x_patches, np);
        return;
    }
    /* CogVLM2: 2x2 stride-2 conv over the patch grid (vision2.h), replicated on every
     * rank: conv_out [na, d] = gather(x)[na, 4*d] . conv_w[d, 4*d]^T + conv_b */
    int na = cvlm_config_vision_tokens(m->c);
    op->copy_rows(m->be, m->conv_in, x, m->conv_rows, 4 * na, d);
    op->gemm(m->be, m->conv_out, m->conv_in, 4 * d, &w->conv_w, &w->conv_b, na, d, 4 * d);
    adapter(m, feats, m->conv_out, na);
}

/* ---- language model ------------------------------------------------------------------ */

/* Rejects metadata that would make a kernel read or write outside the KV cache. */
int cvlm_rank_check_batch(const struct cvlm_rank *m, const struct cvlm_batch *b)
{
    if (b->n_tokens <= 0 || b->n_tokens > m->max_tokens)
        return cvlm_errf(CVLM_EINVAL, "batch of %d tokens (1..%d)", b->n_tokens, m->max_tokens);
    for (int s = 0; s < b->n_seqs; s++)
        for (int i = 0; i < b->seqs[s].n_blocks; i++)
            if (b->seqs[s].block_table[i] < 0 || b->seqs[s].block_table[i] >= m->kv_blocks)
                return cvlm_errf(CVLM_EINVAL, "block %d out of range", b->seqs[s].block_table[i]);
    for (int t = 0; t < b->n_tokens; t++) {
        if (b->seq[t] < 0 || b->seq[t] >= b->n_seqs || b->slot[t] < 0 ||
            b->slot[t] >= b->seqs[b->seq[t]].n_blocks * m->block_size)
            return cvlm_errf(CVLM_EINVAL, "token %d: sequence/slot outside its block table", t);
        if ((!b->img_row || b->img_row[t] < 0) && (b->ids[t] < 0 || b->ids[t] >= m->c->vocab_size))
            return cvlm_errf(CVLM_EINVAL, "token id %d outside the vocabulary", b->ids[t]);
        if (b->img_row && b->img_row[t] >= cvlm_config_image_tokens(m->c))
            return cvlm_errf(CVLM_EINVAL, "image row %d outside the image", b->img_row[t]);
        if (b->img_row && b->img_row[t] >= 0 && (!b->img_feats || !b->img_feats[b->seq[t]]))
            return cvlm_errf(CVLM_EINVAL, "image slots without image features");
    }
    return 0;
}

/* Language-expert tokens first, then vision-expert ones; returns the language count. */
static int permute(struct cvlm_rank *m, const struct cvlm_batch *b)
{
    int n = b->n_tokens, nl = 0, p = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < n; i++)
            if ((b->expert[i] == CVLM_EXPERT_VISION) == pass)
                m->perm[p++] = i;
    for (int i = 0; i < n; i++)
        nl += b->expert[i] != CVLM_EXPERT_VISION;
    for (int q = 0; q < n; q++) {
        int i = m->perm[q];
        m->inv[i] = q;
        m->ids_p[q] = b->img_row && b->img_row[i] >= 0 ? 0 : b->ids[i];
        m->pos_p[q] = b->pos[i];
        m->seq_p[q] = b->seq[i];
        m->slot_p[q] = b->slot[i];
        m->img_p[q] = b->img_row ? b->img_row[i] : -1;
    }
    return nl;
}

/* y = x . W[e]^T (+ bias[e] where the expert has one: CogVLM2's vision QKV) with the
 * language weights on rows [0, nl) and vision on [nl, n). */
static void expert_gemm_b(struct cvlm_rank *m, void *y, const void *x, const struct cvlm_tensor *w,
                          const struct cvlm_tensor *bias, int n, int nl, int N, int K)
{
    const struct cvlm_tensor *bl = bias ? opt(&bias[CVLM_EXPERT_LANG]) : NULL;
    const struct cvlm_tensor *bv = bias ? opt(&bias[CVLM_EXPERT_VISION]) : NULL;
    if (nl)
        m->op->gemm(m->be, y, x, K, &w[CVLM_EXPERT_LANG], bl, nl, N, K);
    if (n > nl)
        m->op->gemm(m->be, cvlm_be_row(m->be, y, (size_t)nl, (size_t)N),
                    cvlm_be_row(m->be, x, (size_t)nl, (size_t)K), K, &w[CVLM_EXPERT_VISION], bv,
                    n - nl, N, K);
}

static void expert_gemm(struct cvlm_rank *m, void *y, const void *x, const struct cvlm_tensor *w,
                        int n, int nl, int N, int K)
{
    expert_gemm_b(m, y, x, w, NULL, n, nl, N, K);
}

/* Debug hook: the residual stream of the permuted rows, handed over in batch order. */
static void debug_rows(struct cvlm_rank *m, const struct cvlm_batch *b, int layer, const void *x,
                       int n, const int32_t *order)
{
    size_t D = (size_t)m->c->hidden_size;
    if (!b->on_hidden || m->rank)
        return;
    if (!m->dbg && !(m->dbg = malloc(2 * (size_t)m->max_tokens * D * sizeof(float))))
        return;
    float *dev = m->dbg, *out = m->dbg + (size_t)m->max_tokens * D;
    m->op->to_host(m->be, dev, x, (size_t)n * D);
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * D, dev + (size_t)(order ? order[i] : i) * D, D * sizeof(float));
    b->on_hidden(b->dbg_ctx, layer, out, n, (int)D);
}

/* x += r; y = RMS(x) * w, fused where the backend can (one pass over the residual). */
static void add_norm(struct cvlm_rank *m, void *y, void *x, const void *r,
                     const struct cvlm_tensor *w, int n)
{
    int D = m->c->hidden_size;
    if (m->op->add_rmsnorm) {
        m->op->add_rmsnorm(m->be, y, x, r, w, n, D, m->c->rms_norm_eps);
        return;
    }
    m->op->add(m->be, x, r, (size_t)n * D);
    m->op->rmsnorm(m->be, y, x, w, n, D, m->c->rms_norm_eps);
}

/* On entry h = RMS(x) with this layer's input norm (the previous layer, or the caller for
 * layer 0, computed it with the residual add); on return x is the layer's output and, if
 * a layer follows, h = RMS(x) with its input norm. Rows are permuted: the nl language-
 * expert tokens first. */
static void decoder_layer(struct cvlm_rank *m, int l, const struct cvlm_attn_batch *ab, int nl)
{
    const struct cvlm_backend_i *op = m->op;
    const struct cvlm_lm_layer *L = &m->w->layers[l];
    int n = ab->n_tokens, D = m->c->hidden_size, Dl = m->Dl, Il = m->Il, H = m->Hl;
    int Hkv = m->Hkvl, KVl = m->KVl;
    int hd = D / m->c->num_heads, S = Dl + 2 * KVl;  /* S: the row stride of q, k and v */
    void *x = m->x;                                  /* [n, D] residual stream */
    void *h = m->branch;                             /* [n, D] sub-layer input, then output */
    void *q = m->qkv;                                /* [n, Dl] rows S apart */
    void *k = cvlm_be_row(m->be, q, 1, (size_t)Dl);  /* [n, KVl] rows S apart */
    void *v = cvlm_be_row(m->be, k, 1, (size_t)KVl); /* [n, KVl] rows S apart */
    void *att = m->attn_out;                         /* [n, Dl] */
    void *gate = m->mlp_gate, *up = m->mlp_up;       /* [n, Il] each */
    /* attention: qkv = W_qkv[e] h per expert; RoPE on q and k; cache k, v; attend over
     * the cache; h = dense[e] att, partial sums all-reduced across ranks */
    expert_gemm_b(m, q, h, L->qkv, L->qkv_b, n, nl, S, D);
    op->rope(m->be, q, S, m->pos_p, n, H, hd, m->inv_freq);
    op->rope(m->be, k, S, m->pos_p, n, Hkv, hd, m->inv_freq);
    op->kv_write(m->be, &m->kv[l], k, v, S, ab, Hkv, hd);
    op->attention_paged(m->be, att, q, S, &m->kv[l], ab, H, hd); /* ab: Hkv KV heads */
    expert_gemm(m, h, att, L->dense, n, nl, D, Dl);
    ALLREDUCE(m, h, (size_t)n * D);
    add_norm(m, h, x, h, &L->post_norm, n); /* x += h; h = RMS(x) */
    /* MLP: x += down(silu(gate(h)) * up(h)), h = RMS(x), per expert; one all-reduce */
    expert_gemm(m, gate, h, L->gate, n, nl, Il, D);
    expert_gemm(m, up, h, L->up, n, nl, Il, D);
    op->silu_mul(m->be, gate, gate, up, Il, n, Il);
    expert_gemm(m, h, gate, L->down, n, nl, D, Il);
    ALLREDUCE(m, h, (size_t)n * D);
    if (l + 1 < m->c->num_layers)
        add_norm(m, h, x, h, &m->w->layers[l + 1].input_norm, n);
    else
        op->add(m->be, x, h, (size_t)n * D);
}

/* Replaces the embeddings of image slots by their feature rows, one copy per run of
 * consecutive permuted rows of the same sequence. */
static void splice_image(struct cvlm_rank *m, const struct cvlm_batch *b, int n)
{
    int D = m->c->hidden_size;
    for (int q = 0; q < n;) {
        if (m->img_p[q] < 0) {
            q++;
            continue;
        }
        int e = q, s = m->seq_p[q];
        while (e < n && m->img_p[e] >= 0 && m->seq_p[e] == s)
            e++;
        const struct cvlm_feats *f = b->img_feats[s]; /* checked non-NULL */
        m->op->copy_rows(m->be, cvlm_be_row(m->be, m->x, (size_t)q, (size_t)D), f->buf[m->rank],
                         m->img_p + q, e - q, D);
        q = e;
    }
}

static void logits_out(struct cvlm_rank *m, const struct cvlm_batch *b, float *logits)
{
    int n = b->n_tokens, D = m->c->hidden_size, V = m->c->vocab_size, k = 0;
    for (int i = 0; i < n; i++)
        if (b->want_logits ? b->want_logits[i] : i == n - 1)
            m->logit_rows[k++] = m->inv[i];
    /* final norm on the wanted rows only (gathered into the branch buffer h [k, D]), then
     * lm_head in chunks of LOGIT_ROWS rows */
    void *h = m->branch;
    m->op->copy_rows(m->be, h, m->x, m->logit_rows, k, D);
    m->op->rmsnorm(m->be, h, h, &m->w->final_norm, k, D, m->c->rms_norm_eps);
    debug_rows(m, b, m->c->num_layers, h, k, NULL);
    for (int r = 0; r < k; r += LOGIT_ROWS) {
        int cnt = k - r < LOGIT_ROWS ? k - r : LOGIT_ROWS;
        m->op->gemm(m->be, m->logits_chunk, cvlm_be_row(m->be, h, (size_t)r, (size_t)D), D,
                    &m->w->lm_head, NULL, cnt, V, D); /* [cnt, V] */
        m->op->to_host(m->be, logits + (size_t)r * V, m->logits_chunk, (size_t)cnt * V);
    }
}

void cvlm_rank_forward(struct cvlm_rank *m, const struct cvlm_batch *b, float *logits)
{
    int D = m->c->hidden_size, n = b->n_tokens, nl = permute(m, b);
    struct cvlm_attn_batch ab = {n, m->seq_p, m->slot_p, b->seqs, m->block_size, m->Hkvl};
    /* x [n, D] = embeddings (image slots: their feature rows); h = RMS(x) for layer 0 */
    m->op->embed(m->be, m->x, &m->w->embed, m->ids_p, n, D);
    splice_image(m, b, n);
    m->op->rmsnorm(m->be, m->branch, m->x, &m->w->layers[0].input_norm, n, D, m->c->rms_norm_eps);
    for (int l = 0; l < m->c->num_layers; l++) {
        debug_rows(m, b, l, m->x, n, m->inv);
        decoder_layer(m, l, &ab, nl);
    }
    if (m->rank == 0)
        logits_out(m, b, logits);
}
