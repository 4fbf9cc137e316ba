/* backend_check.c - the op table's entry checks (backend_check.h), above any backend.
 *
 * Each op of the checked table states what the call needs (backend.h's contract) and
 * forwards to the wrapped backend only if all of it holds:
 * - counts: row counts >= 0 (0 rows: nothing happens), widths and head sizes > 0, row
 *   strides >= the row width;
 * - weights: a dtype of the enum, data present and aligned to the element, and the shape
 *   the call implies (a GEMM's W is [N, K], a norm's weight has D elements, an embedding
 *   table has rows of D);
 * - activations: element-aligned, inside one live allocation of this backend (the wrapper
 *   records every alloc and free, so a freed buffer, one from another backend, or rows
 *   running past a buffer's end are caught before a kernel touches them, on a GPU too);
 * - aliasing, as backend.h states it: outputs are the same buffer as an input where an op
 *   allows it, otherwise disjoint from every input;
 * - host metadata: token ids inside the table, rows to gather >= 0, sequence slots inside
 *   their block table, blocks inside the KV cache allocation;
 * - the KV cache's dtype: F32, F16, BF16 or Q8, Q8 with its scales inside their allocation
 *   (whether the backend has the dtype is its own check).
 * Weights live where upload_weights put them (no allocation of ours), so only their
 * shape, dtype and alignment are checked, never their extent; a GPTQ perm's contents are
 * checked once, at upload_weights, while they are host memory.
 *
 * The checks cost a few comparisons and a binary search per pointer, plus one pass over
 * the per-token metadata; nothing when the layer is off (the model then holds the
 * backend's own table).
 */
#include "engine/model/backend_check.h"

#include "engine/error.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One live allocation: [at, at + bytes). */
struct span {
    uintptr_t at;
    size_t bytes;
};

struct checked {
    struct cvlm_backend base;  /* first: ops receive &base and cast back */
    struct cvlm_backend_i ops; /* the inner table with every op replaced by its check */
    struct cvlm_backend *in;   /* the real backend (owned) */
    pthread_mutex_t mu;        /* guards live[] and the error below */
    struct span *live;         /* [n_live] sorted by address */
    int n_live, cap_live;
    int err; /* first violation since the last status(), or 0 */
    char msg[512];
};

/* The op being checked, for the messages. */
struct call {
    struct checked *ck;
    const char *op;
};

static struct checked *ck_of(struct cvlm_backend *be)
{
    return (struct checked *)be;
}

int cvlm_backend_check_enabled(void)
{
    const char *e = getenv("COGVLM_CHECK_OPS");
    if (e && *e)
        return strcmp(e, "0") != 0;
#if defined(CVLM_CHECK_OPS) && CVLM_CHECK_OPS
    return 1;
#else
    return 0;
#endif
}

/* ---- violations ---------------------------------------------------------------------- */

/* Records a violation (the first one is what status() reports) and returns 0, so that a
 * check reads `return x_ok || fail(c, CVLM_ESHAPE, "...")`. */
__attribute__((format(printf, 3, 4))) static int fail(const struct call *c, int code,
                                                      const char *fmt, ...)
{
    char why[320];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&c->ck->mu);
    if (!c->ck->err) {
        c->ck->err = code;
        snprintf(c->ck->msg, sizeof(c->ck->msg), "%s op %s: %s", c->ck->in->ops->name, c->op, why);
    }
    pthread_mutex_unlock(&c->ck->mu);
    cvlm_errf(code, "%s op %s: %s", c->ck->in->ops->name, c->op, why);
    return 0;
}

/* Ops after a violation are skipped until status() reports it: they would compute on
 * what the skipped op did not write. Says why on this thread. */
static int enter(const struct call *c)
{
    pthread_mutex_lock(&c->ck->mu);
    int err = c->ck->err;
    if (err)
        cvlm_errf(err, "%s", c->ck->msg);
    pthread_mutex_unlock(&c->ck->mu);
    return !err;
}

/* ---- the allocation table ---------------------------------------------------------------- */

/* Index of the first live span starting above p. */
static int upper(const struct checked *ck, uintptr_t p)
{
    int lo = 0, hi = ck->n_live;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (ck->live[mid].at <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int remember(struct checked *ck, void *p, size_t bytes)
{
    int ok = 1;
    pthread_mutex_lock(&ck->mu);
    if (ck->n_live == ck->cap_live) {
        int cap = ck->cap_live ? 2 * ck->cap_live : 64;
        struct span *s = realloc(ck->live, (size_t)cap * sizeof(*s));
        ok = s != NULL;
        if (s) {
            ck->live = s;
            ck->cap_live = cap;
        }
    }
    if (ok) {
        int i = upper(ck, (uintptr_t)p);
        memmove(ck->live + i + 1, ck->live + i, (size_t)(ck->n_live - i) * sizeof(*ck->live));
        ck->live[i] = (struct span){(uintptr_t)p, bytes};
        ck->n_live++;
    }
    pthread_mutex_unlock(&ck->mu);
    return ok;
}

/* Removes the span starting exactly at p; 0 if there is none. */
static int forget(struct checked *ck, void *p)
{
    pthread_mutex_lock(&ck->mu);
    int i = upper(ck, (uintptr_t)p) - 1, ok = i >= 0 && ck->live[i].at == (uintptr_t)p;
    if (ok) {
        memmove(ck->live + i, ck->live + i + 1, (size_t)(ck->n_live - i - 1) * sizeof(*ck->live));
        ck->n_live--;
    }
    pthread_mutex_unlock(&ck->mu);
    return ok;
}

/* The live span holding p; bytes 0 if none. */
static struct span holder(struct checked *ck, const void *p)
{
    struct span s = {0, 0};
    pthread_mutex_lock(&ck->mu);
    int i = upper(ck, (uintptr_t)p) - 1;
    if (i >= 0 && (uintptr_t)p - ck->live[i].at < ck->live[i].bytes)
        s = ck->live[i];
    pthread_mutex_unlock(&ck->mu);
    return s;
}

/* ---- argument checks (each returns 1, or records the violation and returns 0) ------------ */

static int rows_ok(const struct call *c, const char *name, long long v)
{
    return v >= 0 || fail(c, CVLM_ESHAPE, "%s = %lld is negative", name, v);
}

static int width_ok(const struct call *c, const char *name, long long v)
{
    return v > 0 || fail(c, CVLM_ESHAPE, "%s = %lld, must be positive", name, v);
}

static int stride_ok(const struct call *c, const char *name, long long stride, long long width)
{
    return stride >= width ||
           fail(c, CVLM_ESHAPE, "%s = %lld is less than the row width %lld", name, stride, width);
}

/* Bytes spanned by `rows` rows of `width` elements `stride` apart (rows > 0). */
static size_t extent(const struct checked *ck, size_t rows, size_t width, size_t stride)
{
    return ((rows - 1) * stride + width) * cvlm_dtype_size(ck->base.act_dtype);
}

/* Activation rows [rows, width] `stride` elements apart from p: element-aligned, inside
 * one live allocation of this backend. */
static int act_ok(const struct call *c, const char *name, const void *p, size_t rows, size_t width,
                  size_t stride)
{
    size_t es = cvlm_dtype_size(c->ck->base.act_dtype);
    if (!rows)
        return 1;
    if (!p)
        return fail(c, CVLM_EINVAL, "%s is NULL", name);
    if ((uintptr_t)p % es)
        return fail(c, CVLM_EINVAL, "%s (%p) is not aligned to its %zu-byte %s elements", name, p,
                    es, cvlm_dtype_name(c->ck->base.act_dtype));
    struct span s = holder(c->ck, p);
    if (!s.bytes)
        return fail(c, CVLM_EINVAL,
                    "%s (%p) is not in a live allocation of this backend (freed, or another's)",
                    name, p);
    size_t off = (uintptr_t)p - s.at, need = extent(c->ck, rows, width, stride);
    return need <= s.bytes - off ||
           fail(c, CVLM_ESHAPE,
                "%s [%zu, %zu] (row stride %zu) needs %zu bytes from offset %zu of its "
                "%zu-byte buffer",
                name, rows, width, stride, need, off, s.bytes);
}

/* A host array of n elements of `align` bytes. */
static int host_ok(const struct call *c, const char *name, const void *p, size_t n, size_t align)
{
    if (!n)
        return 1;
    if (!p)
        return fail(c, CVLM_EINVAL, "%s is NULL", name);
    return (uintptr_t)p % align == 0 ||
           fail(c, CVLM_EINVAL, "%s (%p) is not aligned to %zu bytes", name, p, align);
}

static void fmt_shape(char *buf, size_t cap, const struct cvlm_tensor *t)
{
    size_t at = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < t->ndim && i < CVLM_MAX_DIMS && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (at < cap)
        snprintf(buf + at, cap - at, "]");
}

/* GPTQ's extras (backend.h): mins on Q4 only, perm on a quantized matrix only and, with
 * `contents`, a permutation of 0..K-1 (checked in full: these checks run in debug builds
 * only). The contents are read at upload_weights only: after it, perm may be device memory
 * (the CUDA backend repoints it), which the host must not read. */
static int quant_extras_ok(const struct call *c, const char *name, const struct cvlm_tensor *t,
                           int contents)
{
    if ((t->mins && t->dtype != CVLM_DTYPE_Q4) || (t->perm && !cvlm_dtype_is_quant(t->dtype)))
        return fail(c, CVLM_ESHAPE, "%s: %s on a %s tensor (mins: Q4 only; perm: Q8/Q4 only)", name,
                    t->mins ? "mins" : "perm", cvlm_dtype_name(t->dtype));
    if (!t->perm || !contents || t->ndim != 2)
        return 1;
    int64_t K = t->shape[1];
    unsigned char *seen = calloc((size_t)K, 1);
    int64_t bad = -1;
    for (int64_t k = 0; seen && k < K && bad < 0; k++) {
        if (t->perm[k] < 0 || t->perm[k] >= K || seen[t->perm[k]])
            bad = k;
        else
            seen[t->perm[k]] = 1;
    }
    free(seen);
    if (bad >= 0)
        return fail(c, CVLM_ESHAPE, "%s: perm[%lld] = %d is not a permutation of 0..%lld", name,
                    (long long)bad, (int)t->perm[bad], (long long)(K - 1));
    return 1;
}

/* Any weight: a dtype of the enum, 1..4 positive dims, data present and element-aligned. */
static int tensor_ok(const struct call *c, const char *name, const struct cvlm_tensor *t)
{
    if (!t)
        return fail(c, CVLM_EINVAL, "%s is NULL", name);
    if (t->dtype != CVLM_DTYPE_F32 && t->dtype != CVLM_DTYPE_F16 && t->dtype != CVLM_DTYPE_BF16 &&
        !cvlm_dtype_is_quant(t->dtype))
        return fail(c, CVLM_ESHAPE, "%s has dtype %d (F32, F16, BF16, Q8 or Q4 only)", name,
                    (int)t->dtype);
    if (cvlm_dtype_is_quant(t->dtype) &&
        (t->ndim != 2 || !t->scales || (t->dtype == CVLM_DTYPE_Q4 && t->shape[1] % 32 != 0)))
        return fail(c, CVLM_ESHAPE, "%s: a %s matrix needs 2 dimensions, scales%s", name,
                    cvlm_dtype_name(t->dtype),
                    t->dtype == CVLM_DTYPE_Q4 ? " and K a multiple of 32" : "");
    if (t->ndim < 1 || t->ndim > CVLM_MAX_DIMS)
        return fail(c, CVLM_ESHAPE, "%s has %d dimensions", name, t->ndim);
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] <= 0)
            return fail(c, CVLM_ESHAPE, "%s has dimension %d of size %lld", name, i,
                        (long long)t->shape[i]);
    if (!t->data)
        return fail(c, CVLM_EINVAL, "%s has no data (not uploaded)", name);
    if (!quant_extras_ok(c, name, t, 0))
        return 0;
    return (uintptr_t)t->data % cvlm_dtype_size(t->dtype) == 0 ||
           fail(c, CVLM_EINVAL, "%s data (%p) is not aligned to its %s elements", name, t->data,
                cvlm_dtype_name(t->dtype));
}

/* A matrix [N, K]. */
static int matrix_ok(const struct call *c, const char *name, const struct cvlm_tensor *t, int N,
                     int K)
{
    char got[96];
    if (!tensor_ok(c, name, t))
        return 0;
    if (t->ndim == 2 && t->shape[0] == N && t->shape[1] == K)
        return 1;
    fmt_shape(got, sizeof(got), t);
    return fail(c, CVLM_ESHAPE, "%s is %s, the call needs [N=%d, K=%d]", name, got, N, K);
}

/* D elements in any shape (norm weights, biases); NULL allowed if `optional`. */
static int vector_ok(const struct call *c, const char *name, const struct cvlm_tensor *t, int D,
                     int optional)
{
    char got[96];
    if (!t && optional)
        return 1;
    if (!tensor_ok(c, name, t))
        return 0;
    if (cvlm_tensor_numel(t) == D)
        return 1;
    fmt_shape(got, sizeof(got), t);
    return fail(c, CVLM_ESHAPE, "%s is %s, the call needs %d elements", name, got, D);
}

/* A table of rows of D elements (embeddings, positions, boi/eoi [1, 1, D]); *rows its
 * row count. */
static int table_ok(const struct call *c, const char *name, const struct cvlm_tensor *t, int D,
                    int64_t *rows)
{
    char got[96];
    if (!tensor_ok(c, name, t))
        return 0;
    *rows = cvlm_tensor_numel(t) / D;
    if (t->shape[t->ndim - 1] == D)
        return 1;
    fmt_shape(got, sizeof(got), t);
    return fail(c, CVLM_ESHAPE, "%s is %s, the call needs rows of D=%d", name, got, D);
}

static int overlap(const void *a, size_t an, const void *b, size_t bn)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return an && bn && x < y + bn && y < x + an;
}

/* Output a (an bytes) must not share memory with input b. */
static int apart_ok(const struct call *c, const char *a_name, const void *a, size_t an,
                    const char *b_name, const void *b, size_t bn)
{
    return !overlap(a, an, b, bn) ||
           fail(c, CVLM_EINVAL, "%s overlaps %s (the op does not work in place)", a_name, b_name);
}

/* Output a is input b (in place, element for element) or does not touch it. */
static int same_or_apart_ok(const struct call *c, const char *a_name, const void *a, size_t an,
                            const char *b_name, const void *b, size_t bn)
{
    return a == b || !overlap(a, an, b, bn) ||
           fail(c, CVLM_EINVAL, "%s overlaps %s without being the same buffer", a_name, b_name);
}

/* Blocks of `block_bytes` that fit in the allocation from p on (p checked live first). */
static int64_t kv_capacity(const struct call *c, const char *name, const void *p,
                           size_t block_bytes)
{
    if (!act_ok(c, name, p, 1, 1, 1))
        return -1;
    struct span s = holder(c->ck, p);
    return (int64_t)((s.bytes - ((uintptr_t)p - s.at)) / block_bytes);
}

/* The batch of a KV op: each token's sequence and slot inside that sequence's block table,
 * and the blocks it touches (its own slot's, or with `history` all up to it) inside the
 * cache. The number of sequences is not part of the batch: cvlm_rank_check_batch bounds
 * seq[] from above before the step. */
static int batch_ok(const struct call *c, const struct cvlm_attn_batch *b,
                    const struct cvlm_kv_layer *kv, int H, int hd, int history)
{
    if (!b || !kv)
        return fail(c, CVLM_EINVAL, "%s is NULL", b ? "kv" : "batch");
    if (kv->dtype != CVLM_DTYPE_F32 && kv->dtype != CVLM_DTYPE_F16 &&
        kv->dtype != CVLM_DTYPE_BF16 && kv->dtype != CVLM_DTYPE_Q8)
        return fail(c, CVLM_ESHAPE, "kv->dtype %d (F32, F16, BF16 or Q8 only)", (int)kv->dtype);
    if ((kv->dtype == CVLM_DTYPE_Q8) != (kv->scales != NULL))
        return fail(c, CVLM_EINVAL, "kv->scales %s (Q8 has scales, the others none)",
                    kv->scales ? "set" : "NULL");
    if (!rows_ok(c, "n_tokens", b->n_tokens) || !width_ok(c, "block_size", b->block_size))
        return 0;
    if (!b->n_tokens)
        return 1;
    if (!host_ok(c, "batch seq", b->seq, (size_t)b->n_tokens, 4) ||
        !host_ok(c, "batch slot", b->slot, (size_t)b->n_tokens, 4) ||
        !host_ok(c, "batch seqs", b->seqs, 1, sizeof(void *)))
        return 0;
    size_t block_bytes =
        (size_t)b->block_size * (size_t)H * (size_t)hd * cvlm_dtype_size(kv->dtype);
    int64_t nk = kv_capacity(c, "kv->k", kv->k, block_bytes);
    int64_t nv = nk < 0 ? -1 : kv_capacity(c, "kv->v", kv->v, block_bytes);
    if (nk < 0 || nv < 0)
        return 0;
    int64_t blocks = nk < nv ? nk : nv;
    if (kv->dtype == CVLM_DTYPE_Q8) { /* the scales: [blocks, block_size, 2, H] F32 */
        int64_t ns = kv_capacity(c, "kv->scales", kv->scales,
                                 (size_t)b->block_size * 2 * (size_t)H * sizeof(float));
        if (ns < 0)
            return 0;
        blocks = ns < blocks ? ns : blocks;
    }
    int last_seq = -1, checked_to = -1; /* blocks [0, checked_to] of last_seq are fine */
    for (int t = 0; t < b->n_tokens; t++) {
        int s = b->seq[t], slot = b->slot[t];
        if (s < 0)
            return fail(c, CVLM_EINVAL, "token %d: sequence %d", t, s);
        const struct cvlm_seq_kv *q = &b->seqs[s];
        if (slot < 0 || slot >= q->n_blocks * b->block_size || !q->block_table)
            return fail(c, CVLM_EINVAL, "token %d: slot %d outside sequence %d's %d blocks of %d",
                        t, slot, s, q->n_blocks, b->block_size);
        int hi = slot / b->block_size, lo = history ? 0 : hi;
        if (history && s == last_seq)
            lo = checked_to + 1;
        for (int i = lo; i <= hi; i++)
            if (q->block_table[i] < 0 || q->block_table[i] >= blocks)
                return fail(c, CVLM_EINVAL,
                            "token %d: block %d of sequence %d is %d, the cache has %lld blocks", t,
                            i, s, q->block_table[i], (long long)blocks);
        if (history && (s != last_seq || hi > checked_to))
            checked_to = hi; /* a new sequence was checked from block 0 */
        last_seq = s;
    }
    return 1;
}

/* ---- memory ---------------------------------------------------------------------------- */

static void *ck_alloc(struct cvlm_backend *be, size_t bytes)
{
    struct checked *ck = ck_of(be);
    void *p = ck->in->ops->alloc(ck->in, bytes);
    if (p && !remember(ck, p, bytes)) { /* a buffer the checks do not know fails them all */
        ck->in->ops->free(ck->in, p);
        return NULL;
    }
    return p;
}

static void ck_free(struct cvlm_backend *be, void *p)
{
    struct checked *ck = ck_of(be);
    struct call c = {ck, "free"};
    if (p && !forget(ck, p)) {
        fail(&c, CVLM_EINVAL, "%p is not a live allocation of this backend", p);
        return;
    }
    ck->in->ops->free(ck->in, p);
}

static void ck_to_host(struct cvlm_backend *be, float *dst, const void *src, size_t n)
{
    struct call c = {ck_of(be), "to_host"};
    if (host_ok(&c, "dst", dst, n, sizeof(float)) && act_ok(&c, "src", src, n ? 1 : 0, n, n))
        c.ck->in->ops->to_host(c.ck->in, dst, src, n);
}

static void ck_from_host(struct cvlm_backend *be, void *dst, const float *src, size_t n)
{
    struct call c = {ck_of(be), "from_host"};
    if (host_ok(&c, "src", src, n, sizeof(float)) && act_ok(&c, "dst", dst, n ? 1 : 0, n, n))
        c.ck->in->ops->from_host(c.ck->in, dst, src, n);
}

static void ck_copy_rows(struct cvlm_backend *be, void *dst, const void *src, const int32_t *rows,
                         int n, int width)
{
    struct call c = {ck_of(be), "copy_rows"};
    int32_t top = -1;
    if (!enter(&c) || !rows_ok(&c, "n", n) || !width_ok(&c, "width", width) ||
        !host_ok(&c, "rows", rows, (size_t)n, 4))
        return;
    for (int i = 0; i < n; i++) {
        if (rows[i] < 0) {
            fail(&c, CVLM_EINVAL, "rows[%d] = %d is negative", i, rows[i]);
            return;
        }
        top = rows[i] > top ? rows[i] : top;
    }
    size_t w = (size_t)width, src_rows = (size_t)top + 1;
    if (!n || (act_ok(&c, "dst", dst, (size_t)n, w, w) && act_ok(&c, "src", src, src_rows, w, w) &&
               apart_ok(&c, "dst", dst, extent(c.ck, (size_t)n, w, w), "src", src,
                        extent(c.ck, src_rows, w, w))))
        c.ck->in->ops->copy_rows(c.ck->in, dst, src, rows, n, width);
}

/* ---- compute ops ------------------------------------------------------------------------- */

static void ck_gemm(struct cvlm_backend *be, void *y, const void *x, int x_stride,
                    const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N,
                    int K)
{
    struct call c = {ck_of(be), "gemm"};
    if (!enter(&c) || !rows_ok(&c, "M", M) || !width_ok(&c, "N", N) || !width_ok(&c, "K", K) ||
        !stride_ok(&c, "x_stride", x_stride, K) || !matrix_ok(&c, "w", w, N, K) ||
        !vector_ok(&c, "bias", bias, N, 1))
        return;
    if (!M || (act_ok(&c, "y", y, (size_t)M, (size_t)N, (size_t)N) &&
               act_ok(&c, "x", x, (size_t)M, (size_t)K, (size_t)x_stride) &&
               apart_ok(&c, "y", y, extent(c.ck, (size_t)M, (size_t)N, (size_t)N), "x", x,
                        extent(c.ck, (size_t)M, (size_t)K, (size_t)x_stride))))
        c.ck->in->ops->gemm(c.ck->in, y, x, x_stride, w, bias, M, N, K);
}

static void ck_embed(struct cvlm_backend *be, void *out, const struct cvlm_tensor *table,
                     const int32_t *ids, int M, int D)
{
    struct call c = {ck_of(be), "embed"};
    int64_t rows = 0;
    if (!enter(&c) || !rows_ok(&c, "M", M) || !width_ok(&c, "D", D) ||
        !table_ok(&c, "table", table, D, &rows) || !host_ok(&c, "ids", ids, (size_t)M, 4))
        return;
    for (int i = 0; i < M; i++)
        if (ids[i] < 0 || ids[i] >= rows) {
            fail(&c, CVLM_EINVAL, "ids[%d] = %d outside the table's %lld rows", i, ids[i],
                 (long long)rows);
            return;
        }
    if (act_ok(&c, "out", out, (size_t)M, (size_t)D, (size_t)D))
        c.ck->in->ops->embed(c.ck->in, out, table, ids, M, D);
}

static int eps_ok(const struct call *c, float eps)
{
    return (isfinite(eps) && eps >= 0) || fail(c, CVLM_EINVAL, "eps = %g", (double)eps);
}

/* y [M, D] from x [M, D], in place or apart; a norm weight of D elements. */
static int norm_ok(const struct call *c, const void *y, const void *x, const struct cvlm_tensor *w,
                   int M, int D, float eps)
{
    size_t m = (size_t)M, d = (size_t)D;
    return rows_ok(c, "M", M) && width_ok(c, "D", D) && vector_ok(c, "w", w, D, 0) &&
           eps_ok(c, eps) && act_ok(c, "y", y, m, d, d) && act_ok(c, "x", x, m, d, d) &&
           (!M ||
            same_or_apart_ok(c, "y", y, extent(c->ck, m, d, d), "x", x, extent(c->ck, m, d, d)));
}

static void ck_rmsnorm(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w,
                       int M, int D, float eps)
{
    struct call c = {ck_of(be), "rmsnorm"};
    if (enter(&c) && norm_ok(&c, y, x, w, M, D, eps))
        c.ck->in->ops->rmsnorm(c.ck->in, y, x, w, M, D, eps);
}

static void ck_layernorm(struct cvlm_backend *be, void *y, const void *x,
                         const struct cvlm_tensor *w, const struct cvlm_tensor *b, int M, int D,
                         float eps)
{
    struct call c = {ck_of(be), "layernorm"};
    if (enter(&c) && norm_ok(&c, y, x, w, M, D, eps) && vector_ok(&c, "b", b, D, 1))
        c.ck->in->ops->layernorm(c.ck->in, y, x, w, b, M, D, eps);
}

static void ck_add(struct cvlm_backend *be, void *y, const void *x, size_t n)
{
    struct call c = {ck_of(be), "add"};
    size_t rows = n ? 1 : 0, bytes = n * cvlm_dtype_size(c.ck->base.act_dtype);
    if (enter(&c) && act_ok(&c, "y", y, rows, n, n) && act_ok(&c, "x", x, rows, n, n) &&
        same_or_apart_ok(&c, "y", y, bytes, "x", x, bytes))
        c.ck->in->ops->add(c.ck->in, y, x, n);
}

/* x += r, y = RMS(x) * w: y may be x or r (each row is summed before it is normalised);
 * otherwise the three share no memory. */
static void ck_add_rmsnorm(struct cvlm_backend *be, void *y, void *x, const void *r,
                           const struct cvlm_tensor *w, int M, int D, float eps)
{
    struct call c = {ck_of(be), "add_rmsnorm"};
    if (!enter(&c) || !norm_ok(&c, y, x, w, M, D, eps))
        return;
    size_t m = (size_t)M, d = (size_t)D, bytes = M ? extent(c.ck, m, d, d) : 0;
    if (act_ok(&c, "r", r, m, d, d) && same_or_apart_ok(&c, "y", y, bytes, "r", r, bytes) &&
        same_or_apart_ok(&c, "x", x, bytes, "r", r, bytes))
        c.ck->in->ops->add_rmsnorm(c.ck->in, y, x, r, w, M, D, eps);
}

static void ck_add_row(struct cvlm_backend *be, void *y, const struct cvlm_tensor *b, int M, int D)
{
    struct call c = {ck_of(be), "add_row"};
    if (enter(&c) && rows_ok(&c, "M", M) && width_ok(&c, "D", D) && vector_ok(&c, "b", b, D, 0) &&
        act_ok(&c, "y", y, (size_t)M, (size_t)D, (size_t)D))
        c.ck->in->ops->add_row(c.ck->in, y, b, M, D);
}

static void ck_gelu(struct cvlm_backend *be, void *x, size_t n)
{
    struct call c = {ck_of(be), "gelu"};
    if (enter(&c) && act_ok(&c, "x", x, n ? 1 : 0, n, n))
        c.ck->in->ops->gelu(c.ck->in, x, n);
}

/* out [M, N] = silu(gate) * up, rows of gate and up g_stride apart: out may be gate or up
 * itself when the rows are packed (g_stride == N); otherwise it touches neither. */
static void ck_silu_mul(struct cvlm_backend *be, void *out, const void *gate, const void *up,
                        int g_stride, int M, int N)
{
    struct call c = {ck_of(be), "silu_mul"};
    if (!enter(&c) || !rows_ok(&c, "M", M) || !width_ok(&c, "N", N) ||
        !stride_ok(&c, "g_stride", g_stride, N))
        return;
    size_t m = (size_t)M, n = (size_t)N, gs = (size_t)g_stride;
    size_t ob = M ? extent(c.ck, m, n, n) : 0, ib = M ? extent(c.ck, m, n, gs) : 0;
    int packed = g_stride == N;
    if (act_ok(&c, "out", out, m, n, n) && act_ok(&c, "gate", gate, m, n, gs) &&
        act_ok(&c, "up", up, m, n, gs) &&
        ((packed && out == gate) || apart_ok(&c, "out", out, ob, "gate", gate, ib)) &&
        ((packed && out == up) || apart_ok(&c, "out", out, ob, "up", up, ib)))
        c.ck->in->ops->silu_mul(c.ck->in, out, gate, up, g_stride, M, N);
}

static void ck_rope(struct cvlm_backend *be, void *x, int stride, const int32_t *pos, int M,
                    int n_heads, int head_dim, const float *inv_freq)
{
    struct call c = {ck_of(be), "rope"};
    long long width = (long long)n_heads * head_dim;
    if (!enter(&c) || !rows_ok(&c, "M", M) || !width_ok(&c, "n_heads", n_heads) ||
        !width_ok(&c, "head_dim", head_dim) || !stride_ok(&c, "stride", stride, width) ||
        !host_ok(&c, "pos", pos, (size_t)M, 4) ||
        !host_ok(&c, "inv_freq", inv_freq, (size_t)head_dim / 2, sizeof(float)))
        return;
    if (head_dim % 2) {
        fail(&c, CVLM_ESHAPE, "head_dim = %d is odd (rotate-half pairs d and d + hd/2)", head_dim);
        return;
    }
    if (act_ok(&c, "x", x, (size_t)M, (size_t)width, (size_t)stride))
        c.ck->in->ops->rope(c.ck->in, x, stride, pos, M, n_heads, head_dim, inv_freq);
}

static void ck_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N,
                              int n_heads, int head_dim)
{
    struct call c = {ck_of(be), "attention_full"};
    if (!enter(&c) || !rows_ok(&c, "N", N) || !width_ok(&c, "n_heads", n_heads) ||
        !width_ok(&c, "head_dim", head_dim))
        return;
    size_t n = (size_t)N, w = (size_t)n_heads * (size_t)head_dim;
    if (!N || (act_ok(&c, "out", out, n, w, w) && act_ok(&c, "qkv", qkv, n, 3 * w, 3 * w) &&
               apart_ok(&c, "out", out, extent(c.ck, n, w, w), "qkv", qkv,
                        extent(c.ck, n, 3 * w, 3 * w))))
        c.ck->in->ops->attention_full(c.ck->in, out, qkv, N, n_heads, head_dim);
}

static void ck_kv_write(struct cvlm_backend *be, struct cvlm_kv_layer *kv, const void *k,
                        const void *v, int stride, const struct cvlm_attn_batch *b, int n_heads,
                        int head_dim)
{
    struct call c = {ck_of(be), "kv_write"};
    if (!enter(&c) || !width_ok(&c, "n_heads", n_heads) || !width_ok(&c, "head_dim", head_dim) ||
        !stride_ok(&c, "stride", stride, (long long)n_heads * head_dim) ||
        !batch_ok(&c, b, kv, n_heads, head_dim, 0))
        return;
    size_t n = (size_t)b->n_tokens, w = (size_t)n_heads * (size_t)head_dim;
    if (act_ok(&c, "k", k, n, w, (size_t)stride) && act_ok(&c, "v", v, n, w, (size_t)stride))
        c.ck->in->ops->kv_write(c.ck->in, kv, k, v, stride, b, n_heads, head_dim);
}

static void ck_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                               const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                               int n_heads, int head_dim)
{
    struct call c = {ck_of(be), "attention_paged"};
    int Hkv = b && b->n_kv_heads ? b->n_kv_heads : n_heads; /* GQA: the cache's heads */
    if (!enter(&c) || !width_ok(&c, "n_heads", n_heads) || !width_ok(&c, "head_dim", head_dim) ||
        !stride_ok(&c, "stride", stride, (long long)n_heads * head_dim))
        return;
    if (Hkv < 0 || n_heads % Hkv) {
        fail(&c, CVLM_ESHAPE, "%d query heads over %d KV heads", n_heads, Hkv);
        return;
    }
    if (!batch_ok(&c, b, kv, Hkv, head_dim, 1))
        return;
    size_t n = (size_t)b->n_tokens, w = (size_t)n_heads * (size_t)head_dim, s = (size_t)stride;
    if (!n || (act_ok(&c, "out", out, n, w, w) && act_ok(&c, "q", q, n, w, s) &&
               apart_ok(&c, "out", out, extent(c.ck, n, w, w), "q", q, extent(c.ck, n, w, s))))
        c.ck->in->ops->attention_paged(c.ck->in, out, q, stride, kv, b, n_heads, head_dim);
}

static void ck_patchify(struct cvlm_backend *be, void *out, const float *pixels, int C, int H,
                        int W, int P)
{
    struct call c = {ck_of(be), "patchify"};
    if (!enter(&c) || !width_ok(&c, "C", C) || !width_ok(&c, "H", H) || !width_ok(&c, "W", W) ||
        !width_ok(&c, "P", P) || !host_ok(&c, "pixels", pixels, (size_t)C * H * W, sizeof(float)))
        return;
    if (H % P || W % P) {
        fail(&c, CVLM_ESHAPE, "a %d x %d image does not split into %d x %d patches", H, W, P, P);
        return;
    }
    size_t rows = (size_t)(H / P) * (size_t)(W / P), w = (size_t)C * P * P;
    if (act_ok(&c, "out", out, rows, w, w))
        c.ck->in->ops->patchify(c.ck->in, out, pixels, C, H, W, P);
}

/* ---- weights, status, lifetime ----------------------------------------------------------- */

static int ck_upload_weights(struct cvlm_backend *be, struct cvlm_tensor *const *ts, int n,
                             uint64_t seed)
{
    struct call c = {ck_of(be), "upload_weights"};
    if (!rows_ok(&c, "n", n) || !host_ok(&c, "ts", ts, (size_t)n, sizeof(void *)))
        return CVLM_EINVAL;
    char name[32];
    for (int i = 0; i < n; i++) {
        if (!ts[i] || ts[i]->ndim < 0 || ts[i]->ndim > CVLM_MAX_DIMS ||
            (unsigned)ts[i]->dtype > CVLM_DTYPE_Q4) {
            fail(&c, CVLM_ESHAPE, "tensor %d: %s", i, ts[i] ? "bad dtype or rank" : "NULL");
            return CVLM_ESHAPE;
        }
        snprintf(name, sizeof(name), "tensor %d", i);
        if (!quant_extras_ok(&c, name, ts[i], 1)) /* perm is still host memory here */
            return CVLM_ESHAPE;
    }
    return c.ck->in->ops->upload_weights(c.ck->in, ts, n, seed);
}

/* The first violation since the last call (then forgotten: the op was skipped, so the
 * backend's memory is as sound as before, and only this step fails), else the backend's
 * own status. Waits for the queued work either way. */
static int ck_status(struct cvlm_backend *be)
{
    struct checked *ck = ck_of(be);
    char msg[sizeof(ck->msg)];
    int inner = ck->in->ops->status ? ck->in->ops->status(ck->in) : 0;
    pthread_mutex_lock(&ck->mu);
    int err = ck->err;
    memcpy(msg, ck->msg, sizeof(msg));
    ck->err = 0;
    ck->msg[0] = 0;
    pthread_mutex_unlock(&ck->mu);
    if (err)
        return cvlm_errf(err, "%s", msg);
    return inner;
}

static void ck_destroy(struct cvlm_backend *be)
{
    struct checked *ck = ck_of(be);
    ck->in->ops->destroy(ck->in);
    pthread_mutex_destroy(&ck->mu);
    free(ck->live);
    free(ck);
}

struct cvlm_backend *cvlm_backend_check_inner(struct cvlm_backend *be)
{
    return be && be->ops->destroy == ck_destroy ? ck_of(be)->in : be;
}

struct cvlm_backend *cvlm_backend_check_wrap(struct cvlm_backend *inner)
{
    struct checked *ck = calloc(1, sizeof(*ck));
    const struct cvlm_backend_i *o = inner->ops;
    if (!ck) {
        cvlm_errf(CVLM_ENOMEM, "out of memory");
        return NULL;
    }
    /* an op the backend lacks stays NULL (add_rmsnorm is optional: the model tests it) */
#define CHECKED(f) .f = o->f ? ck_##f : NULL
    ck->ops = (struct cvlm_backend_i){
        .name = o->name,
        .alloc = ck_alloc,
        .free = ck_free,
        CHECKED(to_host),
        CHECKED(from_host),
        CHECKED(copy_rows),
        CHECKED(gemm),
        CHECKED(embed),
        CHECKED(rmsnorm),
        CHECKED(layernorm),
        CHECKED(add),
        CHECKED(add_rmsnorm),
        CHECKED(add_row),
        CHECKED(gelu),
        CHECKED(silu_mul),
        CHECKED(rope),
        CHECKED(attention_full),
        CHECKED(kv_write),
        CHECKED(attention_paged),
        CHECKED(patchify),
        CHECKED(upload_weights),
        .status = ck_status,
        .destroy = ck_destroy,
    };
#undef CHECKED
    ck->base = *inner;
    ck->base.ops = &ck->ops;
    ck->in = inner;
    pthread_mutex_init(&ck->mu, NULL);
    return &ck->base;
}
