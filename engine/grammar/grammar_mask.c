/* grammar_mask.c - token masks: the vocabulary trie, one walk of it per state, and the
 * per-grammar cache of masks by state.
 *
 * The walk advances the state byte by byte down the trie of token texts and prunes a
 * subtree as soon as no thread is left, so its cost is the number of trie nodes whose
 * prefix the grammar still accepts (all of them inside a free string: ~1e5 for a 32k
 * vocabulary; a few hundred at a structural position). States recur (the same position
 * in the same schema, every character of a free string), so the cache serves nearly every
 * step after the first requests with a schema: a hash of the state's encoding, then a
 * comparison of the encoding itself.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/error.h"
#include "engine/grammar/grammar_internal.h"
#include "engine/text/tokenizer.h"
#include "engine/util/hash.h"

int gram_state_step(const struct cvlm_grammar *g, struct cvlm_gstate *s, int byte, void *scratch);
void *gram_state_scratch_new(void);
long *gram_state_scratch_work(void *scratch);

/* ---- the vocabulary trie ------------------------------------------------------------ */

struct tnode {
    int32_t child, sibling; /* first child, next sibling (-1: none) */
    int32_t tok;            /* first token ending here (-1: none); more via tok_next */
    uint8_t byte;
};

struct cvlm_vocab {
    struct tnode *nodes;
    int n_nodes, cap_nodes;
    int32_t *tok_next;
    int V, max_len;
};

static int32_t node_new(struct cvlm_vocab *v, uint8_t byte)
{
    if (v->n_nodes == v->cap_nodes) {
        int nc = v->cap_nodes ? v->cap_nodes * 2 : 1024;
        struct tnode *n = realloc(v->nodes, (size_t)nc * sizeof(*n));
        if (!n)
            return -1;
        v->nodes = n;
        v->cap_nodes = nc;
    }
    v->nodes[v->n_nodes] = (struct tnode){-1, -1, -1, byte};
    return v->n_nodes++;
}

int cvlm_vocab_create(const struct cvlm_tokenizer *tok, int V, struct cvlm_vocab **out)
{
    struct cvlm_vocab *v = calloc(1, sizeof(*v));
    if (!v || !(v->tok_next = malloc((size_t)(V > 0 ? V : 1) * sizeof(int32_t))) ||
        node_new(v, 0) < 0)
        goto oom;
    v->V = V;
    int unk = cvlm_tokenizer_unk_id(tok), nv = cvlm_tokenizer_vocab_size(tok);
    for (int id = 0; id < V; id++) {
        const char *s;
        size_t n = id < nv ? cvlm_tokenizer_piece_text(tok, id, &s) : 0;
        v->tok_next[id] = -1;
        if (n == 0 || id == unk)
            continue;
        int32_t at = 0;
        for (size_t i = 0; i < n; i++) {
            uint8_t b = (uint8_t)s[i];
            int32_t c = v->nodes[at].child, prev = -1;
            while (c >= 0 && v->nodes[c].byte < b) {
                prev = c;
                c = v->nodes[c].sibling;
            }
            if (c < 0 || v->nodes[c].byte != b) { /* insert, siblings kept sorted */
                int32_t m = node_new(v, b);
                if (m < 0)
                    goto oom;
                v->nodes[m].sibling = c;
                if (prev >= 0)
                    v->nodes[prev].sibling = m;
                else
                    v->nodes[at].child = m;
                c = m;
            }
            at = c;
        }
        v->tok_next[id] = v->nodes[at].tok;
        v->nodes[at].tok = id;
        if ((int)n > v->max_len)
            v->max_len = (int)n;
    }
    *out = v;
    return 0;
oom:
    cvlm_vocab_destroy(v);
    return cvlm_errf(CVLM_ENOMEM, "out of memory for the vocabulary trie");
}

void cvlm_vocab_destroy(struct cvlm_vocab *v)
{
    if (!v)
        return;
    free(v->nodes);
    free(v->tok_next);
    free(v);
}

int cvlm_vocab_size(const struct cvlm_vocab *v)
{
    return v->V;
}

/* ---- the cache ---------------------------------------------------------------------- */

struct gmask_entry {
    uint64_t hash;
    int32_t *key; /* the state's encoding */
    int key_n;
    uint64_t *mask;
};

struct gmask_cache {
    struct gmask_entry *slots; /* open addressing, power of two */
    int n_slots, used;
    size_t bytes;
    int V;                      /* vocabulary the masks are for */
    uint64_t *work_mask;        /* the last computed mask when it could not be cached */
    struct cvlm_gstate *states; /* walk: one state per trie depth */
    int n_states;
    void *scratch;
    long hits, misses;
};

void gram_mask_cache_free(struct gmask_cache *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->n_slots; i++) {
        free(c->slots[i].key);
        free(c->slots[i].mask);
    }
    free(c->slots);
    free(c->work_mask);
    for (int i = 0; i < c->n_states; i++)
        cvlm_gstate_free(&c->states[i]);
    free(c->states);
    free(c->scratch);
    free(c);
}

static void cache_clear(struct gmask_cache *c)
{
    for (int i = 0; i < c->n_slots; i++) {
        free(c->slots[i].key);
        free(c->slots[i].mask);
        c->slots[i] = (struct gmask_entry){0};
    }
    c->used = 0;
    c->bytes = 0;
}

static struct gmask_cache *cache_of(struct cvlm_grammar *g, const struct cvlm_vocab *v)
{
    struct gmask_cache *c = g->cache;
    if (c && c->V != v->V) { /* another vocabulary (tests): start over */
        gram_mask_cache_free(c);
        g->cache = c = NULL;
    }
    if (c)
        return c;
    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->V = v->V;
    c->n_slots = 1024;
    c->n_states = v->max_len + 2;
    if (!(c->slots = calloc((size_t)c->n_slots, sizeof(*c->slots))) ||
        !(c->states = calloc((size_t)c->n_states, sizeof(*c->states))) ||
        !(c->scratch = gram_state_scratch_new()) ||
        !(c->work_mask = malloc(((size_t)v->V + 63) / 64 * 8))) {
        gram_mask_cache_free(c);
        return NULL;
    }
    g->cache = c;
    return c;
}

static struct gmask_entry *lookup(struct gmask_cache *c, const struct cvlm_gstate *s, uint64_t h)
{
    for (int i = (int)(h & (uint64_t)(c->n_slots - 1));; i = (i + 1) & (c->n_slots - 1)) {
        struct gmask_entry *e = &c->slots[i];
        if (!e->key)
            return e; /* the free slot where it would go */
        if (e->hash == h && e->key_n == s->n &&
            !memcmp(e->key, s->v, (size_t)s->n * sizeof(int32_t)))
            return e;
    }
}

static int rehash(struct gmask_cache *c)
{
    struct gmask_entry *old = c->slots;
    int n_old = c->n_slots;
    struct gmask_entry *s = calloc((size_t)n_old * 2, sizeof(*s));
    if (!s)
        return -1;
    c->slots = s;
    c->n_slots = n_old * 2;
    for (int i = 0; i < n_old; i++)
        if (old[i].key) {
            int j = (int)(old[i].hash & (uint64_t)(c->n_slots - 1));
            while (s[j].key)
                j = (j + 1) & (c->n_slots - 1);
            s[j] = old[i];
        }
    free(old);
    return 0;
}

/* ---- the walk ----------------------------------------------------------------------- */

/* Matcher work one walk may take: 64 closure steps per trie node and a million more (the
 * states of ordinary schemas take up to ~20 per node: a string character's alternatives,
 * whitespace runs), so a schema made to be ambiguous (many live threads at every byte)
 * cannot hold the engine thread for long: past it the walk fails and so does that request
 * alone. */
#define GRAMMAR_WALK_BUDGET(v) (64L * (v)->n_nodes + 1000000L)

static int walk(const struct cvlm_grammar *g, const struct cvlm_vocab *v, struct gmask_cache *c,
                const struct cvlm_gstate *s, uint64_t *mask)
{
    /* iterative depth-first: stack of (node, depth); states[d] = state after the first d
     * bytes of the node's prefix */
    memset(mask, 0, ((size_t)v->V + 63) / 64 * 8);
    if (cvlm_gstate_copy(&c->states[0], s))
        return CVLM_ENOMEM;
    long *work = gram_state_scratch_work(c->scratch), budget = GRAMMAR_WALK_BUDGET(v);
    *work = 0;
    int32_t stack_node[260];
    int depth = 0;
    stack_node[0] = v->nodes[0].child;
    while (depth >= 0) {
        int32_t n = stack_node[depth];
        if (n < 0) {
            depth--;
            continue;
        }
        stack_node[depth] = v->nodes[n].sibling; /* next time: the sibling */
        struct cvlm_gstate *next = &c->states[depth + 1];
        if (cvlm_gstate_copy(next, &c->states[depth]))
            return CVLM_ENOMEM;
        int rc = gram_state_step(g, next, v->nodes[n].byte, c->scratch);
        if (rc < 0)
            return rc;
        if (*work > budget)
            return cvlm_errf(CVLM_ETOOBIG,
                             "json_schema: the grammar is too ambiguous here to "
                             "constrain within the work bound (%ld steps)",
                             budget);
        if (rc == 0)
            continue; /* no thread takes this byte: the whole subtree is out */
        for (int32_t t = v->nodes[n].tok; t >= 0; t = v->tok_next[t])
            mask[t >> 6] |= 1ull << (t & 63);
        if (v->nodes[n].child >= 0 && depth + 2 < c->n_states && depth + 1 < 259)
            stack_node[++depth] = v->nodes[n].child;
    }
    return 0;
}

const uint64_t *cvlm_grammar_mask(struct cvlm_grammar *g, const struct cvlm_vocab *v,
                                  const struct cvlm_gstate *s)
{
    struct gmask_cache *c = cache_of(g, v);
    if (!c) {
        cvlm_errf(CVLM_ENOMEM, "out of memory for a token mask");
        return NULL;
    }
    uint64_t h = cvlm_hash64(s->v, (size_t)s->n * sizeof(int32_t), 0x6d61736bull);
    struct gmask_entry *e = lookup(c, s, h);
    if (e->key) {
        c->hits++;
        return e->mask;
    }
    c->misses++;
    size_t mbytes = ((size_t)v->V + 63) / 64 * 8, kbytes = (size_t)s->n * sizeof(int32_t);
    if (c->bytes + mbytes + kbytes > CVLM_GRAMMAR_CACHE_BYTES) { /* full: start over */
        cache_clear(c);
        e = lookup(c, s, h);
    }
    uint64_t *mask = malloc(mbytes);
    int32_t *key = malloc(kbytes ? kbytes : 1);
    if (!mask || !key) { /* compute into the work mask, uncached */
        free(mask);
        free(key);
        return walk(g, v, c, s, c->work_mask) ? NULL : c->work_mask;
    }
    if (walk(g, v, c, s, mask)) { /* the error is recorded */
        free(mask);
        free(key);
        return NULL;
    }
    memcpy(key, s->v, kbytes);
    *e = (struct gmask_entry){h, key, s->n, mask};
    c->bytes += mbytes + kbytes;
    if (++c->used * 2 > c->n_slots && rehash(c)) { /* cannot grow: keep it bounded */
        memcpy(c->work_mask, mask, mbytes);
        cache_clear(c);
        return c->work_mask;
    }
    return mask;
}

void cvlm_grammar_cache_stats(const struct cvlm_grammar *g, long *hits, long *misses)
{
    *hits = g->cache ? g->cache->hits : 0;
    *misses = g->cache ? g->cache->misses : 0;
}
