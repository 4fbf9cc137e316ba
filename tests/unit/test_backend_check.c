/* test_backend_check.c - the op table's entry checks (engine/model/backend_check.h).
 *
 * Correct calls go through unchanged: a sequence of every kind of op on a checked CPU
 * backend gives bit-identical results to the same sequence on a plain one, and the whole
 * model (vision tower, adapter, decoder, logits) is bit-identical with the checks on and
 * off. Wrong calls are caught before the kernel runs (its output stays untouched), fail
 * status() once with a message naming the op and the mismatch, and later calls work
 * again: wrong shapes (GEMM weight, norm weight, buffer extents, token ids, KV blocks),
 * wrong dtypes, misaligned, foreign, freed and NULL pointers, and forbidden aliasing.
 */
#include "engine/error.h"
#include "engine/model/backend_check.h"
#include "engine/model/model.h"
#include "tests/unit/harness.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ---- helpers ------------------------------------------------------------------------- */

static float val(size_t i, int salt) /* deterministic values in [-1, 1) */
{
    uint32_t h = (uint32_t)(i * 2654435761u) ^ (uint32_t)(salt * 40503u);
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    return (float)(h & 0xffff) / 32768.0f - 1.0f;
}

/* A backend buffer of n floats filled with val(., salt). */
static void *buf(struct cvlm_backend *be, size_t n, int salt)
{
    float *h = malloc(n * sizeof(float));
    void *p = be->ops->alloc(be, n * sizeof(float));
    for (size_t i = 0; h && i < n; i++)
        h[i] = val(i, salt);
    if (p && h)
        be->ops->from_host(be, p, h, n);
    free(h);
    return p;
}

/* A host weight [rows, cols] (cols 0: 1-D) in BF16 or F32. */
static struct cvlm_tensor weight(enum cvlm_dtype dt, int rows, int cols, int salt)
{
    size_t n = (size_t)rows * (size_t)(cols ? cols : 1);
    struct cvlm_tensor t = {.dtype = dt, .ndim = cols ? 2 : 1, .shape = {rows, cols}};
    void *d = malloc(n * cvlm_dtype_size(dt));
    for (size_t i = 0; i < n; i++) {
        if (dt == CVLM_DTYPE_F32)
            ((float *)d)[i] = val(i, salt) * 0.1f;
        else
            ((uint16_t *)d)[i] = cvlm_f32_to_bf16(val(i, salt) * 0.1f);
    }
    t.data = d;
    return t;
}

static void drop(struct cvlm_tensor *t)
{
    free((void *)t->data);
}

/* Status of a checked backend: the code, and whether the message names `op` and `what`. */
static int failed_with(struct cvlm_backend *be, int code, const char *op, const char *what)
{
    int rc = be->ops->status(be);
    const char *msg = cvlm_last_error();
    if (rc != code || !strstr(msg, op) || (what && !strstr(msg, what))) {
        printf("  status %d (want %d): %s\n", rc, code, msg);
        return 0;
    }
    return 1;
}

/* ---- correct calls are unchanged --------------------------------------------------------- */

enum { M = 5, D = 32, H = 2, HD = 16, I = 48, V = 20, BS = 4, NB = 6 };

/* Runs one of every op on be and copies every output to host `out` (OUT_FLOATS). */
#define OUT_FLOATS (M * D * 6 + M * I + M * 3 * D + 4 * 4 * 12)
static void run_all(struct cvlm_backend *be, float *out)
{
    const struct cvlm_backend_i *op = be->ops;
    struct cvlm_tensor wq = weight(CVLM_DTYPE_BF16, 3 * D, D, 1); /* [3D, D] */
    struct cvlm_tensor bq = weight(CVLM_DTYPE_F32, 3 * D, 0, 2);  /* [3D] */
    struct cvlm_tensor wg = weight(CVLM_DTYPE_BF16, I, D, 3);     /* [I, D] */
    struct cvlm_tensor nw = weight(CVLM_DTYPE_BF16, D, 0, 4);     /* [D] */
    struct cvlm_tensor nb = weight(CVLM_DTYPE_F32, D, 0, 5);      /* [D] */
    struct cvlm_tensor emb = weight(CVLM_DTYPE_BF16, V, D, 6);    /* [V, D] */
    int32_t ids[M] = {3, 0, 19, 7, 7}, pos[M] = {0, 1, 2, 3, 4}, rows[3] = {4, 0, 2};
    int32_t seq[M] = {0, 0, 0, 0, 0}, slot[M] = {0, 1, 2, 3, 4}, bt[2] = {5, 1};
    float inv_freq[HD / 2];
    float *px = malloc(3 * 8 * 8 * sizeof(float));
    for (int j = 0; j < HD / 2; j++)
        inv_freq[j] = 1.0f / (float)(1 << j);
    for (int i = 0; i < 3 * 8 * 8; i++)
        px[i] = val((size_t)i, 9);
    void *x = buf(be, M * D, 10), *h = buf(be, M * D, 11), *qkv = buf(be, M * 3 * D, 12);
    void *att = buf(be, M * D, 13), *g = buf(be, M * I, 14), *u = buf(be, M * I, 15);
    void *e = buf(be, M * D, 16), *cr = buf(be, 3 * D, 17), *pt = buf(be, 4 * 4 * 12, 18);
    struct cvlm_kv_layer kv = {buf(be, NB * BS * D, 19), buf(be, NB * BS * D, 20), CVLM_DTYPE_F32,
                               NULL};
    struct cvlm_seq_kv sk = {bt, 2};
    struct cvlm_attn_batch ab = {M, seq, slot, &sk, BS, 0};
    void *k = (char *)qkv + D * sizeof(float), *v = (char *)qkv + 2 * D * sizeof(float);
    op->rmsnorm(be, h, x, &nw, M, D, 1e-6f);
    op->gemm(be, qkv, h, D, &wq, &bq, M, 3 * D, D);
    op->rope(be, qkv, 3 * D, pos, M, H, HD, inv_freq);
    op->rope(be, k, 3 * D, pos, M, H, HD, inv_freq);
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    op->attention_paged(be, att, qkv, 3 * D, &kv, &ab, H, HD);
    op->add_rmsnorm(be, att, x, att, &nw, M, D, 1e-6f); /* y is r */
    op->layernorm(be, h, h, &nw, &nb, M, D, 1e-5f);     /* in place */
    op->gemm(be, g, h, D, &wg, NULL, M, I, D);
    op->gemm(be, u, x, D, &wg, NULL, M, I, D);
    op->silu_mul(be, g, g, u, I, M, I); /* out is gate */
    op->gelu(be, h, (size_t)M * D);
    op->add(be, h, x, (size_t)M * D);
    op->add_row(be, h, &nb, M, D);
    op->attention_full(be, e, qkv, M, H, HD);
    op->embed(be, x, &emb, ids, M, D);
    op->copy_rows(be, cr, x, rows, 3, D);
    op->patchify(be, pt, px, 3, 8, 8, 4);
    float *o = out;
    void *outs[] = {x, h, att, e, qkv, g, cr, pt};
    size_t ns[] = {M * D, M * D, M * D, M * D, M * 3 * D, M * I, 3 * D, 4 * 4 * 12};
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
        op->to_host(be, o, outs[i], ns[i]);
        o += ns[i];
    }
    void *all[] = {x, h, qkv, att, g, u, e, cr, pt, kv.k, kv.v};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        op->free(be, all[i]);
    struct cvlm_tensor *ws[] = {&wq, &bq, &wg, &nw, &nb, &emb};
    for (size_t i = 0; i < sizeof(ws) / sizeof(ws[0]); i++)
        drop(ws[i]);
    free(px);
}

TEST(check_ops_let_correct_calls_through_unchanged)
{
    struct cvlm_backend *raw = cvlm_backend_cpu_create(2);
    struct cvlm_backend *ck = cvlm_backend_check_wrap(cvlm_backend_cpu_create(2));
    REQUIRE(raw && ck);
    CHECK(cvlm_backend_check_inner(ck) != ck && cvlm_backend_check_inner(raw) == raw);
    CHECK(!strcmp(ck->ops->name, raw->ops->name) && ck->act_dtype == raw->act_dtype);
    float *a = calloc(OUT_FLOATS, sizeof(float)), *b = calloc(OUT_FLOATS, sizeof(float));
    run_all(raw, a);
    run_all(ck, b);
    CHECKF(ck->ops->status(ck) == 0, "%s", cvlm_last_error());
    CHECK(memcmp(a, b, OUT_FLOATS * sizeof(float)) == 0);
    free(a);
    free(b);
    raw->ops->destroy(raw);
    ck->ops->destroy(ck);
}

/* ---- wrong calls are caught -------------------------------------------------------------- */

/* The first float of p, to see whether an op ran. */
static float first(struct cvlm_backend *be, const void *p)
{
    float f;
    be->ops->to_host(be, &f, p, 1);
    return f;
}

TEST(check_ops_catch_wrong_shapes)
{
    struct cvlm_backend *be = cvlm_backend_check_wrap(cvlm_backend_cpu_create(1));
    REQUIRE(be);
    const struct cvlm_backend_i *op = be->ops;
    struct cvlm_tensor w = weight(CVLM_DTYPE_BF16, 8, D, 1), nw = weight(CVLM_DTYPE_F32, D, 0, 2);
    struct cvlm_tensor emb = weight(CVLM_DTYPE_F32, V, D, 3);
    void *x = buf(be, M * D, 4), *y = buf(be, M * D, 5);
    float y0 = first(be, y);
    /* a GEMM whose K is not W's: refused, y untouched, message with both shapes */
    op->gemm(be, y, x, D, &w, NULL, M, 8, D - 1);
    CHECK(failed_with(be, CVLM_ESHAPE, "gemm", "w is [8, 32], the call needs [N=8, K=31]"));
    CHECK(first(be, y) == y0);
    CHECK(op->status(be) == 0); /* reported once: the next step starts clean */
    /* more rows than y holds */
    op->gemm(be, y, x, D, &w, NULL, M * D / 8 + 1, 8, D);
    CHECK(failed_with(be, CVLM_ESHAPE, "gemm", "y ["));
    /* a bias of the wrong length; a stride under the row width */
    struct cvlm_tensor bias = weight(CVLM_DTYPE_F32, 7, 0, 6);
    op->gemm(be, y, x, D, &w, &bias, M, 8, D);
    CHECK(failed_with(be, CVLM_ESHAPE, "gemm", "bias is [7]"));
    op->gemm(be, y, x, D - 1, &w, NULL, M, 8, D);
    CHECK(failed_with(be, CVLM_ESHAPE, "gemm", "x_stride"));
    /* a norm weight of D - 1 elements; negative rows */
    struct cvlm_tensor short_w = nw;
    short_w.shape[0] = D - 1;
    op->rmsnorm(be, y, x, &short_w, M, D, 1e-6f);
    CHECK(failed_with(be, CVLM_ESHAPE, "rmsnorm", "needs 32 elements"));
    op->layernorm(be, y, x, &nw, NULL, -1, D, 1e-5f);
    CHECK(failed_with(be, CVLM_ESHAPE, "layernorm", "M = -1"));
    /* a token id outside the table */
    int32_t ids[2] = {1, V};
    op->embed(be, y, &emb, ids, 2, D);
    CHECK(failed_with(be, CVLM_EINVAL, "embed", "ids[1] = 20"));
    /* rows to gather beyond the source buffer */
    int32_t rows[2] = {0, M};
    op->copy_rows(be, y, x, rows, 2, D);
    CHECK(failed_with(be, CVLM_ESHAPE, "copy_rows", "src"));
    /* odd head size for RoPE */
    int32_t pos[M] = {0};
    float inv[8] = {1};
    op->rope(be, y, D, pos, M, 2, 15, inv);
    CHECK(failed_with(be, CVLM_ESHAPE, "rope", "head_dim = 15"));
    CHECK(first(be, y) == y0);
    /* and a correct call afterwards works */
    op->rmsnorm(be, y, x, &nw, M, D, 1e-6f);
    CHECK(op->status(be) == 0 && first(be, y) != y0);
    op->free(be, x);
    op->free(be, y);
    drop(&w), drop(&nw), drop(&emb), drop(&bias);
    be->ops->destroy(be);
}

TEST(check_ops_catch_kv_metadata)
{
    struct cvlm_backend *be = cvlm_backend_check_wrap(cvlm_backend_cpu_create(1));
    REQUIRE(be);
    const struct cvlm_backend_i *op = be->ops;
    void *qkv = buf(be, M * 3 * D, 1), *out = buf(be, M * D, 2);
    struct cvlm_kv_layer kv = {buf(be, NB * BS * D, 3), buf(be, NB * BS * D, 4), CVLM_DTYPE_F32,
                               NULL};
    void *k = (char *)qkv + D * sizeof(float), *v = (char *)qkv + 2 * D * sizeof(float);
    int32_t seq[M] = {0}, slot[M] = {0, 1, 2, 3, 4}, bt[2] = {5, NB};
    struct cvlm_seq_kv sk = {bt, 2};
    struct cvlm_attn_batch ab = {M, seq, slot, &sk, BS, 0};
    /* slot 4 lives in block bt[1] = NB: past the cache */
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "kv_write", "block 1 of sequence 0 is 6"));
    op->attention_paged(be, out, qkv, 3 * D, &kv, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "attention_paged", "the cache has 6 blocks"));
    /* a slot outside the sequence's block table */
    bt[1] = 0;
    slot[4] = 2 * BS;
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "kv_write", "slot 8 outside"));
    slot[4] = 4;
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    op->attention_paged(be, out, qkv, 3 * D, &kv, &ab, H, HD);
    CHECKF(op->status(be) == 0, "%s", cvlm_last_error());
    /* the cache dtype: one of F32 / F16 / BF16 / Q8, and a 16-bit cache holds twice the
     * blocks in the same allocation (block 2 NB - 1 is inside it) */
    kv.dtype = CVLM_DTYPE_Q4;
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    CHECK(failed_with(be, CVLM_ESHAPE, "kv_write", "kv->dtype"));
    /* Q8 needs its scales ([blocks][BS][2][H] F32: NB blocks here, the codes 4 NB) */
    kv.dtype = CVLM_DTYPE_Q8;
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "kv_write", "kv->scales NULL"));
    kv.scales = buf(be, NB * BS * 2 * H, 5);
    bt[1] = NB - 1;
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    op->attention_paged(be, out, qkv, 3 * D, &kv, &ab, H, HD);
    CHECKF(op->status(be) == 0, "%s", cvlm_last_error());
    bt[1] = NB;
    op->attention_paged(be, out, qkv, 3 * D, &kv, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "attention_paged", "the cache has 6 blocks"));
    kv.dtype = CVLM_DTYPE_F32; /* scales on another dtype */
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "kv_write", "kv->scales set"));
    op->free(be, kv.scales);
    kv.scales = NULL;
    kv.dtype = CVLM_DTYPE_F16;
    bt[1] = 2 * NB - 1;
    op->kv_write(be, &kv, k, v, 3 * D, &ab, H, HD);
    op->attention_paged(be, out, qkv, 3 * D, &kv, &ab, H, HD);
    CHECKF(op->status(be) == 0, "%s", cvlm_last_error());
    bt[1] = 2 * NB;
    op->attention_paged(be, out, qkv, 3 * D, &kv, &ab, H, HD);
    CHECK(failed_with(be, CVLM_EINVAL, "attention_paged", "the cache has 12 blocks"));
    void *all[] = {qkv, out, kv.k, kv.v};
    for (int i = 0; i < 4; i++)
        op->free(be, all[i]);
    be->ops->destroy(be);
}

TEST(check_ops_catch_wrong_dtypes)
{
    struct cvlm_backend *be = cvlm_backend_check_wrap(cvlm_backend_cpu_create(1));
    REQUIRE(be);
    const struct cvlm_backend_i *op = be->ops;
    struct cvlm_tensor w = weight(CVLM_DTYPE_BF16, 8, D, 1), nw = weight(CVLM_DTYPE_F32, D, 0, 2);
    void *x = buf(be, M * D, 3), *y = buf(be, M * D, 4);
    struct cvlm_tensor bad = w;
    bad.dtype = (enum cvlm_dtype)7;
    op->gemm(be, y, x, D, &bad, NULL, M, 8, D);
    CHECK(failed_with(be, CVLM_ESHAPE, "gemm", "dtype 7"));
    bad = nw;
    bad.dtype = (enum cvlm_dtype) - 1;
    op->layernorm(be, y, x, &nw, &bad, M, D, 1e-5f);
    CHECK(failed_with(be, CVLM_ESHAPE, "layernorm", "b has dtype -1"));
    /* a weight that was never uploaded */
    bad = w;
    bad.data = NULL;
    op->gemm(be, y, x, D, &bad, NULL, M, 8, D);
    CHECK(failed_with(be, CVLM_EINVAL, "gemm", "not uploaded"));
    /* a BF16 weight at an odd address */
    bad = w;
    bad.data = (const char *)w.data + 1;
    op->gemm(be, y, x, D, &bad, NULL, M, 8, D);
    CHECK(failed_with(be, CVLM_EINVAL, "gemm", "not aligned to its BF16 elements"));
    op->free(be, x);
    op->free(be, y);
    drop(&w), drop(&nw);
    be->ops->destroy(be);
}

/* A GPTQ perm's contents are checked at upload_weights (host memory there) and never read
 * at a GEMM: the CUDA backend repoints perm to device memory, here a page the host cannot
 * read (a read would fault instead of the shape failure asked for). */
TEST(check_ops_read_perm_at_upload_only)
{
    struct cvlm_backend *be = cvlm_backend_check_wrap(cvlm_backend_cpu_create(1));
    REQUIRE(be);
    const struct cvlm_backend_i *op = be->ops;
    enum { N = 8 };
    unsigned char codes[N * D / 2] = {0};
    float scales[N] = {0};
    int32_t perm[D];
    for (int k = 0; k < D; k++)
        perm[k] = D - 1 - k;
    struct cvlm_tensor w = {.dtype = CVLM_DTYPE_Q4, .ndim = 2, .shape = {N, D}};
    w.data = codes, w.scales = scales, w.perm = perm;
    struct cvlm_tensor *ws[] = {&w};
    CHECK(op->upload_weights(be, ws, 1, 0) == 0 && op->status(be) == 0);
    perm[5] = perm[6]; /* a repeated column */
    CHECK(op->upload_weights(be, ws, 1, 0) == CVLM_ESHAPE);
    CHECK(failed_with(be, CVLM_ESHAPE, "upload_weights", "perm[6] = 25 is not a permutation"));
    void *dev = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(dev != MAP_FAILED);
    w.perm = dev;
    void *x = buf(be, M * D, 3), *y = buf(be, M * N, 4);
    op->gemm(be, y, x, D, &w, NULL, M, N + 1, D); /* wrong N */
    CHECK(failed_with(be, CVLM_ESHAPE, "gemm", "the call needs [N=9, K=32]"));
    munmap(dev, 4096);
    op->free(be, x);
    op->free(be, y);
    be->ops->destroy(be);
}

TEST(check_ops_catch_bad_pointers_and_aliasing)
{
    struct cvlm_backend *be = cvlm_backend_check_wrap(cvlm_backend_cpu_create(1));
    REQUIRE(be);
    const struct cvlm_backend_i *op = be->ops;
    struct cvlm_tensor w = weight(CVLM_DTYPE_BF16, D, D, 1), nw = weight(CVLM_DTYPE_F32, D, 0, 2);
    void *x = buf(be, M * D, 3), *y = buf(be, M * D, 4), *gone = buf(be, M * D, 5);
    float *host = malloc(M * D * sizeof(float));
    /* misaligned, foreign (host malloc), freed, NULL */
    op->gemm(be, (char *)y + 2, x, D, &w, NULL, 1, D, D);
    CHECK(failed_with(be, CVLM_EINVAL, "gemm", "not aligned to its 4-byte F32 elements"));
    op->gemm(be, host, x, D, &w, NULL, M, D, D);
    CHECK(failed_with(be, CVLM_EINVAL, "gemm", "not in a live allocation"));
    op->free(be, gone);
    op->rmsnorm(be, gone, x, &nw, M, D, 1e-6f);
    CHECK(failed_with(be, CVLM_EINVAL, "rmsnorm", "y ("));
    op->free(be, gone); /* twice */
    CHECK(failed_with(be, CVLM_EINVAL, "free", "not a live allocation"));
    op->add(be, y, NULL, 4);
    CHECK(failed_with(be, CVLM_EINVAL, "add", "x is NULL"));
    /* aliasing: a GEMM in place, a norm on shifted rows of its input, silu_mul writing
     * over a strided gate, attention writing over its qkv */
    op->gemm(be, y, y, D, &w, NULL, M, D, D);
    CHECK(failed_with(be, CVLM_EINVAL, "gemm", "y overlaps x"));
    op->rmsnorm(be, (char *)x + D * sizeof(float), x, &nw, 2, D, 1e-6f);
    CHECK(failed_with(be, CVLM_EINVAL, "rmsnorm", "without being the same buffer"));
    op->silu_mul(be, x, x, (char *)x + 16 * sizeof(float), D, 2, 16);
    CHECK(failed_with(be, CVLM_EINVAL, "silu_mul", "out overlaps gate"));
    op->attention_full(be, x, x, 1, 1, 8);
    CHECK(failed_with(be, CVLM_EINVAL, "attention_full", "out overlaps qkv"));
    /* the in-place forms backend.h allows */
    op->rmsnorm(be, y, y, &nw, M, D, 1e-6f);
    op->silu_mul(be, x, x, y, D, M, D);
    op->add_rmsnorm(be, y, x, y, &nw, M, D, 1e-6f);
    op->add(be, x, x, (size_t)M * D);
    CHECKF(op->status(be) == 0, "%s", cvlm_last_error());
    op->free(be, x);
    op->free(be, y);
    free(host);
    drop(&w), drop(&nw);
    be->ops->destroy(be);
}

TEST(check_ops_skip_until_status)
{
    struct cvlm_backend *be = cvlm_backend_check_wrap(cvlm_backend_cpu_create(1));
    REQUIRE(be);
    const struct cvlm_backend_i *op = be->ops;
    struct cvlm_tensor nw = weight(CVLM_DTYPE_F32, D, 0, 1);
    void *x = buf(be, M * D, 2), *y = buf(be, M * D, 3);
    float y0 = first(be, y);
    op->rmsnorm(be, y, x, &nw, M, D + 1, 1e-6f); /* wrong */
    op->rmsnorm(be, y, x, &nw, M, D, 1e-6f);     /* right, but after a violation: skipped */
    CHECK(first(be, y) == y0);
    CHECK(failed_with(be, CVLM_ESHAPE, "rmsnorm", "needs 33 elements")); /* the first one */
    op->rmsnorm(be, y, x, &nw, M, D, 1e-6f);
    CHECK(op->status(be) == 0 && first(be, y) != y0);
    op->free(be, x);
    op->free(be, y);
    drop(&nw);
    be->ops->destroy(be);
}

/* ---- the model with the checks on --------------------------------------------------------- */

/* Image features and the logits of a short mixed text + image prompt, with the checks as
 * `checks` says ("0" / "1"). */
static int model_run(struct cvlm_weights *w, const char *checks, float *feats_out, float *logits,
                     int *wrapped)
{
    const struct cvlm_config *c = &w->cfg;
    struct cvlm_model_opts o = {.max_tokens = 16, .block_size = 4, .kv_blocks = 8, .threads = 2};
    struct cvlm_model *m = NULL;
    int S = c->vision.image_size, rc, n = 6, img = cvlm_config_image_tokens(c);
    char *saved = getenv("COGVLM_CHECK_OPS") ? strdup(getenv("COGVLM_CHECK_OPS")) : NULL;
    setenv("COGVLM_CHECK_OPS", checks, 1);
    rc = cvlm_model_create(w, &o, &m);
    if (saved)
        setenv("COGVLM_CHECK_OPS", saved, 1);
    else
        unsetenv("COGVLM_CHECK_OPS");
    free(saved);
    if (rc)
        return rc;
    *wrapped = cvlm_backend_check_inner(cvlm_model_backend(m)) != cvlm_model_backend(m);
    float *px = malloc((size_t)3 * S * S * sizeof(float));
    for (int i = 0; i < 3 * S * S; i++)
        px[i] = val((size_t)i, 77);
    struct cvlm_feats *f = cvlm_model_feats_alloc(m);
    rc = f ? cvlm_model_encode_image(m, px, f, NULL) : CVLM_ENOMEM;
    if (!rc) {
        cvlm_model_feats_to_host(m, f, feats_out);
        /* bos, two image rows, three text tokens; one vision-expert token among them */
        int32_t ids[6] = {1, 0, 0, 450, 3800, 29889}, pos[6] = {0, 1, 2, 2, 3, 4};
        int32_t seq[6] = {0}, slot[6] = {0, 1, 2, 3, 4, 5}, row[6] = {-1, 0, img - 1, -1, -1, -1};
        int32_t bt[2] = {3, 6};
        uint8_t ex[6] = {0, 1, 1, 0, 0, 0}, want[6] = {1, 1, 1, 1, 1, 1};
        struct cvlm_seq_kv kv = {bt, 2};
        const struct cvlm_feats *fs[1] = {f};
        struct cvlm_batch b = {.n_tokens = n,
                               .ids = ids,
                               .pos = pos,
                               .expert = ex,
                               .seq = seq,
                               .slot = slot,
                               .img_row = row,
                               .img_feats = fs,
                               .seqs = &kv,
                               .n_seqs = 1,
                               .want_logits = want};
        rc = cvlm_model_forward(m, &b, logits);
    }
    free(px);
    cvlm_model_feats_free(m, f);
    cvlm_model_destroy(m);
    return rc;
}

TEST(check_ops_model_identical_with_checks_on)
{
    struct cvlm_weights *w;
    REQUIRE(cvlm_weights_load(cvlm_test_data("golden-tiny/model"), &w) == 0);
    const struct cvlm_config *c = &w->cfg;
    size_t nf = (size_t)cvlm_config_image_tokens(c) * (size_t)c->hidden_size;
    size_t nl = 6 * (size_t)c->vocab_size;
    float *f0 = malloc(nf * 4), *f1 = malloc(nf * 4), *l0 = malloc(nl * 4), *l1 = malloc(nl * 4);
    int w0 = -1, w1 = -1;
    CHECKF(model_run(w, "0", f0, l0, &w0) == 0, "%s", cvlm_last_error());
    CHECKF(model_run(w, "1", f1, l1, &w1) == 0, "%s", cvlm_last_error());
    CHECK(w0 == 0 && w1 == 1); /* the environment switches the layer both ways */
    CHECK(memcmp(f0, f1, nf * 4) == 0);
    CHECK(memcmp(l0, l1, nl * 4) == 0);
    free(f0), free(f1), free(l0), free(l1);
    cvlm_weights_destroy(w);
}

/* SAN=1 (and any build with -DCVLM_CHECK_OPS=1) runs every model with the checks; other
 * builds only when COGVLM_CHECK_OPS=1 asks for them. */
TEST(check_ops_enabled_by_the_build)
{
    if (getenv("COGVLM_CHECK_OPS"))
        return; /* the environment decides; model_identical_with_checks_on covers it */
#if defined(CVLM_CHECK_OPS) && CVLM_CHECK_OPS
    CHECK(cvlm_backend_check_enabled() == 1);
#else
    CHECK(cvlm_backend_check_enabled() == 0);
#endif
}
