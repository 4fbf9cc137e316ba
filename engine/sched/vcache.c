/* vcache.c - vision feature cache (see vcache.h). Entries live in an array ordered by
 * last use (index 0 = least recent); lookups are linear, which is cheap next to a
 * vision tower run and keeps the structure trivially correct. */
#include "engine/sched/vcache.h"

#include "engine/model/model.h"

#include <stdlib.h>
#include <string.h>

struct entry {
    uint64_t key;
    struct cvlm_feats *buf;
    int ref;
    int cached; /* 0: private buffer (over budget), freed on release */
};

struct cvlm_vcache {
    struct cvlm_model *m;
    size_t budget, entry_bytes;
    struct entry *e;
    int n, cap;
    struct cvlm_vc_stats st;
};

struct cvlm_vcache *cvlm_vc_create(struct cvlm_model *m, size_t budget)
{
    struct cvlm_vcache *vc = calloc(1, sizeof(*vc));
    if (!vc)
        return NULL;
    vc->m = m;
    vc->budget = budget;
    vc->entry_bytes = cvlm_model_feats_bytes(m) + 1; /* never 0, even without vision */
    return vc;
}

void cvlm_vc_destroy(struct cvlm_vcache *vc)
{
    if (!vc)
        return;
    for (int i = 0; i < vc->n; i++)
        cvlm_model_feats_free(vc->m, vc->e[i].buf);
    free(vc->e);
    free(vc);
}

/* Moves entry i to the most-recent end; returns its new index. */
static int touch(struct cvlm_vcache *vc, int i)
{
    struct entry x = vc->e[i];
    memmove(&vc->e[i], &vc->e[i + 1], (size_t)(vc->n - i - 1) * sizeof(x));
    vc->e[vc->n - 1] = x;
    return vc->n - 1;
}

static void drop(struct cvlm_vcache *vc, int i)
{
    if (vc->e[i].cached) {
        vc->st.bytes -= vc->entry_bytes;
        vc->st.entries--;
    }
    cvlm_model_feats_free(vc->m, vc->e[i].buf);
    memmove(&vc->e[i], &vc->e[i + 1], (size_t)(vc->n - i - 1) * sizeof(vc->e[0]));
    vc->n--;
}

struct cvlm_feats *cvlm_vc_get(struct cvlm_vcache *vc, uint64_t key)
{
    for (int i = 0; i < vc->n; i++)
        if (vc->e[i].cached && vc->e[i].key == key) {
            i = touch(vc, i);
            vc->e[i].ref++;
            vc->st.hits++;
            return vc->e[i].buf;
        }
    vc->st.misses++;
    return NULL;
}

struct cvlm_feats *cvlm_vc_insert(struct cvlm_vcache *vc, uint64_t key)
{
    /* evict unpinned cached entries, least recent first, until the new one fits */
    for (int i = 0; i < vc->n && vc->st.bytes + vc->entry_bytes > vc->budget;) {
        if (vc->e[i].ref == 0 && vc->e[i].cached) {
            drop(vc, i);
            vc->st.evictions++;
        } else {
            i++;
        }
    }
    if (vc->n == vc->cap) {
        int nc = vc->cap ? vc->cap * 2 : 8;
        struct entry *ne = realloc(vc->e, (size_t)nc * sizeof(*ne));
        if (!ne)
            return NULL;
        vc->e = ne;
        vc->cap = nc;
    }
    struct cvlm_feats *buf = cvlm_model_feats_alloc(vc->m);
    if (!buf)
        return NULL;
    int fits = vc->st.bytes + vc->entry_bytes <= vc->budget;
    vc->e[vc->n++] = (struct entry){key, buf, 1, fits};
    if (fits) {
        vc->st.bytes += vc->entry_bytes;
        vc->st.entries++;
    }
    return buf;
}

void cvlm_vc_release(struct cvlm_vcache *vc, struct cvlm_feats *feats)
{
    for (int i = 0; i < vc->n; i++)
        if (vc->e[i].buf == feats) {
            if (--vc->e[i].ref == 0 && !vc->e[i].cached)
                drop(vc, i);
            return;
        }
}

void cvlm_vc_discard(struct cvlm_vcache *vc, struct cvlm_feats *feats)
{
    for (int i = 0; i < vc->n; i++)
        if (vc->e[i].buf == feats) {
            drop(vc, i);
            return;
        }
}

void cvlm_vc_get_stats(const struct cvlm_vcache *vc, struct cvlm_vc_stats *s)
{
    *s = vc->st;
}
