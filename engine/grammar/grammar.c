/* grammar.c - the program builders and the matcher (thread sets over the program).
 *
 * A state is the canonical set of threads waiting at BYTES or MATCH: advancing by a byte
 * moves every thread whose set holds it, then follows the epsilon instructions (SPLIT,
 * JMP, CALL, RET) of each moved thread to its next BYTES / MATCH ("closure"). A config
 * met twice in one closure is not followed again (epsilon loops of patterns such as
 * (a?)*), CALLs past CVLM_GRAMMAR_MAX_DEPTH are dropped (bounded nesting), and threads
 * past CVLM_GRAMMAR_MAX_THREADS are dropped (bounded ambiguity: only ever fewer
 * documents, never an invalid one).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/error.h"
#include "engine/grammar/grammar_internal.h"

/* ---- builders ----------------------------------------------------------------------- */

int32_t gram_fail(struct cvlm_grammar *g, int code, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!g->err)
        g->err = code;
    cvlm_errf(code, "%s", msg);
    return -1;
}

static int grow(void **p, int *cap, int need, size_t elem)
{
    if (need <= *cap)
        return 0;
    int nc = *cap ? *cap : 64;
    while (nc < need)
        nc *= 2;
    void *q = realloc(*p, (size_t)nc * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = nc;
    return 0;
}

int32_t gram_emit(struct cvlm_grammar *g, int op, int32_t a, int32_t b)
{
    if (a < 0 && op != GOP_RET && op != GOP_MATCH && !(op == GOP_SPLIT && a == -2))
        return -1; /* an operand failed to build: propagate */
    if ((op == GOP_SPLIT || op == GOP_BYTES || op == GOP_CALL) && b < 0 && b != -2)
        return -1;
    if (g->n_ins >= GRAMMAR_MAX_INS)
        return gram_fail(g, CVLM_ETOOBIG,
                         "json_schema: the schema needs more than %d grammar "
                         "instructions",
                         GRAMMAR_MAX_INS);
    if (grow((void **)&g->ins, &g->cap_ins, g->n_ins + 1, sizeof(*g->ins)))
        return gram_fail(g, CVLM_ENOMEM, "out of memory compiling a grammar");
    g->ins[g->n_ins] = (struct ginst){op, a, b};
    return g->n_ins++;
}

int32_t gram_set(struct cvlm_grammar *g, const uint64_t set[4])
{
    for (int i = g->n_sets - 1; i >= 0 && i >= g->n_sets - 64; i--) /* recent ones */
        if (!memcmp(g->sets[i], set, sizeof(g->sets[i])))
            return i;
    if (grow((void **)&g->sets, &g->cap_sets, g->n_sets + 1, sizeof(*g->sets)))
        return gram_fail(g, CVLM_ENOMEM, "out of memory compiling a grammar");
    memcpy(g->sets[g->n_sets], set, sizeof(g->sets[0]));
    return g->n_sets++;
}

int32_t gram_rule_new(struct cvlm_grammar *g)
{
    if (grow((void **)&g->rules, &g->cap_rules, g->n_rules + 1, sizeof(*g->rules)))
        return gram_fail(g, CVLM_ENOMEM, "out of memory compiling a grammar");
    g->rules[g->n_rules] = -1;
    return g->n_rules++;
}

int32_t gram_range(struct cvlm_grammar *g, int lo, int hi, int32_t next)
{
    uint64_t s[4] = {0};
    for (int c = lo; c <= hi; c++)
        gset_add(s, c);
    int32_t id = next < 0 ? -1 : gram_set(g, s);
    return id < 0 ? -1 : gram_emit(g, GOP_BYTES, id, next);
}

int32_t gram_lit(struct cvlm_grammar *g, const char *s, size_t n, int32_t next)
{
    for (size_t i = n; i-- > 0 && next >= 0;)
        next = gram_range(g, (unsigned char)s[i], (unsigned char)s[i], next);
    return next;
}

int32_t gram_split(struct cvlm_grammar *g, int32_t a, int32_t b)
{
    return gram_emit(g, GOP_SPLIT, a, b);
}

int32_t gram_ws(struct cvlm_grammar *g, int32_t next)
{
    uint64_t s[4] = {0};
    gset_add(s, ' ');
    gset_add(s, '\t');
    int32_t id = next < 0 ? -1 : gram_set(g, s), indent = next;
    for (int i = 0; i < CVLM_GRAMMAR_MAX_WS && indent >= 0 && id >= 0; i++)
        indent = gram_split(g, gram_emit(g, GOP_BYTES, id, indent), next);
    if (id < 0)
        return -1;
    return gram_split(g, next,
                      gram_split(g, gram_lit(g, " ", 1, next), gram_lit(g, "\n", 1, indent)));
}

int32_t gram_json_char(struct cvlm_grammar *g, const uint64_t ascii[2], int non_ascii, int32_t next)
{
    uint64_t plain[4] = {0};
    int32_t alts[8];
    int n = 0;
    for (int c = 0x20; c < 0x80; c++)
        if (((ascii[c >> 6] >> (c & 63)) & 1) && c != '"' && c != '\\')
            gset_add(plain, c);
    if (plain[0] | plain[1]) {
        int32_t id = gram_set(g, plain);
        alts[n++] = id < 0 ? -1 : gram_emit(g, GOP_BYTES, id, next);
    }
    static const char esc_of[][2] = {
        {'"', '"'}, {'\\', '\\'}, {'\n', 'n'}, {'\r', 'r'}, {'\t', 't'}};
    for (size_t i = 0; i < sizeof(esc_of) / sizeof(esc_of[0]); i++)
        if ((ascii[esc_of[i][0] >> 6] >> (esc_of[i][0] & 63)) & 1) {
            char e[2] = {'\\', esc_of[i][1]};
            alts[n++] = gram_lit(g, e, 2, next);
        }
    if (non_ascii) { /* UTF-8, RFC 3629's table */
        int32_t c1 = gram_range(g, 0x80, 0xbf, next);
        int32_t c2 = gram_range(g, 0x80, 0xbf, c1);
        int32_t c3 = gram_range(g, 0x80, 0xbf, c2);
        int32_t two = gram_range(g, 0xc2, 0xdf, c1);
        int32_t e0 = gram_range(g, 0xe0, 0xe0, gram_range(g, 0xa0, 0xbf, c1));
        int32_t e1 = gram_split(g, gram_range(g, 0xe1, 0xec, c2), gram_range(g, 0xee, 0xef, c2));
        int32_t ed = gram_range(g, 0xed, 0xed, gram_range(g, 0x80, 0x9f, c1));
        int32_t f0 = gram_range(g, 0xf0, 0xf0, gram_range(g, 0x90, 0xbf, c2));
        int32_t f1 = gram_range(g, 0xf1, 0xf3, c3);
        int32_t f4 = gram_range(g, 0xf4, 0xf4, gram_range(g, 0x80, 0x8f, c2));
        alts[n++] = gram_split(g, gram_split(g, two, gram_split(g, e0, e1)),
                               gram_split(g, ed, gram_split(g, f0, gram_split(g, f1, f4))));
    }
    if (n == 0)
        return gram_fail(g, CVLM_EINVAL,
                         "json_schema: a character class that no JSON string "
                         "character matches");
    int32_t t = alts[--n];
    while (n > 0 && t >= 0)
        t = gram_split(g, alts[--n], t);
    return t;
}

int32_t gram_json_chars(struct cvlm_grammar *g, const uint64_t ascii[2], int non_ascii,
                        int32_t next)
{
    int32_t loop = next < 0 ? -1 : gram_emit(g, GOP_SPLIT, -2, -2);
    int32_t ch = loop < 0 ? -1 : gram_json_char(g, ascii, non_ascii, loop);
    if (ch < 0)
        return -1;
    g->ins[loop].a = ch;
    g->ins[loop].b = next;
    return loop;
}

/* ---- references --------------------------------------------------------------------- */

void gram_mask_cache_free(struct gmask_cache *c); /* grammar_mask.c */

void cvlm_grammar_ref(struct cvlm_grammar *g)
{
    atomic_fetch_add(&g->refs, 1);
}

void cvlm_grammar_unref(struct cvlm_grammar *g)
{
    if (!g || atomic_fetch_sub(&g->refs, 1) != 1)
        return;
    gram_mask_cache_free(g->cache);
    free(g->ins);
    free(g->sets);
    free(g->rules);
    free(g);
}

int cvlm_grammar_size(const struct cvlm_grammar *g)
{
    return g->n_ins;
}

/* ---- the matcher -------------------------------------------------------------------- */

struct cfg {
    int32_t pc, depth;
    int32_t st[CVLM_GRAMMAR_MAX_DEPTH];
};

#define MAX_VISIT 512    /* epsilon configs followed per closure (then it stops) */
#define VISIT_SLOTS 1024 /* their hash set: open addressing, stamped per closure */
#define MAX_WORK 256

struct closure {
    struct cfg out[CVLM_GRAMMAR_MAX_THREADS];
    int n_out;
    uint64_t visit[VISIT_SLOTS];
    uint32_t stamp[VISIT_SLOTS];
    uint32_t now; /* the current closure's stamp */
    int n_visit;
    long work_done; /* configs popped, over every closure since the owner reset it */
    struct cfg work[MAX_WORK];
};

static int cfg_eq(const struct cfg *a, const struct cfg *b)
{
    return a->pc == b->pc && a->depth == b->depth &&
           !memcmp(a->st, b->st, (size_t)a->depth * sizeof(a->st[0]));
}

static uint64_t cfg_hash(const struct cfg *c)
{
    uint64_t h = 1469598103934665603ull ^ (uint64_t)(uint32_t)c->pc;
    h = (h ^ (uint64_t)c->depth) * 1099511628211ull;
    for (int i = 0; i < c->depth; i++)
        h = (h ^ (uint64_t)(uint32_t)c->st[i]) * 1099511628211ull;
    return h * 0x9e3779b97f4a7c15ull;
}

/* 1 if c was not yet visited in this closure (and records it). */
static int first_visit(struct closure *cl, const struct cfg *c)
{
    uint64_t h = cfg_hash(c);
    unsigned i = (unsigned)(h >> 40) & (VISIT_SLOTS - 1);
    for (; cl->stamp[i] == cl->now; i = (i + 1) & (VISIT_SLOTS - 1))
        if (cl->visit[i] == h)
            return 0;
    if (cl->n_visit == MAX_VISIT)
        return 0; /* pathological: stop exploring */
    cl->n_visit++;
    cl->stamp[i] = cl->now;
    cl->visit[i] = h;
    return 1;
}

static void add_out(struct closure *cl, const struct cfg *c)
{
    for (int i = 0; i < cl->n_out; i++)
        if (cfg_eq(&cl->out[i], c))
            return;
    if (cl->n_out < CVLM_GRAMMAR_MAX_THREADS)
        cl->out[cl->n_out++] = *c;
}

static void follow(const struct cvlm_grammar *g, struct closure *cl, const struct cfg *start)
{
    int nw = 0;
    cl->n_visit = 0;
    if (++cl->now == 0) { /* the stamp wrapped: forget every old one */
        memset(cl->stamp, 0, sizeof(cl->stamp));
        cl->now = 1;
    }
    cl->work[nw++] = *start;
    while (nw > 0) {
        struct cfg *x = &cl->work[--nw];
        cl->work_done++;
        const struct ginst *in = &g->ins[x->pc];
        switch (in->op) {
        case GOP_BYTES:
        case GOP_MATCH: add_out(cl, x); break;
        case GOP_SPLIT:
            if (!first_visit(cl, x) || nw + 2 > MAX_WORK)
                break;
            cl->work[nw] = *x; /* x is work[nw]: copy before overwriting it */
            cl->work[nw].pc = in->b;
            cl->work[nw + 1] = cl->work[nw];
            cl->work[nw + 1].pc = in->a; /* a first */
            nw += 2;
            break;
        case GOP_JMP:
            if (first_visit(cl, x)) {
                x->pc = in->a;
                nw++;
            }
            break;
        case GOP_CALL:
            if (x->depth < CVLM_GRAMMAR_MAX_DEPTH && first_visit(cl, x)) {
                x->st[x->depth++] = in->b;
                x->pc = g->rules[in->a];
                nw++;
            }
            break;
        case GOP_RET:
            if (x->depth > 0 && first_visit(cl, x)) {
                x->pc = x->st[--x->depth];
                nw++;
            }
            break;
        }
    }
}

static int cfg_cmp(const void *pa, const void *pb)
{
    const struct cfg *a = pa, *b = pb;
    if (a->pc != b->pc)
        return a->pc < b->pc ? -1 : 1;
    if (a->depth != b->depth)
        return a->depth < b->depth ? -1 : 1;
    return memcmp(a->st, b->st, (size_t)a->depth * sizeof(a->st[0]));
}

/* Writes the closure's threads into s in canonical order. */
static int store(struct closure *cl, struct cvlm_gstate *s)
{
    int need = 0;
    for (int i = 1; i < cl->n_out; i++) /* insertion sort: a few threads, mostly in order */
        for (int j = i; j > 0 && cfg_cmp(&cl->out[j - 1], &cl->out[j]) > 0; j--) {
            struct cfg t = cl->out[j];
            cl->out[j] = cl->out[j - 1];
            cl->out[j - 1] = t;
        }
    for (int i = 0; i < cl->n_out; i++)
        need += 2 + cl->out[i].depth;
    if (need > s->cap) {
        int32_t *v = realloc(s->v, (size_t)need * sizeof(*v));
        if (!v)
            return cvlm_errf(CVLM_ENOMEM, "out of memory for a grammar state");
        s->v = v;
        s->cap = need;
    }
    int k = 0;
    for (int i = 0; i < cl->n_out; i++) {
        s->v[k++] = cl->out[i].pc;
        s->v[k++] = cl->out[i].depth;
        memcpy(s->v + k, cl->out[i].st, (size_t)cl->out[i].depth * sizeof(int32_t));
        k += cl->out[i].depth;
    }
    s->n = k;
    s->n_threads = cl->n_out;
    return 0;
}

int cvlm_gstate_init(const struct cvlm_grammar *g, struct cvlm_gstate *s)
{
    struct closure *cl = calloc(1, sizeof(*cl));
    if (!cl)
        return cvlm_errf(CVLM_ENOMEM, "out of memory for a grammar state");
    *s = (struct cvlm_gstate){0};
    struct cfg c = {.pc = g->start};
    cl->n_out = 0;
    follow(g, cl, &c);
    int rc = store(cl, s);
    free(cl);
    return rc;
}

/* One byte: threads of s that take it, followed to their next stops, into cl. */
static void step(const struct cvlm_grammar *g, const struct cvlm_gstate *s, int byte,
                 struct closure *cl)
{
    struct cfg c;
    cl->n_out = 0;
    for (int k = 0; k < s->n;) {
        int32_t pc = s->v[k], depth = s->v[k + 1];
        const struct ginst *in = &g->ins[pc];
        if (in->op == GOP_BYTES && gset_has(g->sets[in->a], byte)) {
            c.pc = in->b;
            c.depth = depth;
            memcpy(c.st, s->v + k + 2, (size_t)depth * sizeof(int32_t));
            follow(g, cl, &c);
        }
        k += 2 + depth;
    }
}

int gram_state_step(const struct cvlm_grammar *g, struct cvlm_gstate *s, int byte, void *scratch)
{
    struct closure *cl = scratch;
    step(g, s, byte, cl);
    int rc = store(cl, s);
    return rc ? rc : cl->n_out > 0;
}

void *gram_state_scratch_new(void)
{
    return calloc(1, sizeof(struct closure));
}

long *gram_state_scratch_work(void *scratch)
{
    return &((struct closure *)scratch)->work_done;
}

int cvlm_gstate_advance(const struct cvlm_grammar *g, struct cvlm_gstate *s,
                        const unsigned char *bytes, size_t n)
{
    struct closure *cl = calloc(1, sizeof(*cl));
    if (!cl)
        return cvlm_errf(CVLM_ENOMEM, "out of memory for a grammar state");
    int rc = s->n_threads > 0;
    for (size_t i = 0; i < n && rc > 0; i++)
        rc = gram_state_step(g, s, bytes[i], cl);
    free(cl);
    return rc;
}

int cvlm_gstate_complete(const struct cvlm_grammar *g, const struct cvlm_gstate *s)
{
    for (int k = 0; k < s->n; k += 2 + s->v[k + 1])
        if (g->ins[s->v[k]].op == GOP_MATCH)
            return 1;
    return 0;
}

int cvlm_gstate_copy(struct cvlm_gstate *dst, const struct cvlm_gstate *src)
{
    if (src->n > dst->cap) {
        int32_t *v = realloc(dst->v, (size_t)src->n * sizeof(*v));
        if (!v)
            return cvlm_errf(CVLM_ENOMEM, "out of memory for a grammar state");
        dst->v = v;
        dst->cap = src->n;
    }
    if (src->n)
        memcpy(dst->v, src->v, (size_t)src->n * sizeof(int32_t));
    dst->n = src->n;
    dst->n_threads = src->n_threads;
    return 0;
}

void cvlm_gstate_free(struct cvlm_gstate *s)
{
    free(s->v);
    *s = (struct cvlm_gstate){0};
}
