/* op_parity.c - every op of the CUDA backend against the CPU backend (device-only test).
 *
 * Usage: op-parity [--json FILE] [--device N] [--no-bench] [--self-test]. Built by
 * `make cuda` into build-cuda/tests/op-parity; run by tests/gpu/run.sh.
 *
 * Both backends get the same inputs: random activations already rounded to BF16 (so the
 * CPU's F32 copy and the GPU's BF16 copy hold the same values) and random weights of
 * each stored dtype (F32, F16, BF16) that the CUDA backend uploads (converting to BF16).
 * The error of an output is measured against the CPU result as
 *     max_abs = max_i |gpu_i - cpu_i|,   max_rel = max_abs / max_i |cpu_i|
 * (normalised by the output's scale: element-wise relative errors are meaningless where
 * outputs cross zero). Tolerances on max_rel, from BF16 activations (8 bits of mantissa,
 * one rounding per op output = 2^-9 relative, plus F32-vs-BF16 inputs of the next step):
 *     exact   0      copies, gathers, patchify, BF16 fills (bit-identical by design)
 *     TOL_EW  1e-2   element-wise ops, RoPE, embedding of F32/F16 tables
 *     TOL_MM  2e-2   GEMM (weights F32/F16 rounded to BF16 at upload), norms
 *     TOL_AT  3e-2   attention (probabilities rounded to BF16 before P.V)
 * The attention and small-M GEMM cases run a second time on a backend created with
 * COGVLM_CUDA_ATTN=simple COGVLM_CUDA_GEMV=0 (the reference attention kernel and cuBLAS
 * for every GEMM), so a failure points at one kernel. Then the sticky error mechanism,
 * NCCL (with >= 2 devices) and, unless --no-bench, a few timings of the hot kernels.
 * One line per case with PASS/FAIL; exit status 1 if any case failed; --json writes a
 * summary {device, passed, failed, results[], bench{}}. --self-test runs the cases with a
 * second CPU backend in place of the GPU (no GPU needed: checks the harness itself).
 */
#include "engine/comm.h"
#include "engine/error.h"
#include "kernels/cuda/cuda_api.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TOL_EW 1e-2
#define TOL_MM 2e-2
#define TOL_AT 3e-2

struct ctx {
    struct cvlm_backend *cpu, *gpu;
    const char *label; /* "" or " [reference kernels]" */
    FILE *json;
    int passed, failed, n_json;
    uint64_t rng;
};

/* a buffer of n activations in both backends */
struct pair {
    void *c, *g;
    size_t n;
};

/* a weight in both: c points at host data, g at its upload */
struct wpair {
    struct cvlm_tensor c, g;
    void *host;
};

/* ---- data ------------------------------------------------------------------------------ */

static float frand(struct ctx *c) /* uniform in [-1, 1) */
{
    uint64_t z = (c->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)((double)(z >> 40) / 8388608.0 - 1.0);
}

static float bf16r(float x)
{
    return cvlm_bf16_to_f32(cvlm_f32_to_bf16(x));
}

static float *rand_act(struct ctx *c, size_t n, float scale)
{
    float *p = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; p && i < n; i++)
        p[i] = bf16r(frand(c) * scale);
    return p;
}

/* round-to-nearest-even F32 -> F16 for the normal range the tests use */
static uint16_t f32_to_f16(float f)
{
    uint32_t u, sign, man;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    int e = (int)((u >> 23) & 0xffu) - 127 + 15;
    if (e <= 0)
        return (uint16_t)sign; /* |f| < 6e-5: flushed, never produced below */
    man = u & 0x7fffffu;
    uint32_t h = sign | ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
        h++;
    return (uint16_t)h;
}

static struct pair pair_new(struct ctx *c, const float *host, size_t n)
{
    size_t es = cvlm_dtype_size(c->gpu->act_dtype);
    struct pair p = {c->cpu->ops->alloc(c->cpu, (n ? n : 1) * 4),
                     c->gpu->ops->alloc(c->gpu, (n ? n : 1) * es), n};
    if (!p.c || !p.g) {
        fprintf(stderr, "op-parity: out of memory (%zu elements): %s\n", n, cvlm_last_error());
        exit(2);
    }
    if (host) {
        c->cpu->ops->from_host(c->cpu, p.c, host, n);
        c->gpu->ops->from_host(c->gpu, p.g, host, n);
    }
    return p;
}

static struct pair pair_rand(struct ctx *c, size_t n, float scale)
{
    float *h = rand_act(c, n, scale);
    struct pair p = pair_new(c, h, n);
    free(h);
    return p;
}

static void pair_free(struct ctx *c, struct pair *p)
{
    c->cpu->ops->free(c->cpu, p->c);
    c->gpu->ops->free(c->gpu, p->g);
}

/* A weight of `dt` with values uniform in [-scale, scale) (offset added), uploaded. */
static void weight_new(struct ctx *c, struct wpair *w, enum cvlm_dtype dt, int64_t rows,
                       int64_t cols, float scale, float offset)
{
    size_t n = (size_t)rows * cols, es = cvlm_dtype_size(dt);
    memset(w, 0, sizeof(*w));
    w->host = malloc(n * es);
    for (size_t i = 0; i < n; i++) {
        float v = frand(c) * scale + offset;
        if (dt == CVLM_DTYPE_F32)
            ((float *)w->host)[i] = v;
        else if (dt == CVLM_DTYPE_BF16)
            ((uint16_t *)w->host)[i] = cvlm_f32_to_bf16(v);
        else
            ((uint16_t *)w->host)[i] = f32_to_f16(v);
    }
    w->c = (struct cvlm_tensor){
        dt, rows > 1 ? 2 : 1, {rows > 1 ? rows : cols, cols}, w->host, CVLM_FILL_NONE};
    w->g = w->c;
    struct cvlm_tensor *t = &w->g;
    if (c->gpu->ops->upload_weights(c->gpu, &t, 1, 1)) {
        fprintf(stderr, "op-parity: upload_weights: %s\n", cvlm_last_error());
        exit(2);
    }
}

static void weight_free(struct wpair *w)
{
    free(w->host); /* the device copy belongs to the backend until destroy */
}

/* ---- comparison ------------------------------------------------------------------------ */

static void record(struct ctx *c, const char *op, const char *shape, double mabs, double rel,
                   double tol, int pass)
{
    printf("%-18s %-52s max_abs %.3e max_rel %.3e tol %.0e  %s\n", op, shape, mabs, rel, tol,
           pass ? "PASS" : "FAIL");
    fflush(stdout);
    pass ? c->passed++ : c->failed++;
    if (c->json)
        fprintf(c->json,
                "%s\n  {\"op\": \"%s\", \"shape\": \"%s\", \"max_abs\": %.6g, \"max_rel\": %.6g,"
                " \"tol\": %g, \"pass\": %s}",
                c->n_json++ ? "," : "", op, shape, isfinite(mabs) ? mabs : 1e30,
                isfinite(rel) ? rel : 1e30, tol, pass ? "true" : "false");
}

/* Compares the first n elements of a pair (CPU = reference). */
static void check(struct ctx *c, const char *op, const char *shape, const struct pair *p, size_t n,
                  double tol)
{
    float *a = malloc((n ? n : 1) * 4), *b = malloc((n ? n : 1) * 4);
    char full[160];
    double mabs = 0, mref = 0;
    int bad = 0;
    c->cpu->ops->to_host(c->cpu, a, p->c, n);
    c->gpu->ops->to_host(c->gpu, b, p->g, n);
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)b[i] - a[i]);
        if (!(d <= mabs))
            mabs = d; /* NaN too */
        mref = fabs(a[i]) > mref ? fabs(a[i]) : mref;
        bad |= !isfinite(b[i]);
    }
    double rel = mabs / (mref > 1e-6 ? mref : 1e-6);
    snprintf(full, sizeof(full), "%s%s", shape, c->label);
    record(c, op, full, mabs, rel, tol, !bad && rel <= tol);
    free(a);
    free(b);
}

static const enum cvlm_dtype dtypes[] = {CVLM_DTYPE_F32, CVLM_DTYPE_F16, CVLM_DTYPE_BF16};

/* ---- memory, gathers, element-wise -------------------------------------------------------- */

static void test_copies(struct ctx *c)
{
    char s[96];
    struct pair x = pair_rand(c, 1001, 3.0f); /* from_host + to_host round trip */
    check(c, "to_host/from_host", "n=1001", &x, 1001, 0);
    pair_free(c, &x);
    int R = 300, W = 129, n = 77;
    int32_t rows[77];
    for (int i = 0; i < n; i++)
        rows[i] = (i * 37 + 11) % R;
    struct pair src = pair_rand(c, (size_t)R * W, 2.0f), dst = pair_new(c, NULL, (size_t)n * W);
    c->cpu->ops->copy_rows(c->cpu, dst.c, src.c, rows, n, W);
    c->gpu->ops->copy_rows(c->gpu, dst.g, src.g, rows, n, W);
    snprintf(s, sizeof(s), "n=%d width=%d", n, W);
    check(c, "copy_rows", s, &dst, (size_t)n * W, 0);
    pair_free(c, &src);
    pair_free(c, &dst);
}

static void test_embed(struct ctx *c)
{
    const int Ds[] = {129, 4096}, Ms[] = {1, 77};
    for (int di = 0; di < 3; di++)
        for (int k = 0; k < 2; k++) {
            int D = Ds[k], M = Ms[k], V = 1000;
            struct wpair t;
            int32_t ids[77];
            char s[96];
            weight_new(c, &t, dtypes[di], V, D, 1.0f, 0.0f);
            for (int i = 0; i < M; i++)
                ids[i] = (i * 131 + 7) % V;
            struct pair out = pair_new(c, NULL, (size_t)M * D);
            c->cpu->ops->embed(c->cpu, out.c, &t.c, ids, M, D);
            c->gpu->ops->embed(c->gpu, out.g, &t.g, ids, M, D);
            snprintf(s, sizeof(s), "M=%d D=%d table %s", M, D, cvlm_dtype_name(dtypes[di]));
            check(c, "embed", s, &out, (size_t)M * D, dtypes[di] == CVLM_DTYPE_BF16 ? 0 : TOL_EW);
            pair_free(c, &out);
            weight_free(&t);
        }
}

static void test_elementwise(struct ctx *c)
{
    char s[96];
    size_t n = 77 * 129;
    struct pair y = pair_rand(c, n, 2.0f), x = pair_rand(c, n, 2.0f);
    c->cpu->ops->add(c->cpu, y.c, x.c, n);
    c->gpu->ops->add(c->gpu, y.g, x.g, n);
    check(c, "add", "n=9933", &y, n, TOL_EW);
    c->cpu->ops->gelu(c->cpu, x.c, n);
    c->gpu->ops->gelu(c->gpu, x.g, n);
    check(c, "gelu", "n=9933 in [-2,2)", &x, n, TOL_EW);
    for (int di = 0; di < 3; di++) { /* add_row with a bias of each dtype */
        struct wpair b;
        weight_new(c, &b, dtypes[di], 1, 129, 1.0f, 0.0f);
        c->cpu->ops->add_row(c->cpu, y.c, &b.c, 77, 129);
        c->gpu->ops->add_row(c->gpu, y.g, &b.g, 77, 129);
        snprintf(s, sizeof(s), "M=77 D=129 bias %s", cvlm_dtype_name(dtypes[di]));
        check(c, "add_row", s, &y, n, TOL_EW);
        weight_free(&b);
    }
    pair_free(c, &y);
    pair_free(c, &x);
    /* silu_mul: fused [gate|up] rows (stride 2N), then in place (out = gate, stride N) */
    int M = 77, N = 300;
    struct pair gu = pair_rand(c, (size_t)M * 2 * N, 4.0f), o = pair_new(c, NULL, (size_t)M * N);
    c->cpu->ops->silu_mul(c->cpu, o.c, gu.c, (float *)gu.c + N, 2 * N, M, N);
    c->gpu->ops->silu_mul(c->gpu, o.g, gu.g, cvlm_be_row(c->gpu, gu.g, 1, (size_t)N), 2 * N, M, N);
    check(c, "silu_mul", "M=77 N=300 fused gate|up", &o, (size_t)M * N, TOL_EW);
    struct pair u = pair_rand(c, (size_t)M * N, 4.0f);
    c->cpu->ops->silu_mul(c->cpu, o.c, o.c, u.c, N, M, N);
    c->gpu->ops->silu_mul(c->gpu, o.g, o.g, u.g, N, M, N);
    check(c, "silu_mul", "M=77 N=300 in place", &o, (size_t)M * N, TOL_EW);
    pair_free(c, &gu);
    pair_free(c, &o);
    pair_free(c, &u);
}

static void test_patchify(struct ctx *c)
{
    int C = 3, S = 490, P = 14, np = (S / P) * (S / P);
    float *px = rand_act(c, (size_t)C * S * S, 2.0f);
    struct pair out = pair_new(c, NULL, (size_t)np * C * P * P);
    c->cpu->ops->patchify(c->cpu, out.c, px, C, S, S, P);
    c->gpu->ops->patchify(c->gpu, out.g, px, C, S, S, P);
    check(c, "patchify", "3x490x490 P=14", &out, (size_t)np * C * P * P, 0);
    pair_free(c, &out);
    free(px);
}

/* ---- norms, GEMM, RoPE ------------------------------------------------------------------------
 */

static void test_norms(struct ctx *c)
{
    const int Ms[] = {1, 3, 77, 300}, Ds[] = {77, 1792, 4096};
    for (int mi = 0; mi < 4; mi++)
        for (int k = 0; k < 3; k++) {
            int M = Ms[mi], D = Ds[k];
            enum cvlm_dtype dt = dtypes[(mi + k) % 3];
            struct wpair w, b;
            char s[96];
            weight_new(c, &w, dt, 1, D, 0.5f, 1.0f);
            weight_new(c, &b, dt, 1, D, 0.5f, 0.0f);
            struct pair x = pair_rand(c, (size_t)M * D, 3.0f), y = pair_new(c, NULL, (size_t)M * D);
            c->cpu->ops->rmsnorm(c->cpu, y.c, x.c, &w.c, M, D, 1e-5f);
            c->gpu->ops->rmsnorm(c->gpu, y.g, x.g, &w.g, M, D, 1e-5f);
            snprintf(s, sizeof(s), "M=%d D=%d w %s", M, D, cvlm_dtype_name(dt));
            check(c, "rmsnorm", s, &y, (size_t)M * D, TOL_MM);
            c->cpu->ops->layernorm(c->cpu, x.c, x.c, &w.c, &b.c, M, D, 1e-6f); /* in place */
            c->gpu->ops->layernorm(c->gpu, x.g, x.g, &w.g, &b.g, M, D, 1e-6f);
            snprintf(s, sizeof(s), "M=%d D=%d w,b %s in place", M, D, cvlm_dtype_name(dt));
            check(c, "layernorm", s, &x, (size_t)M * D, TOL_MM);
            /* the residual step, y aliasing the residual input r (as the model calls it) */
            struct pair r = pair_rand(c, (size_t)M * D, 1.0f);
            c->cpu->ops->add_rmsnorm(c->cpu, r.c, x.c, r.c, &w.c, M, D, 1e-5f);
            c->gpu->ops->add_rmsnorm(c->gpu, r.g, x.g, r.g, &w.g, M, D, 1e-5f);
            snprintf(s, sizeof(s), "M=%d D=%d w %s, y = r", M, D, cvlm_dtype_name(dt));
            check(c, "add_rmsnorm", s, &r, (size_t)M * D, TOL_MM);
            check(c, "add_rmsnorm x", s, &x, (size_t)M * D, TOL_EW);
            pair_free(c, &r);
            pair_free(c, &x);
            pair_free(c, &y);
            weight_free(&w);
            weight_free(&b);
        }
}

struct gemm_case {
    int M, N, K, stride, bias;
};

static void gemm_one(struct ctx *c, const struct gemm_case *g, enum cvlm_dtype dt)
{
    struct wpair w, b;
    char s[96];
    weight_new(c, &w, dt, g->N, g->K, 0.05f, 0.0f);
    if (g->bias)
        weight_new(c, &b, dt, 1, g->N, 0.5f, 0.0f);
    struct pair x = pair_rand(c, (size_t)g->M * g->stride, 1.0f);
    struct pair y = pair_new(c, NULL, (size_t)g->M * g->N);
    c->cpu->ops->gemm(c->cpu, y.c, x.c, g->stride, &w.c, g->bias ? &b.c : NULL, g->M, g->N, g->K);
    c->gpu->ops->gemm(c->gpu, y.g, x.g, g->stride, &w.g, g->bias ? &b.g : NULL, g->M, g->N, g->K);
    snprintf(s, sizeof(s), "M=%d N=%d K=%d ldx=%d%s W %s", g->M, g->N, g->K, g->stride,
             g->bias ? " +bias" : "", cvlm_dtype_name(dt));
    check(c, "gemm", s, &y, (size_t)g->M * g->N, TOL_MM);
    pair_free(c, &x);
    pair_free(c, &y);
    weight_free(&w);
    if (g->bias)
        weight_free(&b);
}

static void test_gemm(struct ctx *c, int small_only)
{
    static const struct gemm_case cases[] = {
        {1, 4096, 4096, 4096, 0},   {3, 11008, 4096, 4096, 0}, {1, 4096, 11008, 11008, 0},
        {4, 77, 64, 64, 1},         {1, 300, 129, 129, 1},     {3, 129, 515, 520, 1},
        {77, 300, 129, 129, 0},     {77, 129, 515, 600, 1},    {300, 1792, 1792, 5376, 1},
        {300, 4096, 1792, 1792, 0}, {1226, 588, 588, 588, 1},  {16, 12288, 4096, 4096, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        for (int di = 0; di < 3; di++)
            if (!small_only || cases[i].M <= 4)
                gemm_one(c, &cases[i], dtypes[di]);
}

static void rope_one(struct ctx *c, int M, int H, int hd, int stride)
{
    int half = hd / 2;
    int32_t *pos = malloc((size_t)M * sizeof(int32_t));
    float *inv = malloc((size_t)half * sizeof(float));
    char s[96];
    for (int i = 0; i < M; i++)
        pos[i] = (int32_t)((i * 2654435761u) % 4096u);
    for (int j = 0; j < half; j++)
        inv[j] = 1.0f / powf(10000.0f, (float)(2 * j) / (float)hd);
    struct pair x = pair_rand(c, (size_t)M * stride, 2.0f);
    c->cpu->ops->rope(c->cpu, x.c, stride, pos, M, H, hd, inv);
    c->gpu->ops->rope(c->gpu, x.g, stride, pos, M, H, hd, inv);
    snprintf(s, sizeof(s), "M=%d heads=%d hd=%d stride=%d pos<4096", M, H, hd, stride);
    check(c, "rope", s, &x, (size_t)M * stride, TOL_EW);
    pair_free(c, &x);
    free(pos);
    free(inv);
}

/* ---- attention ------------------------------------------------------------------------------ */

static void attn_full_one(struct ctx *c, int N, int H, int hd)
{
    char s[96];
    struct pair qkv = pair_rand(c, (size_t)N * 3 * H * hd, 2.0f); /* peaky enough softmax */
    struct pair out = pair_new(c, NULL, (size_t)N * H * hd);
    c->cpu->ops->attention_full(c->cpu, out.c, qkv.c, N, H, hd);
    c->gpu->ops->attention_full(c->gpu, out.g, qkv.g, N, H, hd);
    snprintf(s, sizeof(s), "N=%d heads=%d hd=%d", N, H, hd);
    check(c, "attention_full", s, &out, (size_t)N * H * hd, TOL_AT);
    pair_free(c, &qkv);
    pair_free(c, &out);
}

/* A paged scenario: sequence s has history[s] cached slots before the batch's run of
 * run[s] tokens (decode = 1). Physical blocks are handed out in a scrambled order. */
struct paged_case {
    int H, hd, n_seqs;
    int history[8], run[8];
};

struct paged_setup {
    int n_hist, n_tok, n_blocks;
    int32_t *tables, *hseq, *hslot, *seq, *slot;
    struct cvlm_seq_kv seqs[8];
};

static void paged_plan(const struct paged_case *pc, struct paged_setup *ps)
{
    int bs = 16, nb = 0, h = 0, t = 0;
    memset(ps, 0, sizeof(*ps));
    for (int s = 0; s < pc->n_seqs; s++) {
        ps->n_hist += pc->history[s];
        ps->n_tok += pc->run[s];
        nb += (pc->history[s] + pc->run[s] + bs - 1) / bs;
    }
    ps->n_blocks = nb + 3; /* a few never used */
    ps->tables = malloc((size_t)nb * sizeof(int32_t));
    ps->hseq = malloc((size_t)(ps->n_hist + 1) * 4);
    ps->hslot = malloc((size_t)(ps->n_hist + 1) * 4);
    ps->seq = malloc((size_t)ps->n_tok * 4);
    ps->slot = malloc((size_t)ps->n_tok * 4);
    for (int i = 0; i < nb; i++) /* a permutation of 0..n_blocks-1 restricted to nb */
        ps->tables[i] = (int32_t)(((long)i * 7 + 3) % ps->n_blocks);
    for (int s = 0, at = 0; s < pc->n_seqs; s++) {
        int cnt = (pc->history[s] + pc->run[s] + bs - 1) / bs;
        ps->seqs[s] = (struct cvlm_seq_kv){ps->tables + at, cnt};
        at += cnt;
        for (int i = 0; i < pc->history[s]; i++, h++)
            ps->hseq[h] = s, ps->hslot[h] = i;
        for (int i = 0; i < pc->run[s]; i++, t++)
            ps->seq[t] = s, ps->slot[t] = pc->history[s] + i;
    }
}

static void paged_free(struct paged_setup *ps)
{
    free(ps->tables);
    free(ps->hseq);
    free(ps->hslot);
    free(ps->seq);
    free(ps->slot);
}

static void paged_one(struct ctx *c, const struct paged_case *pc, const char *name)
{
    struct paged_setup ps;
    char s[128];
    paged_plan(pc, &ps);
    int W = pc->H * pc->hd, bs = 16;
    size_t cache = (size_t)ps.n_blocks * bs * W;
    float *zero = calloc(cache, sizeof(float)); /* slots never written compare equal */
    struct pair kc = pair_new(c, zero, cache), vc = pair_new(c, zero, cache);
    free(zero);
    struct cvlm_kv_layer kvc = {kc.c, vc.c}, kvg = {kc.g, vc.g};
    /* history: keys and values of the earlier slots, written as one kv_write */
    if (ps.n_hist) {
        struct pair hk = pair_rand(c, (size_t)ps.n_hist * W, 2.0f);
        struct pair hv = pair_rand(c, (size_t)ps.n_hist * W, 2.0f);
        struct cvlm_attn_batch hb = {ps.n_hist, ps.hseq, ps.hslot, ps.seqs, bs};
        c->cpu->ops->kv_write(c->cpu, &kvc, hk.c, hv.c, W, &hb, pc->H, pc->hd);
        c->gpu->ops->kv_write(c->gpu, &kvg, hk.g, hv.g, W, &hb, pc->H, pc->hd);
        pair_free(c, &hk);
        pair_free(c, &hv);
    }
    /* the batch: rows [q | k | v] as the model lays them out */
    struct pair qkv = pair_rand(c, (size_t)ps.n_tok * 3 * W, 2.0f);
    struct pair out = pair_new(c, NULL, (size_t)ps.n_tok * W);
    struct cvlm_attn_batch b = {ps.n_tok, ps.seq, ps.slot, ps.seqs, bs};
    c->cpu->ops->kv_write(c->cpu, &kvc, (float *)qkv.c + W, (float *)qkv.c + 2 * W, 3 * W, &b,
                          pc->H, pc->hd);
    c->gpu->ops->kv_write(c->gpu, &kvg, cvlm_be_row(c->gpu, qkv.g, 1, (size_t)W),
                          cvlm_be_row(c->gpu, qkv.g, 2, (size_t)W), 3 * W, &b, pc->H, pc->hd);
    snprintf(s, sizeof(s), "%s: K cache after", name);
    check(c, "kv_write", s, &kc, cache, 0);
    snprintf(s, sizeof(s), "%s: V cache after", name);
    check(c, "kv_write", s, &vc, cache, 0);
    c->cpu->ops->attention_paged(c->cpu, out.c, qkv.c, 3 * W, &kvc, &b, pc->H, pc->hd);
    c->gpu->ops->attention_paged(c->gpu, out.g, qkv.g, 3 * W, &kvg, &b, pc->H, pc->hd);
    snprintf(s, sizeof(s), "%s (%d tokens, %d seqs)", name, ps.n_tok, pc->n_seqs);
    check(c, "attention_paged", s, &out, (size_t)ps.n_tok * W, TOL_AT);
    pair_free(c, &kc);
    pair_free(c, &vc);
    pair_free(c, &qkv);
    pair_free(c, &out);
    paged_free(&ps);
}

static void test_attention(struct ctx *c)
{
    attn_full_one(c, 257, 16, 112);
    attn_full_one(c, 1226, 16, 112);
    attn_full_one(c, 5, 2, 16);
    attn_full_one(c, 77, 4, 64);
    attn_full_one(c, 100, 2, 200); /* head size > 128: the reference kernel */
    /* LM shapes: prefill 300 from 0, decode at 4095, a 77-token chunk after 1000 cached
     * slots, decode at 1300, a 3-token chunk (decode path), the first token of a sequence */
    static const struct paged_case lm = {
        32, 128, 6, {0, 4095, 1000, 1300, 20, 0}, {300, 1, 77, 1, 3, 1}};
    static const struct paged_case dec = {32, 128, 4, {1277, 1290, 2047, 15}, {1, 1, 1, 1}};
    static const struct paged_case tiny = {4, 16, 3, {0, 33, 5}, {40, 1, 9}};
    static const struct paged_case odd = {3, 24, 2, {17, 0}, {1, 70}};
    paged_one(c, &lm, "H=32 hd=128 mixed");
    paged_one(c, &dec, "H=32 hd=128 decode only");
    paged_one(c, &tiny, "H=4 hd=16 mixed");
    paged_one(c, &odd, "H=3 hd=24 mixed");
}

/* ---- weights, errors, NCCL --------------------------------------------------------------------
 */

/* Generated weights: the CUDA fills are bit-identical to the CPU backend's (BF16). */
static void test_fills(struct ctx *c)
{
    const enum cvlm_fill fills[] = {CVLM_FILL_RANDOM, CVLM_FILL_ONES, CVLM_FILL_ZEROS};
    const char *names[] = {"RANDOM", "ONES", "ZEROS"};
    struct cvlm_tensor tc[3], tg[3], *pc[3], *pg[3];
    int32_t ids[64];
    for (int i = 0; i < 3; i++) {
        tc[i] = (struct cvlm_tensor){CVLM_DTYPE_BF16, 2, {64, 129}, NULL, fills[i]};
        tg[i] = tc[i];
        pc[i] = &tc[i];
        pg[i] = &tg[i];
    }
    for (int i = 0; i < 64; i++)
        ids[i] = i;
    if (c->cpu->ops->upload_weights(c->cpu, pc, 3, 42) ||
        c->gpu->ops->upload_weights(c->gpu, pg, 3, 42)) {
        record(c, "upload_weights", cvlm_last_error(), 1e30, 1e30, 0, 0);
        return;
    }
    for (int i = 0; i < 3; i++) {
        struct pair out = pair_new(c, NULL, 64 * 129);
        char s[64];
        c->cpu->ops->embed(c->cpu, out.c, &tc[i], ids, 64, 129);
        c->gpu->ops->embed(c->gpu, out.g, &tg[i], ids, 64, 129);
        snprintf(s, sizeof(s), "fill %s [64,129] BF16", names[i]);
        check(c, "upload_weights", s, &out, 64 * 129, 0);
        pair_free(c, &out);
    }
}

/* An op with a bad shape makes the backend's error sticky, with file:line; clearing it
 * lets ops run again. */
static void test_errors(struct ctx *c)
{
    struct wpair w;
    weight_new(c, &w, CVLM_DTYPE_BF16, 8, 8, 1.0f, 0.0f);
    struct pair x = pair_rand(c, 64, 1.0f), y = pair_new(c, NULL, 64);
    int before = cvlm_backend_cuda_status(c->gpu, 0);
    c->gpu->ops->gemm(c->gpu, y.g, x.g, 8, &w.g, NULL, 8, 9, 8); /* W is 8 x 8, not 9 x 8 */
    int rc = c->gpu->ops->status(c->gpu);
    const char *msg = cvlm_last_error();
    int ok = before == 0 && rc == CVLM_ESHAPE && strstr(msg, "gemm.cu:") != NULL;
    printf("  sticky error: %s\n", msg);
    int after = cvlm_backend_cuda_status(c->gpu, 1);
    ok = ok && after == CVLM_ESHAPE && cvlm_backend_cuda_status(c->gpu, 0) == 0;
    record(c, "status", "bad gemm shape -> CVLM_ESHAPE with file:line, cleared", 0, 0, 0, ok);
    pair_free(c, &x);
    pair_free(c, &y);
    weight_free(&w);
}

struct nccl_rank {
    struct cvlm_backend *be;
    struct cvlm_comm *comm;
    int rank, rc;
    double err;
};

/* Rank r holds (r + 1) * v[i]; after the sum every rank holds 3 * v[i] (2 ranks). */
static void *nccl_rank_main(void *arg)
{
    struct nccl_rank *r = arg;
    size_t n = 4099;
    float *h = malloc(n * 4), *back = malloc(n * 4);
    void *buf = r->be->ops->alloc(r->be, n * 2);
    for (size_t i = 0; i < n; i++)
        h[i] = (float)((i % 64) - 32) * (float)(r->rank + 1);
    r->be->ops->from_host(r->be, buf, h, n);
    r->rc = cvlm_comm_allreduce(r->comm, buf, n);
    r->be->ops->to_host(r->be, back, buf, n);
    for (size_t i = 0; i < n; i++) {
        double d = fabs(back[i] - 3.0 * ((double)(i % 64) - 32));
        r->err = d > r->err || d != d ? d : r->err;
    }
    r->be->ops->free(r->be, buf);
    free(h);
    free(back);
    return NULL;
}

static void test_nccl(struct ctx *c, int device)
{
    int n = cvlm_cuda_device_count();
    if (n < 2) {
        printf("%-18s %-52s skipped (%d device)\n", "nccl allreduce", "2 ranks", n);
        return;
    }
    struct nccl_rank r[2] = {{c->gpu, NULL, 0, 0, 0},
                             {cvlm_backend_cuda_create(device == 0 ? 1 : 0), NULL, 1, 0, 0}};
    struct cvlm_backend *be[2] = {r[0].be, r[1].be};
    struct cvlm_comm *comm[2];
    if (!be[1] || cvlm_comm_nccl_group_create(be, 2, comm)) {
        record(c, "nccl allreduce", cvlm_last_error(), 1e30, 1e30, 0, 0);
        if (be[1])
            be[1]->ops->destroy(be[1]);
        return;
    }
    pthread_t th[2]; /* one thread per rank, as the engine runs them */
    for (int i = 0; i < 2; i++) {
        r[i].comm = comm[i];
        pthread_create(&th[i], NULL, nccl_rank_main, &r[i]);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    double err = r[0].err > r[1].err ? r[0].err : r[1].err;
    record(c, "nccl allreduce", "2 ranks, 4099 BF16", err, err, 0,
           !r[0].rc && !r[1].rc && err == 0);
    cvlm_comm_destroy(comm[0]);
    cvlm_comm_destroy(comm[1]);
    be[1]->ops->destroy(be[1]);
}

/* ---- timings ---------------------------------------------------------------------------- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The hot ops on fixed shapes, run back to back (device buffers hold whatever they hold:
 * only the time matters). */
struct bench_bufs {
    struct cvlm_tensor w;
    void *x, *y, *kc, *vc;
    struct cvlm_attn_batch dec, pre;
    struct cvlm_kv_layer kv;
};

enum bench_op { B_GEMV, B_GEMM64, B_VIT_ATTN, B_DECODE_ATTN, B_PREFILL_ATTN };

static void bench_call(struct cvlm_backend *g, struct bench_bufs *b, enum bench_op op)
{
    switch (op) {
    case B_GEMV:
        g->ops->gemm(g, b->y, b->x, 4096, &b->w, NULL, 1, 11008, 4096);
        break;
    case B_GEMM64:
        g->ops->gemm(g, b->y, b->x, 4096, &b->w, NULL, 64, 11008, 4096);
        break;
    case B_VIT_ATTN:
        g->ops->attention_full(g, b->y, b->x, 1226, 16, 112);
        break;
    case B_DECODE_ATTN:
        g->ops->attention_paged(g, b->y, b->x, 3 * 4096, &b->kv, &b->dec, 32, 128);
        break;
    case B_PREFILL_ATTN:
        g->ops->attention_paged(g, b->y, b->x, 3 * 4096, &b->kv, &b->pre, 32, 128);
        break;
    }
}

/* seconds per call, after a warm-up, synchronised through the status op */
static double time_op(struct cvlm_backend *g, struct bench_bufs *b, enum bench_op op, int reps)
{
    bench_call(g, b, op);
    g->ops->status(g);
    double t0 = now_s();
    for (int r = 0; r < reps; r++)
        bench_call(g, b, op);
    g->ops->status(g);
    return (now_s() - t0) / reps;
}

/* 64 sequences of 1300 cached slots each (83 blocks apiece, disjoint) */
#define B_SEQS 64
#define B_CTX 1300
#define B_BLK ((B_CTX + 15) / 16)

static int bench_setup(struct cvlm_backend *g, struct bench_bufs *b, int32_t *tables,
                       struct cvlm_seq_kv *seqs, int32_t *seq, int32_t *slot)
{
    struct cvlm_tensor *pw = &b->w;
    size_t cache = (size_t)B_SEQS * B_BLK * 16 * 4096 * 2;
    b->w = (struct cvlm_tensor){CVLM_DTYPE_BF16, 2, {11008, 4096}, NULL, CVLM_FILL_RANDOM};
    b->x = g->ops->alloc(g, (size_t)1278 * 3 * 4096 * 2);
    b->y = g->ops->alloc(g, (size_t)1278 * 11008 * 2);
    b->kc = g->ops->alloc(g, cache);
    b->vc = g->ops->alloc(g, cache);
    if (!b->x || !b->y || !b->kc || !b->vc || g->ops->upload_weights(g, &pw, 1, 7))
        return -1;
    b->kv = (struct cvlm_kv_layer){b->kc, b->vc};
    for (int i = 0; i < B_SEQS * B_BLK; i++)
        tables[i] = i;
    for (int s = 0; s < B_SEQS; s++) {
        seqs[s] = (struct cvlm_seq_kv){tables + s * B_BLK, B_BLK};
        seq[s] = s;
        slot[s] = B_CTX - 1;
    }
    for (int t = 0; t < 1278; t++) /* one 1278-token prefill of sequence 0 */
        seq[B_SEQS + t] = 0, slot[B_SEQS + t] = t;
    b->dec = (struct cvlm_attn_batch){B_SEQS, seq, slot, seqs, 16};
    b->pre = (struct cvlm_attn_batch){1278, seq + B_SEQS, slot + B_SEQS, seqs, 16};
    return 0;
}

static void bench(struct ctx *c)
{
    struct cvlm_backend *g = c->gpu;
    struct bench_bufs b = {0};
    static int32_t tables[B_SEQS * B_BLK], seq[B_SEQS + 1278], slot[B_SEQS + 1278];
    static struct cvlm_seq_kv seqs[B_SEQS];
    if (bench_setup(g, &b, tables, seqs, seq, slot) == 0) {
        double wb = 11008.0 * 4096 * 2, kvb = 2.0 * B_SEQS * B_CTX * 4096 * 2;
        double t1 = time_op(g, &b, B_GEMV, 50), t64 = time_op(g, &b, B_GEMM64, 20);
        double ta = time_op(g, &b, B_VIT_ATTN, 10), td = time_op(g, &b, B_DECODE_ATTN, 20);
        double tp = time_op(g, &b, B_PREFILL_ATTN, 10);
        double fa = 4.0 * 1226 * 1226 * 1792, fp = 2.0 * 2.0 * 4096 * 1278.0 * 1279 / 2;
        printf("bench: gemv 1x4096->11008 BF16      %8.1f us  %6.0f GB/s\n", t1 * 1e6,
               wb / t1 / 1e9);
        printf("bench: gemm 64x4096->11008          %8.1f us  %6.0f GB/s of weights\n", t64 * 1e6,
               wb / t64 / 1e9);
        printf("bench: ViT attention 1226x16x112    %8.3f ms  %6.1f TFLOP/s\n", ta * 1e3,
               fa / ta / 1e12);
        printf("bench: decode attention 64x1300 ctx %8.3f ms  %6.0f GB/s of K/V\n", td * 1e3,
               kvb / td / 1e9);
        printf("bench: prefill attention 1278 causal %7.3f ms  %6.1f TFLOP/s\n", tp * 1e3,
               fp / tp / 1e12);
        if (c->json)
            fprintf(c->json,
                    "],\n \"bench\": {\"gemv_m1_gbs\": %.1f, \"gemm_m64_weight_gbs\": %.1f,"
                    " \"vit_attention_ms\": %.4f, \"vit_attention_tflops\": %.2f,"
                    " \"decode_attention_ms\": %.4f, \"decode_attention_kv_gbs\": %.1f,"
                    " \"prefill_attention_ms\": %.4f, \"prefill_attention_tflops\": %.2f}",
                    wb / t1 / 1e9, wb / t64 / 1e9, ta * 1e3, fa / ta / 1e12, td * 1e3,
                    kvb / td / 1e9, tp * 1e3, fp / tp / 1e12);
    } else {
        printf("bench: setup failed: %s\n", cvlm_last_error());
        if (c->json)
            fprintf(c->json, "]");
    }
    void *bufs[] = {b.x, b.y, b.kc, b.vc};
    for (int i = 0; i < 4; i++)
        if (bufs[i])
            g->ops->free(g, bufs[i]);
}

/* ---- main -------------------------------------------------------------------------------------
 */

static struct cvlm_backend *make_gpu(int device, int reference)
{
    if (reference) {
        setenv("COGVLM_CUDA_ATTN", "simple", 1);
        setenv("COGVLM_CUDA_GEMV", "0", 1);
    }
    struct cvlm_backend *g = cvlm_backend_cuda_create(device);
    unsetenv("COGVLM_CUDA_ATTN");
    unsetenv("COGVLM_CUDA_GEMV");
    return g;
}

static void run_all(struct ctx *c)
{
    test_copies(c);
    test_embed(c);
    test_elementwise(c);
    test_patchify(c);
    test_norms(c);
    test_gemm(c, 0);
    rope_one(c, 77, 32, 128, 3 * 4096);
    rope_one(c, 3, 4, 16, 3 * 64);
    test_attention(c);
    test_fills(c);
}

int main(int argc, char **argv)
{
    struct ctx c = {.label = "", .rng = 12345};
    const char *json = NULL;
    int device = 0, do_bench = 1, self_test = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc)
            device = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-bench"))
            do_bench = 0;
        else if (!strcmp(argv[i], "--self-test"))
            self_test = 1;
        else {
            fprintf(stderr, "usage: op-parity [--json FILE] [--device N] [--no-bench] "
                            "[--self-test]\n");
            return 2;
        }
    }
    c.cpu = cvlm_backend_cpu_create(0);
    c.gpu = self_test ? cvlm_backend_cpu_create(0) : make_gpu(device, 0);
    if (!c.cpu || !c.gpu) {
        fprintf(stderr, "op-parity: cannot create the backends: %s\n", cvlm_last_error());
        return 2;
    }
    if (json && !(c.json = fopen(json, "w"))) {
        fprintf(stderr, "op-parity: %s: cannot create\n", json);
        return 2;
    }
    if (c.json)
        fprintf(c.json, "{\"device\": %d, \"results\": [", device);
    run_all(&c);
    if (self_test) { /* the harness against itself: every case must be exact */
        printf("op-parity --self-test: %d passed, %d failed\n", c.passed, c.failed);
        return c.failed ? 1 : 0;
    }
    test_errors(&c);
    test_nccl(&c, device);
    struct cvlm_backend *main_gpu = c.gpu;
    if ((c.gpu = make_gpu(device, 1))) { /* reference kernels: attention, cuBLAS small M */
        c.label = " [reference kernels]";
        test_gemm(&c, 1);
        test_attention(&c);
        c.gpu->ops->destroy(c.gpu);
        c.label = "";
    }
    c.gpu = main_gpu;
    if (do_bench)
        bench(&c);
    else if (c.json)
        fprintf(c.json, "]");
    int st = c.gpu->ops->status(c.gpu);
    if (st)
        printf("backend status at the end: %s\n", cvlm_last_error());
    printf("op-parity: %d passed, %d failed\n", c.passed, c.failed);
    if (c.json) {
        fprintf(c.json, ",\n \"passed\": %d, \"failed\": %d}\n", c.passed, c.failed);
        fclose(c.json);
    }
    c.gpu->ops->destroy(c.gpu);
    c.cpu->ops->destroy(c.cpu);
    return c.failed || st ? 1 : 0;
}
