/* kvcache.h - the paged KV cache's block allocator with a prefix cache.
 *
 * Blocks are identified by index (0..n_blocks-1); the memory itself belongs to the model.
 * A block is FREE, USED (refcount > 0) or CACHED (refcount 0 but holding a full block of
 * a known prefix, evictable in LRU order). A full block can be published under a chain
 * hash of everything before it and its own contents (token ids, plus the image content
 * hash for image slots); a later request whose prompt has the same chain reuses it.
 * Only the engine thread touches the allocator: no locking.
 */
#ifndef CVLM_KVCACHE_H
#define CVLM_KVCACHE_H

#include <stdint.h>

struct cvlm_kvcache;

struct cvlm_kv_stats {
    int n_blocks, used, cached;
    uint64_t hit_blocks, query_blocks, evictions;
};

struct cvlm_kvcache *cvlm_kv_create(int n_blocks, int block_size);
void cvlm_kv_destroy(struct cvlm_kvcache *kv);

int cvlm_kv_block_size(const struct cvlm_kvcache *kv);
/* Blocks that an allocation could obtain now (free + evictable). */
int cvlm_kv_available(const struct cvlm_kvcache *kv);

/* Takes a block (a free one, else the least recently used cached one, which is evicted);
 * refcount 1. Returns -1 if none. */
int cvlm_kv_alloc(struct cvlm_kvcache *kv);
void cvlm_kv_ref(struct cvlm_kvcache *kv, int block);
/* Drops a reference; at 0 a published block becomes CACHED, others FREE. */
void cvlm_kv_unref(struct cvlm_kvcache *kv, int block);

/* Chain hash of one full block: hash of the previous block's chain (0 for the first)
 * and the block's slot keys. */
uint64_t cvlm_kv_chain(uint64_t prev, const uint64_t *slot_keys, int n);
/* The cached or used block published under `hash`, referenced for the caller; -1 if
 * none. Counts a query (and a hit) in the stats. */
int cvlm_kv_lookup(struct cvlm_kvcache *kv, uint64_t hash);
/* Publishes a full block under `hash` (no-op if the hash is already known). */
void cvlm_kv_publish(struct cvlm_kvcache *kv, int block, uint64_t hash);

void cvlm_kv_get_stats(const struct cvlm_kvcache *kv, struct cvlm_kv_stats *s);

#endif
