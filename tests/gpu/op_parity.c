/* op_parity.c - every op of the CUDA backend against the CPU backend (device-only test).
 *
 * Usage: op-parity [--json FILE] [--device N] [--no-bench] [--reference | --small]
 * [--self-test]. Built by `make cuda` into build-cuda/tests/op-parity; run by
 * tests/gpu/run.sh, one process per pass, so that a device fault (which poisons the CUDA
 * context of its process) cannot take the other passes down with it:
 *   (default)    every case below, the sticky-error path, NCCL (>= 2 devices) and, unless
 *                --no-bench, timings of the hot kernels
 *   --reference  the attention and small-M GEMM cases on a backend created with
 *                COGVLM_CUDA_ATTN=simple COGVLM_CUDA_GEMV=0 (the reference attention kernel
 *                and cuBLAS for every GEMM), so that a failure points at one kernel
 *   --small      small shapes only, quick enough to run under compute-sanitizer
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
 *
 * A failure never ends the run: after every case the backend's sticky error is read
 * (a case with an error fails, with the message) and cleared, so the next case runs. A
 * case that cannot even set up (allocation, upload) abandons the rest of its group only.
 * An error that survives the clear means the context is lost (a device fault): the
 * remaining groups are recorded as skipped. --json FILE is rewritten after every case
 * (a complete JSON document each time, "complete": false until the end), so that a run
 * killed by a timeout still leaves its results: {pass, device, complete, passed, failed,
 * skipped, fatal, results[{op, shape, max_abs, max_rel, tol, pass, skipped, error, ms}],
 * bench{}}. One line per case with PASS/FAIL/SKIP; exit status 1 if any case failed, 2
 * if the backend could not be created. --self-test runs the cases with a second CPU
 * backend in place of the GPU (no GPU needed: checks the harness itself); with
 * --fail-alloc N its N-th allocation fails (checks the recovery from a failed setup).
 */
#include "base/clock.h"
#include "engine/comm.h"
#include "engine/error.h"
#include "kernels/cuda/cuda_api.h"

#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TOL_EW 1e-2
#define TOL_MM 2e-2
#define TOL_Q 1e-2
#define TOL_AT 3e-2
#define MAX_LIVE 32 /* device buffers of one group alive at a time */

enum pass_kind { PASS_MAIN, PASS_REFERENCE, PASS_SMALL };

struct result {
    char op[24], shape[128], error[256];
    double mabs, rel, tol, ms;
    int pass, skipped;
};

struct ctx {
    struct cvlm_backend *cpu, *gpu;
    const char *label; /* "" or " [reference kernels]" */
    enum pass_kind pass;
    int device, self_test, dead;
    int passed, failed, skipped;
    uint64_t rng;
    const char *json_path;
    struct result *res;
    int n_res, cap_res;
    char bench[1024]; /* the "bench" object's members, or "" */
    char fatal[320];  /* why cases stopped early, or "" */
    double t_last;    /* when the previous case ended */
    jmp_buf *abort_to;
    void *live_c[MAX_LIVE], *live_g[MAX_LIVE];
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

/* Seconds of the monotonic clock. */
static double now_s(void)
{
    return cvlm_now_ms() / 1e3;
}

/* ---- the JSON summary, rewritten after every case ------------------------------------------ */

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static const char *pass_name(enum pass_kind p)
{
    return p == PASS_REFERENCE ? "reference" : p == PASS_SMALL ? "small" : "main";
}

static void json_result(FILE *f, const struct result *r)
{
    fprintf(f, "  {\"op\": ");
    json_str(f, r->op);
    fprintf(f, ", \"shape\": ");
    json_str(f, r->shape);
    fprintf(f,
            ", \"max_abs\": %.6g, \"max_rel\": %.6g, \"tol\": %g, \"pass\": %s, "
            "\"skipped\": %s, \"ms\": %.3f",
            isfinite(r->mabs) ? r->mabs : 1e30, isfinite(r->rel) ? r->rel : 1e30, r->tol,
            r->pass ? "true" : "false", r->skipped ? "true" : "false", r->ms);
    if (r->error[0]) {
        fprintf(f, ", \"error\": ");
        json_str(f, r->error);
    }
    fprintf(f, "}");
}

/* Writes the whole summary to a temporary file renamed over --json: never half written. */
static void write_json(struct ctx *c, int complete)
{
    char tmp[4200];
    FILE *f;
    if (!c->json_path)
        return;
    snprintf(tmp, sizeof(tmp), "%s.tmp", c->json_path);
    if (!(f = fopen(tmp, "w"))) {
        fprintf(stderr, "op-parity: %s: cannot create\n", tmp);
        return;
    }
    fprintf(f,
            "{\"pass\": \"%s\", \"device\": %d, \"complete\": %s, \"passed\": %d, "
            "\"failed\": %d, \"skipped\": %d, \"fatal\": ",
            pass_name(c->pass), c->device, complete ? "true" : "false", c->passed, c->failed,
            c->skipped);
    if (c->fatal[0])
        json_str(f, c->fatal);
    else
        fprintf(f, "null");
    fprintf(f, ",\n \"results\": [\n");
    for (int i = 0; i < c->n_res; i++) {
        json_result(f, &c->res[i]);
        fprintf(f, "%s\n", i + 1 < c->n_res ? "," : "");
    }
    fprintf(f, " ],\n \"bench\": %s%s%s}\n", c->bench[0] ? "{" : "null", c->bench,
            c->bench[0] ? "}" : "");
    if (fclose(f) != 0 || rename(tmp, c->json_path) != 0)
        fprintf(stderr, "op-parity: %s: cannot write\n", c->json_path);
}

/* One case's outcome: a line on stdout, a result in the JSON (rewritten). pass: 1 pass,
 * 0 fail, -1 skipped; err: the error message or NULL. */
static void record(struct ctx *c, const char *op, const char *shape, double mabs, double rel,
                   double tol, int pass, const char *err)
{
    double t = now_s();
    struct result r = {.mabs = mabs,
                       .rel = rel,
                       .tol = tol,
                       .pass = pass == 1,
                       .skipped = pass < 0,
                       .ms = (t - c->t_last) * 1e3};
    c->t_last = t;
    snprintf(r.op, sizeof(r.op), "%s", op);
    snprintf(r.shape, sizeof(r.shape), "%s", shape);
    snprintf(r.error, sizeof(r.error), "%s", err ? err : "");
    printf("%-18s %-52s max_abs %.3e max_rel %.3e tol %.0e  %s%s%s\n", op, shape, mabs, rel, tol,
           pass > 0   ? "PASS"
           : pass < 0 ? "SKIP"
                      : "FAIL",
           r.error[0] ? ": " : "", r.error);
    fflush(stdout);
    pass > 0 ? c->passed++ : pass < 0 ? c->skipped++ : c->failed++;
    if (c->n_res == c->cap_res) {
        int cap = c->cap_res ? 2 * c->cap_res : 256;
        struct result *p = realloc(c->res, (size_t)cap * sizeof(*p));
        if (!p)
            return; /* counted and printed, not in the JSON */
        c->res = p;
        c->cap_res = cap;
    }
    c->res[c->n_res++] = r;
    write_json(c, 0);
}

/* ---- errors: read and clear after each case; a lost context ends the cases --------------- */

/* The GPU backend's sticky error after a case: 0, or its code with the message in err
 * (size n), cleared so that later cases run. An error again right after the clear means
 * the context is lost (a device fault): c->dead, with the reason in c->fatal. */
static int gpu_error(struct ctx *c, char *err, size_t n)
{
    int rc = c->self_test ? c->gpu->ops->status(c->gpu) : cvlm_backend_cuda_status(c->gpu, 1);
    if (!rc)
        return 0;
    snprintf(err, n, "%s", cvlm_last_error());
    if (!c->self_test && cvlm_backend_cuda_status(c->gpu, 1) && !c->dead) {
        c->dead = 1;
        snprintf(c->fatal, sizeof(c->fatal), "device context lost: %s", err);
    }
    return rc;
}

/* Leaves the current group (see run_group) when the context is lost. */
static void bail_if_dead(struct ctx *c)
{
    if (c->dead && c->abort_to)
        longjmp(*c->abort_to, 1);
}

/* A case could not be set up: recorded as failed; the rest of its group is abandoned. */
static _Noreturn void case_abort(struct ctx *c, const char *what)
{
    char err[256];
    snprintf(err, sizeof(err), "%s", cvlm_last_error());
    gpu_error(c, err, sizeof(err)); /* clears (or finds the context lost) */
    record(c, what, "setup failed: rest of the group not run", 1e30, 1e30, 0, 0, err);
    if (!c->abort_to)
        exit(1);
    longjmp(*c->abort_to, 1);
}

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

/* Device buffers alive in the current group, freed when the group is abandoned. */
static void live_add(struct ctx *c, void *pc, void *pg)
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (!c->live_g[i]) {
            c->live_c[i] = pc;
            c->live_g[i] = pg;
            return;
        }
}

static void live_drop(struct ctx *c, void *pg)
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (c->live_g[i] == pg)
            c->live_c[i] = c->live_g[i] = NULL;
}

static void live_free_all(struct ctx *c)
{
    for (int i = 0; i < MAX_LIVE; i++)
        if (c->live_g[i]) {
            c->cpu->ops->free(c->cpu, c->live_c[i]);
            c->gpu->ops->free(c->gpu, c->live_g[i]);
            c->live_c[i] = c->live_g[i] = NULL;
        }
}

static struct pair pair_new(struct ctx *c, const float *host, size_t n)
{
    size_t es = cvlm_dtype_size(c->gpu->act_dtype), cn = n ? n : 1;
    struct pair p = {c->cpu->ops->alloc(c->cpu, cn * 4), c->gpu->ops->alloc(c->gpu, cn * es), n};
    char err[256];
    if (!p.g && gpu_error(c, err, sizeof(err))) { /* an op's error since the last check */
        record(c, "status", "an earlier op's error, found by alloc", 0, 0, 0, 0, err);
        p.g = c->dead ? NULL : c->gpu->ops->alloc(c->gpu, cn * es);
    }
    if (!p.c || !p.g) {
        if (p.c)
            c->cpu->ops->free(c->cpu, p.c);
        if (p.g)
            c->gpu->ops->free(c->gpu, p.g);
        case_abort(c, "alloc");
    }
    live_add(c, p.c, p.g);
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
    live_drop(c, p->g);
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
    w->c = (struct cvlm_tensor){.dtype = dt,
                                .ndim = rows > 1 ? 2 : 1,
                                .shape = {rows > 1 ? rows : cols, cols},
                                .data = w->host};
    w->g = w->c;
    struct cvlm_tensor *t = &w->g;
    if (c->gpu->ops->upload_weights(c->gpu, &t, 1, 1)) {
        free(w->host);
        case_abort(c, "upload_weights");
    }
}

static void weight_free(struct wpair *w)
{
    free(w->host); /* the device copy belongs to the backend until destroy */
}

/* ---- comparison ------------------------------------------------------------------------ */

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
    char err[256] = "";
    gpu_error(c, err, sizeof(err));
    snprintf(full, sizeof(full), "%s%s", shape, c->label);
    record(c, op, full, mabs, rel, tol, !bad && rel <= tol && !err[0], err);
    free(a);
    free(b);
    bail_if_dead(c);
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
        for (int k = 0; k < (c->pass == PASS_SMALL ? 1 : 2); k++) {
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

static void norm_one(struct ctx *c, int M, int D, enum cvlm_dtype dt)
{
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

/* The CogVLM widths, then the edges of the kernels' shared-memory row cache: D = 12288
 * (cache + static shared memory just over the 48 KiB that needs no opt-in), 16384 (the
 * widest cached row) and 16385 (the uncached path). */
static void test_norms(struct ctx *c)
{
    const int Ms[] = {1, 3, 77, 300}, Ds[] = {77, 1792, 4096}, edges[] = {12288, 16384, 16385};
    int nm = c->pass == PASS_SMALL ? 2 : 4, nd = c->pass == PASS_SMALL ? 2 : 3;
    for (int mi = 0; mi < nm; mi++)
        for (int k = 0; k < nd; k++)
            norm_one(c, Ms[mi], Ds[k], dtypes[(mi + k) % 3]);
    for (int k = 0; k < 3; k++)
        norm_one(c, 2, edges[k], CVLM_DTYPE_BF16);
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

/* all cases in the main pass, M <= 4 in the reference pass, and only the small ones of
 * those in the small pass */
static void test_gemm(struct ctx *c)
{
    static const struct gemm_case cases[] = {
        {1, 4096, 4096, 4096, 0},   {3, 11008, 4096, 4096, 0}, {1, 4096, 11008, 11008, 0},
        {4, 77, 64, 64, 1},         {1, 300, 129, 129, 1},     {3, 129, 515, 520, 1},
        {77, 300, 129, 129, 0},     {77, 129, 515, 600, 1},    {300, 1792, 1792, 5376, 1},
        {300, 4096, 1792, 1792, 0}, {1226, 588, 588, 588, 1},  {16, 12288, 4096, 4096, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        for (int di = 0; di < 3; di++)
            if (c->pass == PASS_MAIN ||
                (cases[i].M <= 4 &&
                 (c->pass == PASS_REFERENCE || (long)cases[i].N * cases[i].K <= 1L << 20)))
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

static void test_rope(struct ctx *c)
{
    if (c->pass != PASS_SMALL)
        rope_one(c, 77, 32, 128, 3 * 4096);
    rope_one(c, 3, 4, 16, 3 * 64);
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

/* One paged scenario with Hkv KV heads in the cache (0: H, one per query head; fewer:
 * grouped-query attention, query head h reading KV head h / (H / Hkv)). */
static void paged_run(struct ctx *c, const struct paged_case *pc, int Hkv, const char *name)
{
    struct paged_setup ps;
    char s[128];
    paged_plan(pc, &ps);
    int hkv = Hkv > 0 ? Hkv : pc->H, bs = 16;
    int W = pc->H * pc->hd, KW = hkv * pc->hd, S = W + 2 * KW; /* q width, k/v width, row */
    size_t cache = (size_t)ps.n_blocks * bs * KW;
    float *zero = calloc(cache, sizeof(float)); /* slots never written compare equal */
    struct pair kc = pair_new(c, zero, cache), vc = pair_new(c, zero, cache);
    free(zero);
    /* each backend's own cache dtype, its activations' (F32 on the CPU, BF16 on the GPU, F32
     * for the CPU standing in for it in --self-test) */
    struct cvlm_kv_layer kvc = {kc.c, vc.c, CVLM_DTYPE_F32, NULL},
                         kvg = {kc.g, vc.g, c->gpu->act_dtype, NULL};
    /* history: keys and values of the earlier slots, written as one kv_write */
    if (ps.n_hist) {
        struct pair hk = pair_rand(c, (size_t)ps.n_hist * KW, 2.0f);
        struct pair hv = pair_rand(c, (size_t)ps.n_hist * KW, 2.0f);
        struct cvlm_attn_batch hb = {ps.n_hist, ps.hseq, ps.hslot, ps.seqs, bs, Hkv};
        c->cpu->ops->kv_write(c->cpu, &kvc, hk.c, hv.c, KW, &hb, hkv, pc->hd);
        c->gpu->ops->kv_write(c->gpu, &kvg, hk.g, hv.g, KW, &hb, hkv, pc->hd);
        pair_free(c, &hk);
        pair_free(c, &hv);
    }
    /* the batch: rows [q | k | v] as the model lays them out */
    struct pair qkv = pair_rand(c, (size_t)ps.n_tok * S, 2.0f);
    struct pair out = pair_new(c, NULL, (size_t)ps.n_tok * W);
    struct cvlm_attn_batch b = {ps.n_tok, ps.seq, ps.slot, ps.seqs, bs, Hkv};
    c->cpu->ops->kv_write(c->cpu, &kvc, (float *)qkv.c + W, (float *)qkv.c + W + KW, S, &b, hkv,
                          pc->hd);
    c->gpu->ops->kv_write(c->gpu, &kvg, cvlm_be_row(c->gpu, qkv.g, 1, (size_t)W),
                          cvlm_be_row(c->gpu, qkv.g, 1, (size_t)(W + KW)), S, &b, hkv, pc->hd);
    snprintf(s, sizeof(s), "%s: K cache after", name);
    check(c, "kv_write", s, &kc, cache, 0);
    snprintf(s, sizeof(s), "%s: V cache after", name);
    check(c, "kv_write", s, &vc, cache, 0);
    c->cpu->ops->attention_paged(c->cpu, out.c, qkv.c, S, &kvc, &b, pc->H, pc->hd);
    c->gpu->ops->attention_paged(c->gpu, out.g, qkv.g, S, &kvg, &b, pc->H, pc->hd);
    snprintf(s, sizeof(s), "%s (%d tokens, %d seqs)", name, ps.n_tok, pc->n_seqs);
    check(c, "attention_paged", s, &out, (size_t)ps.n_tok * W, TOL_AT);
    pair_free(c, &kc);
    pair_free(c, &vc);
    pair_free(c, &qkv);
    pair_free(c, &out);
    paged_free(&ps);
}

static void paged_one(struct ctx *c, const struct paged_case *pc, const char *name)
{
    paged_run(c, pc, 0, name);
}

static void test_attention(struct ctx *c)
{
    int small = c->pass == PASS_SMALL;
    if (!small) {
        attn_full_one(c, 257, 16, 112);
        attn_full_one(c, 1226, 16, 112);
    }
    attn_full_one(c, 5, 2, 16);
    attn_full_one(c, 77, 4, 64);
    if (!small)
        attn_full_one(c, 100, 2, 200); /* head size > 128: the reference kernel */
    /* LM shapes: prefill 300 from 0, decode at 4095, a 77-token chunk after 1000 cached
     * slots, decode at 1300, a 3-token chunk (decode path), the first token of a sequence */
    static const struct paged_case lm = {
        32, 128, 6, {0, 4095, 1000, 1300, 20, 0}, {300, 1, 77, 1, 3, 1}};
    static const struct paged_case dec = {32, 128, 4, {1277, 1290, 2047, 15}, {1, 1, 1, 1}};
    static const struct paged_case tiny = {4, 16, 3, {0, 33, 5}, {40, 1, 9}};
    static const struct paged_case odd = {3, 24, 2, {17, 0}, {1, 70}};
    if (!small) {
        paged_one(c, &lm, "H=32 hd=128 mixed");
        paged_one(c, &dec, "H=32 hd=128 decode only");
    }
    paged_one(c, &tiny, "H=4 hd=16 mixed");
    paged_one(c, &odd, "H=3 hd=24 mixed");
}

/* ---- grouped-query attention (CogVLM2) ---------------------------------------------------- */

/* Query head h reads KV head h / (H / Hkv): the golden fixture's 4 query / 2 KV heads of 8
 * and 16 dims, and CogVLM2-19B's 32 / 8 of 128, through the flash prefill (runs of >= 8
 * slots) and the split-K decode (single tokens, short chunks), and the reference kernel in
 * the --reference pass. */
static void test_gqa(struct ctx *c)
{
    static const struct paged_case lm = {
        32, 128, 6, {0, 4095, 1000, 1300, 20, 0}, {300, 1, 77, 1, 3, 1}};
    static const struct paged_case dec = {32, 128, 4, {1277, 1290, 2047, 15}, {1, 1, 1, 1}};
    static const struct paged_case tiny = {4, 16, 3, {0, 33, 5}, {40, 1, 9}};
    static const struct paged_case golden = {4, 8, 2, {0, 17}, {17, 1}};
    static const struct paged_case dec4 = {4, 16, 3, {70, 5, 600}, {1, 1, 1}};
    if (c->pass != PASS_SMALL) {
        paged_run(c, &lm, 8, "GQA H=32/8 hd=128 mixed");
        paged_run(c, &dec, 8, "GQA H=32/8 hd=128 decode only");
    }
    paged_run(c, &tiny, 2, "GQA H=4/2 hd=16 mixed");
    paged_run(c, &golden, 2, "GQA H=4/2 hd=8 prefill + decode");
    paged_run(c, &dec4, 2, "GQA H=4/2 hd=16 decode only");
    paged_run(c, &tiny, 1, "GQA H=4/1 hd=16 mixed");
}

/* ---- quantized GEMM (W8A16 / W4A16) -------------------------------------------------------- */

/* A Q8 / Q4 weight [N, K] with random codes and scales (values about +-0.05), optional
 * mins (Q4's zero points) and perm (stored column k multiplies x[perm[k]]); c keeps the
 * host arrays, g is its upload. */
struct qpair {
    struct cvlm_tensor c, g;
    void *codes;
    float *scales, *mins;
    int32_t *perm;
};

static void qpair_free(struct qpair *w)
{
    free(w->codes); /* the device copy belongs to the backend until destroy */
    free(w->scales);
    free(w->mins);
    free(w->perm);
}

static void qweight_new(struct ctx *c, struct qpair *w, enum cvlm_dtype dt, int N, int K, int mins,
                        int perm)
{
    memset(w, 0, sizeof(*w));
    w->c = (struct cvlm_tensor){.dtype = dt, .ndim = 2, .shape = {N, K}};
    size_t nb = cvlm_dtype_bytes(dt, (size_t)N * K), ng = (size_t)cvlm_quant_groups(&w->c);
    unsigned char *q = malloc(nb);
    w->codes = q;
    w->scales = malloc((size_t)N * ng * sizeof(float));
    w->mins = mins ? malloc((size_t)N * ng * sizeof(float)) : NULL;
    w->perm = perm ? malloc((size_t)K * sizeof(int32_t)) : NULL;
    if (!q || !w->scales || (mins && !w->mins) || (perm && !w->perm)) {
        qpair_free(w);
        cvlm_errf(CVLM_ENOMEM, "out of host memory");
        case_abort(c, "qweight");
    }
    for (size_t i = 0; i < nb; i++) { /* Q8: -127..127; Q4: any two nibbles */
        float r = frand(c) * 0.5f + 0.5f;
        q[i] = dt == CVLM_DTYPE_Q8 ? (unsigned char)(signed char)(int)(r * 254.99f - 127.0f)
                                   : (unsigned char)(int)(r * 255.99f);
    }
    for (size_t i = 0; i < (size_t)N * ng; i++) {
        w->scales[i] = (0.75f + 0.25f * frand(c)) * (dt == CVLM_DTYPE_Q8 ? 0.05f / 127 : 0.05f / 8);
        if (w->mins)
            w->mins[i] = 0.02f * frand(c);
    }
    for (int k = 0; perm && k < K; k++)
        w->perm[k] = k;
    for (int k = K - 1; perm && k > 0; k--) { /* Fisher-Yates */
        int j = (int)((frand(c) * 0.5f + 0.5f) * (float)(k + 1)) % (k + 1);
        int32_t t = w->perm[k];
        w->perm[k] = w->perm[j];
        w->perm[j] = t;
    }
    w->c.data = w->codes;
    w->c.scales = w->scales;
    w->c.mins = w->mins;
    w->c.perm = w->perm;
    w->g = w->c;
    struct cvlm_tensor *t = &w->g;
    if (c->gpu->ops->upload_weights(c->gpu, &t, 1, 1)) {
        qpair_free(w);
        case_abort(c, "upload_weights (quantized)");
    }
}

/* The format's definition, on the host in double: y[m][n] = sum_k (q * scale + min)
 * x[m][perm[k]] (+ b[n]). */
static void qgemm_host(const struct qpair *w, const float *x, int ldx, const float *b, int M,
                       float *y)
{
    const struct cvlm_tensor *t = &w->c;
    int N = (int)t->shape[0], K = (int)t->shape[1], ng = (int)cvlm_quant_groups(t);
    int g = (int)cvlm_quant_group(t);
    const unsigned char *q = w->codes;
    double *row = malloc((size_t)K * sizeof(double));
    for (int n = 0; row && n < N; n++) {
        for (int k = 0; k < K; k++) {
            int v;
            size_t si = (size_t)n * ng + k / g;
            if (t->dtype == CVLM_DTYPE_Q8) {
                v = (signed char)q[(size_t)n * K + k];
            } else {
                unsigned char by = q[(size_t)n * (K / 2) + k / 32 * 16 + k % 16];
                v = (k % 32 < 16 ? by & 15 : by >> 4) - 8;
            }
            row[k] = (double)v * w->scales[si] + (w->mins ? w->mins[si] : 0.0);
        }
        for (int m = 0; m < M; m++) {
            double acc = b ? b[n] : 0;
            for (int k = 0; k < K; k++)
                acc += row[k] * x[(size_t)m * ldx + (w->perm ? w->perm[k] : k)];
            y[(size_t)m * N + n] = (float)acc;
        }
    }
    free(row);
}

struct qgemm_case {
    int M, N, K, stride, bias, mins, perm;
};

/* Whether the reference (CPU) backend computes this weight as the format defines it: a
 * backend that refuses mins / perm (an error from status) or ignores them (a result off
 * the host reference) cannot referee. 1 if it can, else 0 with the reason in why. */
static int cpu_can_referee(struct ctx *c, const struct qpair *w, const struct pair *x,
                           const float *xh, int ldx, int M, char *why, size_t n_why)
{
    int N = (int)w->c.shape[0], K = (int)w->c.shape[1];
    size_t n = (size_t)M * N;
    float *ref = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    void *y = c->cpu->ops->alloc(c->cpu, n * sizeof(float));
    int ok = 0;
    if (ref && got && y) {
        qgemm_host(w, xh, ldx, NULL, M, ref);
        c->cpu->ops->gemm(c->cpu, y, x->c, ldx, &w->c, NULL, M, N, K);
        if (c->cpu->ops->status(c->cpu)) {
            snprintf(why, n_why, "the reference (CPU) backend refuses %s%s%s: %s",
                     w->mins ? "mins" : "", w->mins && w->perm ? " + " : "", w->perm ? "perm" : "",
                     cvlm_last_error());
        } else {
            double mabs = 0, mref = 0;
            c->cpu->ops->to_host(c->cpu, got, y, n);
            for (size_t i = 0; i < n; i++) {
                double d = fabs((double)got[i] - ref[i]);
                mabs = !(d <= mabs) ? d : mabs;
                mref = fabs(ref[i]) > mref ? fabs(ref[i]) : mref;
            }
            /* its own rounding (e.g. int8 activations of a CPU GEMV: ~5e-3) passes; ignored
             * mins or perm are off by far more */
            ok = mabs <= 1e-2 * (mref > 1e-6 ? mref : 1e-6);
            if (!ok)
                snprintf(why, n_why,
                         "the reference (CPU) backend does not apply %s%s%s (max_rel %.2g vs "
                         "the format's definition)",
                         w->mins ? "mins" : "", w->mins && w->perm ? " + " : "",
                         w->perm ? "perm" : "", mabs / (mref > 1e-6 ? mref : 1e-6));
        }
    } else {
        snprintf(why, n_why, "out of memory for the host reference");
    }
    if (y)
        c->cpu->ops->free(c->cpu, y);
    free(ref);
    free(got);
    return ok;
}

/* The GPU's quantized GEMM against the format's definition (qgemm_host, in double, on x as
 * the GPU holds it: rand_act's values are BF16 already): a tighter check than the pair
 * against the CPU (whose decode kernel rounds x to int8, ~5e-3), so that an error on
 * part of K (a short last group's mins, one scale) shows. The GPU's own error is its BF16
 * output, ~2.5e-3 (a host replica of the kernels). */
static void check_qexact(struct ctx *c, const char *shape, const struct qpair *w, const float *xh,
                         int ldx, const struct wpair *b, int M, const struct pair *y)
{
    int N = (int)w->c.shape[0];
    size_t n = (size_t)M * N;
    float *ref = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float)),
          *bf = b ? malloc((size_t)N * sizeof(float)) : NULL;
    char full[160], err[256] = "";
    if (!ref || !got || (b && !bf)) {
        free(ref), free(got), free(bf);
        case_abort(c, "host memory for the exact reference");
    }
    for (int i = 0; bf && i < N; i++)
        bf[i] = cvlm_tensor_get_f32(&b->c, i);
    qgemm_host(w, xh, ldx, bf, M, ref);
    c->gpu->ops->to_host(c->gpu, got, y->g, n);
    double mabs = 0, mref = 0;
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        mabs = !(d <= mabs) ? d : mabs;
        mref = fabs(ref[i]) > mref ? fabs(ref[i]) : mref;
        bad |= !isfinite(got[i]);
    }
    double rel = mabs / (mref > 1e-6 ? mref : 1e-6);
    gpu_error(c, err, sizeof(err));
    snprintf(full, sizeof(full), "%s vs the format (double)%s", shape, c->label);
    record(c, "gemm", full, mabs, rel, TOL_Q, !bad && rel <= TOL_Q && !err[0], err);
    free(ref), free(got), free(bf);
    bail_if_dead(c);
}

static void qgemm_one(struct ctx *c, const struct qgemm_case *g, enum cvlm_dtype dt)
{
    struct qpair w;
    struct wpair b;
    char s[128], why[320];
    qweight_new(c, &w, dt, g->N, g->K, g->mins, g->perm);
    if (g->bias)
        weight_new(c, &b, CVLM_DTYPE_BF16, 1, g->N, 0.5f, 0.0f);
    float *xh = rand_act(c, (size_t)g->M * g->stride, 1.0f);
    struct pair x = pair_new(c, xh, (size_t)g->M * g->stride);
    struct pair y = pair_new(c, NULL, (size_t)g->M * g->N);
    snprintf(s, sizeof(s), "M=%d N=%d K=%d ldx=%d%s W %s%s%s", g->M, g->N, g->K, g->stride,
             g->bias ? " +bias" : "", cvlm_dtype_name(dt), g->mins ? " +mins" : "",
             g->perm ? " +perm" : "");
    if ((g->mins || g->perm) &&
        !cpu_can_referee(c, &w, &x, xh, g->stride, g->M, why, sizeof(why))) {
        record(c, "gemm", s, 0, 0, TOL_MM, -1, why);
    } else {
        c->cpu->ops->gemm(c->cpu, y.c, x.c, g->stride, &w.c, g->bias ? &b.c : NULL, g->M, g->N,
                          g->K);
        c->gpu->ops->gemm(c->gpu, y.g, x.g, g->stride, &w.g, g->bias ? &b.g : NULL, g->M, g->N,
                          g->K);
        check(c, "gemm", s, &y, (size_t)g->M * g->N, TOL_MM);
        check_qexact(c, s, &w, xh, g->stride, g->bias ? &b : NULL, g->M, &y);
    }
    pair_free(c, &x);
    pair_free(c, &y);
    free(xh);
    qpair_free(&w);
    if (g->bias)
        weight_free(&b);
}

/* M = 1, 2, 3 (the GEMV, one M tile), 16, 33 (the GEMV's 8-row tiles), 64 (its last M),
 * 65 and 512 (dequantize + cuBLAS); N x K above 2^24 (the dequantization in chunks of
 * rows, a short last chunk); Q8 with K % 16 != 0 (dequantize at any M); Q4 with K % 128 !=
 * 0 (a short last group); mins, perm and both. The main pass runs them all, the reference
 * pass (GEMV off: everything dequantized) those with M <= 33, the small pass those of <=
 * 2^18 weights (M = 1 among them, and a GEMV over more than one K tile). */
static void test_qgemm(struct ctx *c)
{
    static const struct qgemm_case q8[] = {
        {1, 4096, 4096, 4096, 0, 0, 0},  {3, 1000, 1000, 1000, 1, 0, 0},
        {16, 300, 512, 520, 0, 0, 0},    {33, 129, 768, 768, 1, 0, 0},
        {512, 300, 1024, 1024, 1, 0, 0}, {1, 300, 1000, 1000, 0, 0, 1},
        {3, 257, 512, 512, 0, 0, 1},     {33, 129, 768, 800, 0, 0, 1},
        {512, 129, 512, 512, 1, 0, 1},   {2, 300, 1024, 1024, 1, 0, 0},
        {64, 129, 512, 512, 0, 0, 0},    {65, 129, 512, 512, 1, 0, 0},
        {65, 4200, 4096, 4096, 1, 0, 0}, {1, 4200, 4096, 4096, 0, 0, 1},
        {1, 129, 1040, 1040, 0, 0, 0},   {3, 100, 1000, 1000, 0, 0, 0},
    };
    static const struct qgemm_case q4[] = {
        {1, 4096, 4064, 4064, 0, 0, 0},  {3, 777, 1056, 1056, 1, 0, 0},
        {16, 300, 544, 552, 0, 0, 0},    {33, 129, 800, 800, 1, 0, 0},
        {512, 300, 1056, 1056, 1, 0, 0}, {1, 300, 1056, 1056, 0, 1, 0},
        {3, 257, 800, 800, 1, 1, 0},     {16, 300, 544, 544, 0, 0, 1},
        {33, 129, 800, 808, 0, 1, 1},    {512, 129, 1056, 1056, 1, 1, 1},
        {1, 4096, 4064, 4064, 0, 1, 1},  {2, 300, 1056, 1056, 0, 1, 0},
        {64, 129, 800, 800, 1, 0, 0},    {65, 129, 800, 800, 0, 1, 1},
        {65, 4160, 4096, 4096, 1, 1, 1}, {1, 4160, 4096, 4096, 0, 1, 0},
        {1, 64, 2080, 2080, 0, 1, 1},    {3, 60, 4064, 4064, 0, 1, 0},
    };
    for (int d = 0; d < 2; d++) {
        const struct qgemm_case *cs = d ? q4 : q8;
        size_t n = d ? sizeof(q4) / sizeof(q4[0]) : sizeof(q8) / sizeof(q8[0]);
        for (size_t i = 0; i < n; i++)
            if (c->pass == PASS_MAIN || (c->pass == PASS_REFERENCE && cs[i].M <= 33) ||
                (c->pass == PASS_SMALL && (long)cs[i].N * cs[i].K <= 1L << 18))
                qgemm_one(c, &cs[i], d ? CVLM_DTYPE_Q4 : CVLM_DTYPE_Q8);
    }
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
        tc[i] = (struct cvlm_tensor){
            .dtype = CVLM_DTYPE_BF16, .ndim = 2, .shape = {64, 129}, .fill = fills[i]};
        tg[i] = tc[i];
        pc[i] = &tc[i];
        pg[i] = &tg[i];
    }
    for (int i = 0; i < 64; i++)
        ids[i] = i;
    if (c->cpu->ops->upload_weights(c->cpu, pc, 3, 42) ||
        c->gpu->ops->upload_weights(c->gpu, pg, 3, 42)) {
        char err[256];
        snprintf(err, sizeof(err), "%s", cvlm_last_error());
        gpu_error(c, err, sizeof(err));
        record(c, "upload_weights", "fills RANDOM, ONES, ZEROS", 1e30, 1e30, 0, 0, err);
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
    char msg[256];
    snprintf(msg, sizeof(msg), "%s", cvlm_last_error());
    int ok = before == 0 && rc == CVLM_ESHAPE && strstr(msg, "gemm.cu:") != NULL;
    printf("  sticky error: %s\n", msg);
    int after = cvlm_backend_cuda_status(c->gpu, 1);
    ok = ok && after == CVLM_ESHAPE && cvlm_backend_cuda_status(c->gpu, 0) == 0;
    record(c, "status", "bad gemm shape -> CVLM_ESHAPE with file:line, cleared", 0, 0, 0, ok,
           ok ? NULL : msg);
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

static void test_nccl(struct ctx *c)
{
    int n = cvlm_cuda_device_count(), device = c->device;
    if (n < 2) {
        char why[64];
        snprintf(why, sizeof(why), "%d device: 2 needed", n);
        record(c, "nccl allreduce", "2 ranks", 0, 0, 0, -1, why);
        return;
    }
    struct nccl_rank r[2] = {{c->gpu, NULL, 0, 0, 0},
                             {cvlm_backend_cuda_create(device == 0 ? 1 : 0), NULL, 1, 0, 0}};
    struct cvlm_backend *be[2] = {r[0].be, r[1].be};
    struct cvlm_comm *comm[2];
    if (!be[1] || cvlm_comm_nccl_group_create(be, 2, comm)) {
        record(c, "nccl allreduce", "2 ranks: setup", 1e30, 1e30, 0, 0, cvlm_last_error());
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
    record(c, "nccl allreduce", "2 ranks, 4099 BF16", err, err, 0, !r[0].rc && !r[1].rc && err == 0,
           NULL);
    cvlm_comm_destroy(comm[0]);
    cvlm_comm_destroy(comm[1]);
    be[1]->ops->destroy(be[1]);
}

/* ---- timings ---------------------------------------------------------------------------- */

/* The hot ops on fixed shapes, run back to back (device buffers hold whatever they hold:
 * only the time matters). */
struct bench_bufs {
    struct cvlm_tensor w, wq8, wq4; /* [11008, 4096] BF16, Q8, Q4 (generated) */
    void *x, *y, *kc, *vc;
    struct cvlm_attn_batch dec, pre;
    struct cvlm_kv_layer kv;
};

enum bench_op {
    B_GEMV,
    B_GEMM64,
    B_VIT_ATTN,
    B_DECODE_ATTN,
    B_PREFILL_ATTN,
    B_GEMV_Q8,
    B_GEMV_Q4,
    B_GEMV16_Q4,
    B_GEMM512_Q4
};

static void bench_call(struct cvlm_backend *g, struct bench_bufs *b, enum bench_op op)
{
    switch (op) {
    case B_GEMV: g->ops->gemm(g, b->y, b->x, 4096, &b->w, NULL, 1, 11008, 4096); break;
    case B_GEMM64: g->ops->gemm(g, b->y, b->x, 4096, &b->w, NULL, 64, 11008, 4096); break;
    case B_VIT_ATTN: g->ops->attention_full(g, b->y, b->x, 1226, 16, 112); break;
    case B_DECODE_ATTN:
        g->ops->attention_paged(g, b->y, b->x, 3 * 4096, &b->kv, &b->dec, 32, 128);
        break;
    case B_PREFILL_ATTN:
        g->ops->attention_paged(g, b->y, b->x, 3 * 4096, &b->kv, &b->pre, 32, 128);
        break;
    case B_GEMV_Q8: g->ops->gemm(g, b->y, b->x, 4096, &b->wq8, NULL, 1, 11008, 4096); break;
    case B_GEMV_Q4: g->ops->gemm(g, b->y, b->x, 4096, &b->wq4, NULL, 1, 11008, 4096); break;
    case B_GEMV16_Q4: g->ops->gemm(g, b->y, b->x, 4096, &b->wq4, NULL, 16, 11008, 4096); break;
    case B_GEMM512_Q4: g->ops->gemm(g, b->y, b->x, 4096, &b->wq4, NULL, 512, 11008, 4096); break;
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
    struct cvlm_tensor *pw[3] = {&b->w, &b->wq8, &b->wq4};
    size_t cache = (size_t)B_SEQS * B_BLK * 16 * 4096 * 2;
    b->w = (struct cvlm_tensor){
        .dtype = CVLM_DTYPE_BF16, .ndim = 2, .shape = {11008, 4096}, .fill = CVLM_FILL_RANDOM};
    b->wq8 = b->w;
    b->wq8.dtype = CVLM_DTYPE_Q8;
    b->wq4 = b->w;
    b->wq4.dtype = CVLM_DTYPE_Q4;
    b->x = g->ops->alloc(g, (size_t)1278 * 3 * 4096 * 2);
    b->y = g->ops->alloc(g, (size_t)1278 * 11008 * 2);
    b->kc = g->ops->alloc(g, cache);
    b->vc = g->ops->alloc(g, cache);
    if (!b->x || !b->y || !b->kc || !b->vc || g->ops->upload_weights(g, pw, 3, 7))
        return -1;
    b->kv = (struct cvlm_kv_layer){b->kc, b->vc, g->act_dtype, NULL};
    for (int i = 0; i < B_SEQS * B_BLK; i++)
        tables[i] = i;
    for (int s = 0; s < B_SEQS; s++) {
        seqs[s] = (struct cvlm_seq_kv){tables + s * B_BLK, B_BLK};
        seq[s] = s;
        slot[s] = B_CTX - 1;
    }
    for (int t = 0; t < 1278; t++) /* one 1278-token prefill of sequence 0 */
        seq[B_SEQS + t] = 0, slot[B_SEQS + t] = t;
    b->dec = (struct cvlm_attn_batch){B_SEQS, seq, slot, seqs, 16, 0};
    b->pre = (struct cvlm_attn_batch){1278, seq + B_SEQS, slot + B_SEQS, seqs, 16, 0};
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
        /* W8A16 / W4A16: bytes of codes + scales streamed per call */
        double q8b = 11008.0 * 4096 + 11008.0 * 4, q4b = 11008.0 * 2048 + 11008.0 * 32 * 4;
        double tq8 = time_op(g, &b, B_GEMV_Q8, 50), tq4 = time_op(g, &b, B_GEMV_Q4, 50);
        double tq16 = time_op(g, &b, B_GEMV16_Q4, 20), tq512 = time_op(g, &b, B_GEMM512_Q4, 10);
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
        printf("bench: gemv 1x4096->11008 Q8        %8.1f us  %6.0f GB/s of codes+scales\n",
               tq8 * 1e6, q8b / tq8 / 1e9);
        printf("bench: gemv 1x4096->11008 Q4        %8.1f us  %6.0f GB/s of codes+scales\n",
               tq4 * 1e6, q4b / tq4 / 1e9);
        printf("bench: gemv 16x4096->11008 Q4       %8.1f us  %6.0f GB/s of codes+scales\n",
               tq16 * 1e6, q4b / tq16 / 1e9);
        printf("bench: gemm 512x4096->11008 Q4      %8.1f us  %6.1f TFLOP/s\n", tq512 * 1e6,
               2.0 * 512 * 4096 * 11008 / tq512 / 1e12);
        snprintf(c->bench, sizeof(c->bench),
                 "\"gemv_m1_gbs\": %.1f, \"gemm_m64_weight_gbs\": %.1f,"
                 " \"vit_attention_ms\": %.4f, \"vit_attention_tflops\": %.2f,"
                 " \"decode_attention_ms\": %.4f, \"decode_attention_kv_gbs\": %.1f,"
                 " \"prefill_attention_ms\": %.4f, \"prefill_attention_tflops\": %.2f",
                 wb / t1 / 1e9, wb / t64 / 1e9, ta * 1e3, fa / ta / 1e12, td * 1e3, kvb / td / 1e9,
                 tp * 1e3, fp / tp / 1e12);
        size_t at = strlen(c->bench);
        snprintf(c->bench + at, sizeof(c->bench) - at,
                 ", \"gemv_q8_m1_gbs\": %.1f, \"gemv_q4_m1_gbs\": %.1f, \"gemv_q4_m16_gbs\": %.1f,"
                 " \"gemm_q4_m512_tflops\": %.2f",
                 q8b / tq8 / 1e9, q4b / tq4 / 1e9, q4b / tq16 / 1e9,
                 2.0 * 512 * 4096 * 11008 / tq512 / 1e12);
        char err[256] = "";
        if (gpu_error(c, err, sizeof(err))) /* numbers of failed launches are meaningless */
            snprintf(c->bench, sizeof(c->bench), "\"error\": \"see op-parity's log\"");
        if (err[0])
            printf("bench: %s\n", err);
    } else {
        char err[256];
        snprintf(err, sizeof(err), "%s", cvlm_last_error());
        gpu_error(c, err, sizeof(err));
        printf("bench: setup failed: %s\n", err);
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

typedef void (*group_fn)(struct ctx *c);

/* --self-test --fail-alloc N: the stand-in backend's N-th alloc fails, which checks here,
 * without a GPU, that a case that cannot set up costs only the rest of its group. */
static const struct cvlm_backend_i *flaky_base;
static struct cvlm_backend_i flaky_ops;
static int flaky_left;

static void *flaky_alloc(struct cvlm_backend *be, size_t bytes)
{
    if (flaky_left > 0 && --flaky_left == 0) {
        cvlm_errf(CVLM_ENOMEM, "injected allocation failure (--fail-alloc)");
        return NULL;
    }
    return flaky_base->alloc(be, bytes);
}

/* Runs one group of cases; a case that cannot set up, or a lost context, ends the group
 * (case_abort / bail_if_dead jump back here) and the next group runs, or is recorded as
 * skipped once the context is lost. */
static void run_group(struct ctx *c, const char *name, group_fn fn)
{
    jmp_buf jb;
    if (c->dead) {
        record(c, name, "not run: the device context was lost", 0, 0, 0, -1, c->fatal);
        return;
    }
    printf("-- %s%s\n", name, c->label);
    fflush(stdout);
    c->abort_to = &jb;
    if (setjmp(jb) == 0)
        fn(c);
    else
        printf("-- %s: rest of the group abandoned%s\n", name,
               c->dead ? " (device context lost)" : "");
    c->abort_to = NULL;
    live_free_all(c);
}

static void run_pass(struct ctx *c, int do_bench)
{
    enum { M = 1 << PASS_MAIN, R = 1 << PASS_REFERENCE, S = 1 << PASS_SMALL };
    static const struct {
        const char *name;
        group_fn fn;
        unsigned passes; /* the passes that run it */
    } groups[] = {
        {"copies", test_copies, M | S},
        {"embed", test_embed, M | S},
        {"elementwise", test_elementwise, M | S},
        {"patchify", test_patchify, M},
        {"norms", test_norms, M | S},
        {"gemm", test_gemm, M | R | S},
        {"rope", test_rope, M | S},
        {"attention", test_attention, M | R | S},
        {"gqa", test_gqa, M | R | S},
        {"gemm quantized", test_qgemm, M | R | S},
        {"fills", test_fills, M | S},
        {"errors", test_errors, M | S},
        {"nccl", test_nccl, M},
    };
    for (size_t i = 0; i < sizeof(groups) / sizeof(groups[0]); i++) {
        if (!(groups[i].passes & (1u << c->pass)))
            continue;
        if (c->self_test && (groups[i].fn == test_errors || groups[i].fn == test_nccl))
            continue; /* CUDA-only */
        run_group(c, groups[i].name, groups[i].fn);
    }
    if (do_bench && c->pass == PASS_MAIN && !c->self_test && !c->dead)
        bench(c);
}

static int parse_args(int argc, char **argv, struct ctx *c, int *do_bench)
{
    int fail_alloc = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc)
            c->json_path = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc)
            c->device = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-bench"))
            *do_bench = 0;
        else if (!strcmp(argv[i], "--self-test"))
            c->self_test = 1;
        else if (!strcmp(argv[i], "--reference"))
            c->pass = PASS_REFERENCE;
        else if (!strcmp(argv[i], "--small"))
            c->pass = PASS_SMALL;
        else if (!strcmp(argv[i], "--fail-alloc") && i + 1 < argc)
            fail_alloc = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: op-parity [--json FILE] [--device N] [--no-bench] "
                            "[--reference | --small] [--self-test [--fail-alloc N]]\n");
            return -1;
        }
    }
    flaky_left = c->self_test ? fail_alloc : 0;
    return 0;
}

int main(int argc, char **argv)
{
    struct ctx c = {.label = "", .rng = 12345};
    int do_bench = 1;
    if (parse_args(argc, argv, &c, &do_bench))
        return 2;
    if (c.pass == PASS_REFERENCE)
        c.label = " [reference kernels]";
    c.t_last = now_s();
    c.cpu = cvlm_backend_cpu_create(0);
    c.gpu = c.self_test ? cvlm_backend_cpu_create(0) : make_gpu(c.device, c.pass == PASS_REFERENCE);
    if (!c.cpu || !c.gpu) {
        snprintf(c.fatal, sizeof(c.fatal), "cannot create the backends: %s", cvlm_last_error());
        fprintf(stderr, "op-parity: %s\n", c.fatal);
        write_json(&c, 1);
        return 2;
    }
    if (flaky_left > 0) {
        flaky_base = c.gpu->ops;
        flaky_ops = *flaky_base;
        flaky_ops.alloc = flaky_alloc;
        c.gpu->ops = &flaky_ops;
    }
    write_json(&c, 0);
    run_pass(&c, do_bench);
    int st = c.self_test || c.dead ? 0 : c.gpu->ops->status(c.gpu);
    if (st)
        printf("backend status at the end: %s\n", cvlm_last_error());
    printf("op-parity %s%s: %d passed, %d failed, %d skipped%s%s\n", pass_name(c.pass),
           c.self_test ? " --self-test" : "", c.passed, c.failed, c.skipped, c.fatal[0] ? "; " : "",
           c.fatal);
    write_json(&c, 1);
    if (!c.dead) /* a lost context may hang in teardown: leave it to the process exit */
        c.gpu->ops->destroy(c.gpu);
    c.cpu->ops->destroy(c.cpu);
    free(c.res);
    return c.failed || st || c.dead ? 1 : 0;
}
