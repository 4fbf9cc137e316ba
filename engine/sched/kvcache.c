/* kvcache.c - block allocator + prefix cache (see kvcache.h).
 *
 * State per block: refcount, the hash it is published under (if any), and links of an
 * intrusive doubly linked list: the free list or the LRU list of cached blocks (most
 * recently released at the tail). The hash -> block map is an open-addressing table of
 * twice the block count with tombstones; it holds exactly the published blocks.
 */
#include "engine/sched/kvcache.h"

#include "engine/util/hash.h"

#include <stdlib.h>
#include <string.h>

#define NONE (-1)
#define TOMB (-2)

struct blk {
    int ref;
    int published;
    uint64_t hash;
    int prev, next; /* list links (free or LRU) */
    int in_list;    /* 0 none, 1 free, 2 lru */
};

struct list {
    int head, tail, n;
};

struct cvlm_kvcache {
    int n, bs;
    struct blk *b;
    struct list free, lru;
    int *table; /* [cap] block index, NONE or TOMB */
    int cap;
    struct cvlm_kv_stats st;
};

static void list_push(struct cvlm_kvcache *kv, struct list *l, int id, int which)
{
    struct blk *x = &kv->b[id];
    x->prev = l->tail;
    x->next = NONE;
    if (l->tail != NONE)
        kv->b[l->tail].next = id;
    else
        l->head = id;
    l->tail = id;
    l->n++;
    x->in_list = which;
}

static void list_remove(struct cvlm_kvcache *kv, struct list *l, int id)
{
    struct blk *x = &kv->b[id];
    if (x->prev != NONE)
        kv->b[x->prev].next = x->next;
    else
        l->head = x->next;
    if (x->next != NONE)
        kv->b[x->next].prev = x->prev;
    else
        l->tail = x->prev;
    l->n--;
    x->in_list = 0;
}

struct cvlm_kvcache *cvlm_kv_create(int n_blocks, int block_size)
{
    struct cvlm_kvcache *kv = calloc(1, sizeof(*kv));
    if (!kv || n_blocks <= 0 || block_size <= 0)
        goto fail;
    kv->n = n_blocks;
    kv->bs = block_size;
    kv->cap = 2 * n_blocks + 1;
    kv->b = calloc((size_t)n_blocks, sizeof(*kv->b));
    kv->table = malloc((size_t)kv->cap * sizeof(int));
    if (!kv->b || !kv->table)
        goto fail;
    for (int i = 0; i < kv->cap; i++)
        kv->table[i] = NONE;
    kv->free = kv->lru = (struct list){NONE, NONE, 0};
    for (int i = 0; i < n_blocks; i++)
        list_push(kv, &kv->free, i, 1);
    kv->st.n_blocks = n_blocks;
    return kv;
fail:
    cvlm_kv_destroy(kv);
    return NULL;
}

void cvlm_kv_destroy(struct cvlm_kvcache *kv)
{
    if (!kv)
        return;
    free(kv->b);
    free(kv->table);
    free(kv);
}

int cvlm_kv_block_size(const struct cvlm_kvcache *kv)
{
    return kv->bs;
}

int cvlm_kv_available(const struct cvlm_kvcache *kv)
{
    return kv->free.n + kv->lru.n;
}

/* Slot of `hash` in the table, or -1. */
static int find_slot(const struct cvlm_kvcache *kv, uint64_t hash)
{
    for (int i = 0, s = (int)(hash % (uint64_t)kv->cap); i < kv->cap; i++, s = (s + 1) % kv->cap) {
        int id = kv->table[s];
        if (id == NONE)
            return -1;
        if (id >= 0 && kv->b[id].hash == hash)
            return s;
    }
    return -1;
}

static void unpublish(struct cvlm_kvcache *kv, int id)
{
    int s = find_slot(kv, kv->b[id].hash);
    if (s >= 0 && kv->table[s] == id)
        kv->table[s] = TOMB;
    kv->b[id].published = 0;
}

int cvlm_kv_alloc(struct cvlm_kvcache *kv)
{
    int id;
    if (kv->free.n) {
        id = kv->free.head;
        list_remove(kv, &kv->free, id);
    } else if (kv->lru.n) {
        id = kv->lru.head; /* least recently released */
        list_remove(kv, &kv->lru, id);
        unpublish(kv, id);
        kv->st.evictions++;
    } else {
        return -1;
    }
    kv->b[id].ref = 1;
    return id;
}

void cvlm_kv_ref(struct cvlm_kvcache *kv, int id)
{
    struct blk *x = &kv->b[id];
    if (x->in_list == 2)
        list_remove(kv, &kv->lru, id);
    x->ref++;
}

void cvlm_kv_unref(struct cvlm_kvcache *kv, int id)
{
    struct blk *x = &kv->b[id];
    if (x->ref <= 0 || --x->ref > 0)
        return;
    if (x->published)
        list_push(kv, &kv->lru, id, 2);
    else
        list_push(kv, &kv->free, id, 1);
}

uint64_t cvlm_kv_chain(uint64_t prev, const uint64_t *keys, int n)
{
    /* keyed (engine/util/hash.h): a client cannot build a prompt whose chain collides with
     * another's; the previous chain is the seed, so a block's hash covers its whole prefix */
    uint64_t h = cvlm_hash64(keys, (size_t)n * sizeof(*keys), prev ^ 0x6b76636861696e00ull);
    return h ? h : 1;
}

int cvlm_kv_lookup(struct cvlm_kvcache *kv, uint64_t hash)
{
    int s = find_slot(kv, hash);
    kv->st.query_blocks++;
    if (s < 0)
        return -1;
    kv->st.hit_blocks++;
    cvlm_kv_ref(kv, kv->table[s]);
    return kv->table[s];
}

void cvlm_kv_publish(struct cvlm_kvcache *kv, int id, uint64_t hash)
{
    struct blk *x = &kv->b[id];
    int s, tomb = -1;
    if (x->published || find_slot(kv, hash) >= 0)
        return;
    /* at most n of the 2n+1 slots hold blocks, so the probe meets NONE or a tombstone;
     * the first tombstone on the path is reused so that tombstones do not accumulate */
    s = (int)(hash % (uint64_t)kv->cap);
    for (int i = 0; i < kv->cap && kv->table[s] != NONE; i++, s = (s + 1) % kv->cap)
        if (kv->table[s] == TOMB && tomb < 0)
            tomb = s;
    if (tomb >= 0)
        s = tomb;
    else if (kv->table[s] != NONE)
        return; /* cannot happen (see above); stay unpublished rather than clobber */
    kv->table[s] = id;
    x->hash = hash;
    x->published = 1;
}

void cvlm_kv_get_stats(const struct cvlm_kvcache *kv, struct cvlm_kv_stats *s)
{
    *s = kv->st;
    s->cached = kv->lru.n;
    s->used = kv->n - kv->free.n - kv->lru.n;
}
