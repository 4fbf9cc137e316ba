/* model.h - the CogVLM forward pass (vision tower, GLU adapter, visual-expert LLaMA),
 * written once against the backend op table, on one or several tensor-parallel ranks.
 *
 * The model creates and owns its backends (one per rank), the weight shards in their
 * memory, the activation arenas (sized at creation for max_tokens per step and one
 * image) and the paged KV cache memory; which blocks belong to which sequence is decided
 * by the caller (engine/sched/kvcache.c), which passes block tables per step. With tp > 1 every
 * call runs on all ranks in lock-step (rank 0 on the calling thread, the others on worker
 * threads the model owns) and returns when all are done. A model is driven by one thread
 * at a time.
 */
#ifndef CVLM_MODEL_H
#define CVLM_MODEL_H

#include "engine/backend.h"
#include "engine/model/weights.h"

#include <stdint.h>

enum cvlm_rope_freq {
    CVLM_ROPE_FREQ_AUTO = 0,  /* the checkpoint's inv_freq when stored, else the formula */
    CVLM_ROPE_FREQ_FILE = 1,  /* the checkpoint's (e.g. BF16-rounded) inv_freq; required */
    CVLM_ROPE_FREQ_EXACT = 2, /* theta^(-2j/head_dim) in float32 */
};

enum cvlm_backend_kind { CVLM_BACKEND_CPU = 0, CVLM_BACKEND_CUDA = 1 };

/* The KV cache's element type (--kv-cache-dtype). DEFAULT is the backend's own: F32 on the
 * CPU (the activation dtype; see CVLM_KV_CPU_DEFAULT), BF16 on CUDA. The CPU backend has
 * all four; the CUDA backend keeps its BF16 cache and refuses F32, F16 and INT8 at model
 * creation (CVLM_EINVAL). A 16-bit cache holds twice the blocks in the same kv_bytes; INT8
 * (Q8 codes plus an F32 scale per slot and KV head for K and for V, engine/backend.h)
 * 4 * hd / (hd + 4) times the F32 blocks (3.88x at head_dim 128). */
enum cvlm_kv_cache_dtype {
    CVLM_KV_DEFAULT = 0,
    CVLM_KV_F32 = 1,
    CVLM_KV_F16 = 2,
    CVLM_KV_BF16 = 3,
    CVLM_KV_INT8 = 4,
};
#define CVLM_KV_CPU_DEFAULT CVLM_KV_F32

/* The element dtype of an explicit choice (DEFAULT: F32). */
static inline enum cvlm_dtype cvlm_model_kv_dtype_of(int kv_cache_dtype)
{
    return kv_cache_dtype == CVLM_KV_F16    ? CVLM_DTYPE_F16
           : kv_cache_dtype == CVLM_KV_BF16 ? CVLM_DTYPE_BF16
           : kv_cache_dtype == CVLM_KV_INT8 ? CVLM_DTYPE_Q8
                                            : CVLM_DTYPE_F32;
}

struct cvlm_model_opts {
    int max_tokens;  /* tokens per forward call (prefill chunk + decodes); 0 = 512 */
    int kv_blocks;   /* KV cache blocks; 0 = from kv_bytes, else max_tokens * 4 slots */
    size_t kv_bytes; /* KV cache bytes per rank, when kv_blocks is 0 */
    int block_size;  /* slots per block; 0 = 16 */
    enum cvlm_rope_freq rope_freq;
    enum cvlm_backend_kind backend;
    int threads;        /* CPU: threads over all ranks; 0 = one per online core */
    int tp;             /* tensor-parallel ranks; 0 = 1 */
    int device;         /* CUDA: rank r runs on device + r */
    int kv_cache_dtype; /* enum cvlm_kv_cache_dtype; 0: the backend's */
};

struct cvlm_model;
/* The features of one image (boi, patches, eoi rows) in every rank's memory. */
struct cvlm_feats;

/* One forward step over a flat set of tokens from any number of sequences. */
struct cvlm_batch {
    int n_tokens;
    const int32_t *ids;     /* [n] token ids (ignored where img_row >= 0) */
    const int32_t *pos;     /* [n] RoPE positions */
    const uint8_t *expert;  /* [n] CVLM_EXPERT_LANG / CVLM_EXPERT_VISION */
    const int32_t *seq;     /* [n] index into seqs */
    const int32_t *slot;    /* [n] KV slot of the token inside its sequence */
    const int32_t *img_row; /* [n] row of its sequence's image features replacing the
                                embedding, or -1; may be NULL (no image slots) */
    const struct cvlm_feats *const *img_feats; /* [n_seqs] features, or NULL */
    const struct cvlm_seq_kv *seqs;
    int n_seqs;
    const uint8_t *want_logits; /* [n] 1 where logits are wanted; NULL = last token only */
    /* debug: called with the residual stream entering each layer (and after the final
     * norm, layer == num_layers), rows in batch order, on the host */
    void (*on_hidden)(void *ctx, int layer, const float *rows, int n, int width);
    void *dbg_ctx;
};

/* Borrows w (which must outlive the model). Fails with a clear message if tp does not
 * divide the model's heads and widths, or the backend cannot be had. */
int cvlm_model_create(struct cvlm_weights *w, const struct cvlm_model_opts *opts,
                      struct cvlm_model **out);
void cvlm_model_destroy(struct cvlm_model *m);

int cvlm_model_block_size(const struct cvlm_model *m);
int cvlm_model_kv_blocks(const struct cvlm_model *m);
int cvlm_model_max_tokens(const struct cvlm_model *m);
int cvlm_model_tp(const struct cvlm_model *m);
/* Rank 0's backend (its name, activation dtype, threads). */
struct cvlm_backend *cvlm_model_backend(const struct cvlm_model *m);
const struct cvlm_config *cvlm_model_config(const struct cvlm_model *m);
/* KV cache bytes of one block on one rank (both K and V, all layers). */
size_t cvlm_model_kv_block_bytes(const struct cvlm_model *m);
/* The KV cache's element type (F32, F16, BF16 or Q8: int8 with scales). */
enum cvlm_dtype cvlm_model_kv_dtype(const struct cvlm_model *m);

/* Image feature buffers (image_tokens x hidden on every rank); NULL if out of memory.
 * feats_bytes is what one takes on each rank. */
struct cvlm_feats *cvlm_model_feats_alloc(struct cvlm_model *m);
void cvlm_model_feats_free(struct cvlm_model *m, struct cvlm_feats *f);
size_t cvlm_model_feats_bytes(const struct cvlm_model *m);
/* Rank 0's copy as host floats [image_tokens, hidden]. */
void cvlm_model_feats_to_host(struct cvlm_model *m, const struct cvlm_feats *f, float *dst);

/* Runs the vision tower and adapter on one normalized image (host float CHW, the
 * config's image_size square) and writes the image_tokens x hidden features (boi,
 * patches, eoi) into f. If vit_out (host) is given it receives the tower's output
 * including CLS, [num_positions, vision hidden]. */
int cvlm_model_encode_image(struct cvlm_model *m, const float *pixels, struct cvlm_feats *f,
                            float *vit_out);

/* Runs one step; writes logits [k, vocab] to host `logits` for the k tokens wanted, in
 * batch order. */
int cvlm_model_forward(struct cvlm_model *m, const struct cvlm_batch *b, float *logits);

#endif
