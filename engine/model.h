/* model.h - the CogVLM forward pass (vision tower, GLU adapter, visual-expert LLaMA),
 * written once against the backend op table.
 *
 * The model owns its activation arena (sized at creation for max_tokens per step and
 * one image) and the paged KV cache memory; which blocks belong to which sequence is
 * decided by the caller (engine/kvcache.c), which passes block tables per step.
 * A model is driven by one thread at a time.
 */
#ifndef CVLM_MODEL_H
#define CVLM_MODEL_H

#include "engine/backend.h"
#include "engine/weights.h"

#include <stdint.h>

enum cvlm_rope_freq {
    CVLM_ROPE_FREQ_AUTO = 0,  /* the checkpoint's inv_freq when stored, else the formula */
    CVLM_ROPE_FREQ_FILE = 1,  /* the checkpoint's (e.g. BF16-rounded) inv_freq; required */
    CVLM_ROPE_FREQ_EXACT = 2, /* theta^(-2j/head_dim) in float32 */
};

struct cvlm_model_opts {
    int max_tokens; /* tokens per forward call (prefill chunk + decodes); 0 = 512 */
    int kv_blocks;  /* KV cache blocks; 0 = enough for max_tokens * 4 slots */
    int block_size; /* slots per block; 0 = 16 */
    enum cvlm_rope_freq rope_freq;
};

struct cvlm_model;

/* One forward step over a flat set of tokens from any number of sequences. */
struct cvlm_batch {
    int n_tokens;
    const int32_t *ids;      /* [n] token ids (ignored where img_row >= 0) */
    const int32_t *pos;      /* [n] RoPE positions */
    const uint8_t *expert;   /* [n] CVLM_EXPERT_LANG / CVLM_EXPERT_VISION */
    const int32_t *seq;      /* [n] index into seqs */
    const int32_t *slot;     /* [n] KV slot of the token inside its sequence */
    const int32_t *img_row;  /* [n] row of its sequence's image features replacing the
                                embedding, or -1; may be NULL (no image slots) */
    const void *const *img_feats; /* [n_seqs] backend buffers [image rows, hidden], or NULL */
    const struct cvlm_seq_kv *seqs;
    int n_seqs;
    const uint8_t *want_logits; /* [n] 1 where logits are wanted; NULL = last token only */
    /* debug: called with the residual stream entering each layer (and after the final
     * norm, layer == num_layers), rows in batch order, on the host */
    void (*on_hidden)(void *ctx, int layer, const float *rows, int n, int width);
    void *dbg_ctx;
};

int cvlm_model_create(struct cvlm_weights *w, struct cvlm_backend *be,
                      const struct cvlm_model_opts *opts, struct cvlm_model **out);
void cvlm_model_destroy(struct cvlm_model *m);

int cvlm_model_block_size(const struct cvlm_model *m);
int cvlm_model_kv_blocks(const struct cvlm_model *m);
int cvlm_model_max_tokens(const struct cvlm_model *m);
struct cvlm_backend *cvlm_model_backend(const struct cvlm_model *m);
const struct cvlm_config *cvlm_model_config(const struct cvlm_model *m);

/* Runs the vision tower and adapter on one normalized image (host float CHW, the
 * config's image_size square) and writes the image_tokens x hidden features (boi,
 * patches, eoi) into `feats`, a backend buffer. If vit_out (host) is given it receives
 * the tower's output including CLS, [num_positions, vision hidden]. */
int cvlm_model_encode_image(struct cvlm_model *m, const float *pixels, void *feats,
                            float *vit_out);

/* Runs one step; writes logits [k, vocab] to host `logits` for the k tokens wanted, in
 * batch order. */
int cvlm_model_forward(struct cvlm_model *m, const struct cvlm_batch *b, float *logits);

#endif
