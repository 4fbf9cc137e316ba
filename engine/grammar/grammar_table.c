/* grammar_table.c - compiled grammars by (kind, schema text), least recently used out.
 *
 * The schema text is compared whole (not by hash alone), so two schemas never share a
 * grammar by a collision. A grammar evicted while requests still use it lives on through
 * their references. Compilation runs outside the lock (it can take milliseconds); two
 * threads compiling the same new schema both succeed and the second insert is dropped.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "engine/error.h"
#include "engine/grammar/grammar.h"
#include "engine/util/hash.h"

struct tentry {
    enum cvlm_rformat kind;
    uint64_t hash;
    char *text;
    size_t len;
    struct cvlm_grammar *g;
    unsigned long used; /* clock of the last use */
};

struct cvlm_grammar_table {
    pthread_mutex_t lock;
    struct tentry e[CVLM_GRAMMAR_TABLE];
    int n;
    unsigned long clock;
};

int cvlm_grammar_table_create(struct cvlm_grammar_table **out)
{
    struct cvlm_grammar_table *t = calloc(1, sizeof(*t));
    if (!t)
        return cvlm_errf(CVLM_ENOMEM, "out of memory for the grammar table");
    pthread_mutex_init(&t->lock, NULL);
    *out = t;
    return 0;
}

void cvlm_grammar_table_destroy(struct cvlm_grammar_table *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->n; i++) {
        cvlm_grammar_unref(t->e[i].g);
        free(t->e[i].text);
    }
    pthread_mutex_destroy(&t->lock);
    free(t);
}

static struct tentry *find(struct cvlm_grammar_table *t, enum cvlm_rformat kind, uint64_t h,
                           const char *s, size_t len)
{
    for (int i = 0; i < t->n; i++) {
        struct tentry *e = &t->e[i];
        if (e->kind == kind && e->hash == h && e->len == len && !memcmp(e->text, s, len))
            return e;
    }
    return NULL;
}

int cvlm_grammar_table_get(struct cvlm_grammar_table *t, enum cvlm_rformat kind, const char *schema,
                           size_t len, struct cvlm_grammar **out)
{
    const char *s = schema ? schema : "";
    len = schema ? len : 0;
    uint64_t h = cvlm_hash64(s, len, (uint64_t)kind);
    pthread_mutex_lock(&t->lock);
    struct tentry *e = find(t, kind, h, s, len);
    if (e) {
        e->used = ++t->clock;
        cvlm_grammar_ref(e->g);
        *out = e->g;
        pthread_mutex_unlock(&t->lock);
        return 0;
    }
    pthread_mutex_unlock(&t->lock);
    struct cvlm_grammar *g;
    int rc = cvlm_grammar_compile(kind, schema, len, &g);
    if (rc)
        return rc;
    char *text = malloc(len ? len : 1);
    if (!text) { /* serve it uncached */
        *out = g;
        return 0;
    }
    memcpy(text, s, len);
    pthread_mutex_lock(&t->lock);
    if (find(t, kind, h, s, len)) { /* another thread compiled it meanwhile */
        free(text);
    } else {
        if (t->n == CVLM_GRAMMAR_TABLE) { /* evict the least recently used */
            int old = 0;
            for (int i = 1; i < t->n; i++)
                if (t->e[i].used < t->e[old].used)
                    old = i;
            cvlm_grammar_unref(t->e[old].g);
            free(t->e[old].text);
            t->e[old] = t->e[--t->n];
        }
        cvlm_grammar_ref(g);
        t->e[t->n++] = (struct tentry){kind, h, text, len, g, ++t->clock};
    }
    pthread_mutex_unlock(&t->lock);
    *out = g;
    return 0;
}
