/* model_rank.h - one tensor-parallel rank of the model (engine/model/model_rank.c), driven by the
 * public struct cvlm_model (engine/model/model_group.c). Internal to engine/.
 *
 * A rank owns its backend's activation arena and KV cache for its share of the heads and
 * MLP width; it borrows its weight shard, backend and comm handle. With tp == 1 the one
 * rank holds everything. Every rank of a group must run the same call with the same
 * arguments at the same time (each all-reduce waits for all of them).
 */
#ifndef CVLM_MODEL_RANK_H
#define CVLM_MODEL_RANK_H

#include "engine/comm.h"
#include "engine/model/model.h"

/* Image features of one image: the same rows on every rank, in each rank's memory. */
struct cvlm_feats {
    void *buf[CVLM_MAX_TP];
};

struct cvlm_rank;

int cvlm_rank_create(struct cvlm_weights *shard, struct cvlm_backend *be, struct cvlm_comm *comm,
                     const struct cvlm_model_opts *o, struct cvlm_rank **out);
void cvlm_rank_destroy(struct cvlm_rank *m);
/* Checks batch metadata against the cache and the vocabulary (run once, before every rank
 * starts, so that no rank stops early and leaves the others waiting in an all-reduce). */
int cvlm_rank_check_batch(const struct cvlm_rank *m, const struct cvlm_batch *b);
/* logits and vit_out: rank 0 only (NULL on the others). */
void cvlm_rank_forward(struct cvlm_rank *m, const struct cvlm_batch *b, float *logits);
void cvlm_rank_encode_image(struct cvlm_rank *m, const float *pixels, struct cvlm_feats *f,
                            float *vit_out);
int cvlm_rank_max_tokens(const struct cvlm_rank *m);
/* The first all-reduce that failed since the last call (0 if none), as an error with
 * its file:line; clears it. */
int cvlm_rank_comm_status(struct cvlm_rank *m);
int cvlm_rank_kv_blocks(const struct cvlm_rank *m);
int cvlm_rank_block_size(const struct cvlm_rank *m);

#endif
