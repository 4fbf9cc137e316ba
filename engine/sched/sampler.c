/* sampler.c - penalties, temperature, top-k/top-p/min-p and the draw (see sampler.h).
 *
 * Filtering never sorts the whole vocabulary: candidates are first narrowed to the
 * tokens whose probability is at least a threshold that is lowered until the kept
 * set provably contains the top-k / nucleus, and only that set is sorted.
 */
#include "engine/sched/sampler.h"

#include "engine/error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void cvlm_sampling_defaults(struct cvlm_sampling *s)
{
    memset(s, 0, sizeof(*s));
    s->top_p = 1.0f;
    s->repetition_penalty = 1.0f;
}

void cvlm_logit_bias_apply(float *logits, int V, const struct cvlm_logit_bias *b, int n)
{
    for (int i = 0; i < n; i++)
        if (b[i].id >= 0 && b[i].id < V)
            logits[b[i].id] += b[i].bias;
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

void cvlm_rng_seed(struct cvlm_rng *r, uint64_t seed)
{
    /* splitmix64 expands the seed into the xoshiro256** state */
    for (int i = 0; i < 4; i++) {
        uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        r->s[i] = z ^ (z >> 31);
    }
}

uint64_t cvlm_rng_next(struct cvlm_rng *r)
{
    uint64_t *s = r->s, res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return res;
}

double cvlm_rng_uniform(struct cvlm_rng *r)
{
    return (double)(cvlm_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/* Applies each penalty once per distinct token (counts for the frequency penalty). */
static int penalize(const struct cvlm_sampling *sp, float *logits, int V, const int32_t *tokens,
                    int n, int n_prompt)
{
    int rep = sp->repetition_penalty != 1.0f && sp->repetition_penalty > 0;
    int pf = sp->presence_penalty != 0 || sp->frequency_penalty != 0;
    if ((!rep && !pf) || n <= 0)
        return 0;
    int32_t *s = malloc((size_t)n * sizeof(int32_t));
    if (!s)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (rep) {
        memcpy(s, tokens, (size_t)n * sizeof(int32_t));
        qsort(s, (size_t)n, sizeof(int32_t), cmp_i32);
        for (int i = 0; i < n; i++)
            if ((i == 0 || s[i] != s[i - 1]) && s[i] >= 0 && s[i] < V) {
                float *l = &logits[s[i]];
                *l = *l > 0 ? *l / sp->repetition_penalty : *l * sp->repetition_penalty;
            }
    }
    int m = n - n_prompt;
    if (pf && m > 0) {
        memcpy(s, tokens + n_prompt, (size_t)m * sizeof(int32_t));
        qsort(s, (size_t)m, sizeof(int32_t), cmp_i32);
        for (int i = 0, j; i < m; i = j) {
            for (j = i; j < m && s[j] == s[i]; j++)
                ;
            if (s[i] >= 0 && s[i] < V)
                logits[s[i]] -= sp->presence_penalty + sp->frequency_penalty * (float)(j - i);
        }
    }
    free(s);
    return 0;
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

struct cand {
    float p;
    int32_t id;
};

static int cmp_cand(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Candidates with p >= t, lowering t until the set must contain what the filters keep. */
static int gather(const float *p, int V, float pmax, const struct cvlm_sampling *sp, struct cand *c)
{
    for (float t = pmax;; t *= 1.0f / 16) {
        int n = 0;
        double sum = 0;
        for (int i = 0; i < V; i++)
            if (p[i] >= t && p[i] > 0) {
                c[n++] = (struct cand){p[i], i};
                sum += p[i];
            }
        int k_ok = sp->top_k <= 0 || n >= sp->top_k;
        int p_ok = sp->top_p >= 1.0f || sum >= sp->top_p;
        if ((k_ok && p_ok) || t < 1e-30f)
            return n;
    }
}

int cvlm_sample(const struct cvlm_sampling *sp, float *logits, int V, const int32_t *tokens, int n,
                int n_prompt, struct cvlm_rng *rng)
{
    int rc = penalize(sp, logits, V, tokens, n, n_prompt);
    if (rc)
        return rc;
    if (!(sp->temperature >= CVLM_GREEDY_TEMPERATURE) || sp->top_k == 1)
        return argmax(logits, V);
    float mx = logits[argmax(logits, V)], inv_t = 1.0f / sp->temperature;
    double sum = 0;
    for (int i = 0; i < V; i++)
        sum += (logits[i] = expf((logits[i] - mx) * inv_t));
    for (int i = 0; i < V; i++)
        logits[i] = (float)(logits[i] / sum);
    float pmax = logits[argmax(logits, V)], floor_p = sp->min_p > 0 ? sp->min_p * pmax : 0;
    if (sp->top_k <= 0 && sp->top_p >= 1.0f) { /* no ranking needed: draw over all */
        double tot = 0, u;
        for (int i = 0; i < V; i++)
            tot += logits[i] >= floor_p ? logits[i] : 0;
        u = cvlm_rng_uniform(rng) * tot;
        for (int i = 0; i < V; i++)
            if (logits[i] >= floor_p && (u -= logits[i]) < 0)
                return i;
        return argmax(logits, V);
    }
    struct cand *c = malloc((size_t)V * sizeof(*c));
    if (!c)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    int k = gather(logits, V, pmax, sp, c);
    qsort(c, (size_t)k, sizeof(*c), cmp_cand);
    if (sp->top_k > 0 && k > sp->top_k)
        k = sp->top_k;
    double cum = 0;
    int keep = 0;
    while (keep < k && (keep == 0 || cum < sp->top_p) && c[keep].p >= floor_p)
        cum += c[keep++].p;
    double u = cvlm_rng_uniform(rng) * cum;
    int id = c[keep - 1].id;
    for (int i = 0; i < keep; i++)
        if ((u -= c[i].p) < 0) {
            id = c[i].id;
            break;
        }
    free(c);
    return id;
}
