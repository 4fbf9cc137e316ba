/* vcache.h - cache of vision-tower outputs (adapter features, one entry per image).
 *
 * Keyed by a 64-bit hash of the preprocessed image; entries are the model's feature
 * buffers (image_tokens x hidden activations on every rank; the budget counts one rank's
 * copy, i.e. the memory each device spends). Byte budget with LRU eviction of entries no request
 * is using; an entry is pinned (refcount) from lookup/insert until release. With a budget
 * of 0 nothing stays cached, but a request still gets a private buffer. Engine thread only.
 */
#ifndef CVLM_VCACHE_H
#define CVLM_VCACHE_H

#include "engine/model/model.h"

#include <stddef.h>
#include <stdint.h>

struct cvlm_vcache;

struct cvlm_vc_stats {
    uint64_t hits, misses, evictions;
    int entries;
    size_t bytes;
};

struct cvlm_vcache *cvlm_vc_create(struct cvlm_model *m, size_t budget);
void cvlm_vc_destroy(struct cvlm_vcache *vc);

/* The cached features for key, pinned; NULL (a miss) if absent. */
struct cvlm_feats *cvlm_vc_get(struct cvlm_vcache *vc, uint64_t key);
/* A new pinned buffer for key, to be filled by the caller; NULL if out of memory. */
struct cvlm_feats *cvlm_vc_insert(struct cvlm_vcache *vc, uint64_t key);
void cvlm_vc_release(struct cvlm_vcache *vc, struct cvlm_feats *feats);
/* Releases and forgets an entry whose contents could not be computed. */
void cvlm_vc_discard(struct cvlm_vcache *vc, struct cvlm_feats *feats);

void cvlm_vc_get_stats(const struct cvlm_vcache *vc, struct cvlm_vc_stats *s);

#endif
