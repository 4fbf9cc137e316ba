/* weights.h - model configuration (config.json) and the CogVLM weight table.
 *
 * cvlm_config_* reads an HF config.json of a CogVLM checkpoint and validates it.
 * cvlm_weights_load() opens the checkpoint's safetensors (single or sharded), and binds
 * every tensor the model needs, by its exact HF name, to a slot of struct cvlm_weights
 * after checking its shape. A tensor the model does not know, or a missing one, is an
 * error: a checkpoint either fits the config exactly or is refused.
 *
 * Ownership: struct cvlm_weights owns the safetensors mapping; every struct cvlm_tensor
 * in it is a view into that mapping, in the dtype stored on disk (BF16 stays BF16).
 */
#ifndef CVLM_WEIGHTS_H
#define CVLM_WEIGHTS_H

#include "engine/backend.h"
#include "engine/model/safetensors.h"

enum cvlm_template { CVLM_TEMPLATE_BASE = 0, CVLM_TEMPLATE_CHAT = 1, CVLM_TEMPLATE_VQA = 2 };

/* The checkpoint family (cogvlm-model.md §9). CogVLM2 (cogvlm2-llama3-*), recognised by
 * `num_multi_query_heads` in config.json: GQA, a bias on the vision expert's QKV, RoPE
 * base 500000, several EOS ids, and a 2x2 stride-2 conv between the ViT and the adapter
 * (image slots = (grid/2)^2 + 2). */
enum cvlm_variant { CVLM_VARIANT_COGVLM = 0, CVLM_VARIANT_COGVLM2 = 1 };

#define CVLM_MAX_EOS 8

struct cvlm_vision_config {
    int image_size, patch_size, in_channels;
    int hidden_size, num_heads, num_layers, intermediate_size, num_positions;
    float layer_norm_eps;
};

/* config.json's quantization_config of a GPTQ checkpoint (engine/model/gptq.c). */
struct cvlm_gptq_config {
    int enabled;    /* quant_method "gptq" */
    int bits;       /* 4 */
    int group_size; /* 128, or -1: one group per row */
    int desc_act;   /* informational: the loader follows each tensor's g_idx */
    int sym;        /* informational: the loader follows each tensor's zeros */
    int v2;         /* checkpoint_format "gptq_v2": zeros stored as is (v1: zero - 1) */
};

struct cvlm_config {
    enum cvlm_variant variant;
    int vocab_size, hidden_size, intermediate_size, num_layers, num_heads;
    int num_kv_heads; /* GQA: KV heads; 0 means num_heads (use cvlm_config_kv_heads) */
    int max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;
    int bos_token_id, eos_token_id, pad_token_id; /* eos_token_id: the first of eos_ids */
    int eos_ids[CVLM_MAX_EOS], n_eos;             /* every id that ends generation (>= 1) */
    enum cvlm_template template_version;
    int has_vision; /* 0 for a text-only (plain LLaMA-shaped) checkpoint */
    struct cvlm_vision_config vision;
    struct cvlm_gptq_config gptq; /* enabled 0: no quantization_config */
};

/* Parses and validates config.json text / file. Unknown fields are ignored (HF configs
 * carry many); missing required fields and out-of-range values are errors. */
int cvlm_config_parse(const char *json, size_t len, struct cvlm_config *cfg);
int cvlm_config_load(const char *path, struct cvlm_config *cfg);

/* Derived sizes. */
static inline int cvlm_config_head_dim(const struct cvlm_config *c)
{
    return c->hidden_size / c->num_heads;
}
static inline int cvlm_config_kv_heads(const struct cvlm_config *c)
{
    return c->num_kv_heads > 0 ? c->num_kv_heads : c->num_heads;
}
/* Rows of the fused QKV of an expert: [Q heads | K kv heads | V kv heads]. */
static inline int cvlm_config_qkv_rows(const struct cvlm_config *c)
{
    return c->hidden_size + 2 * cvlm_config_kv_heads(c) * cvlm_config_head_dim(c);
}
/* ViT patches (its rows minus CLS). */
static inline int cvlm_config_num_patches(const struct cvlm_config *c)
{
    int g = c->vision.image_size / c->vision.patch_size;
    return g * g;
}
/* The 2x2 stride-2 conv after the ViT (CogVLM2). */
static inline int cvlm_config_has_conv(const struct cvlm_config *c)
{
    return c->has_vision && c->variant == CVLM_VARIANT_COGVLM2;
}
/* Rows the adapter sees: the patches, or the conv's (grid/2)^2 outputs. */
static inline int cvlm_config_vision_tokens(const struct cvlm_config *c)
{
    return cvlm_config_has_conv(c) ? cvlm_config_num_patches(c) / 4 : cvlm_config_num_patches(c);
}
/* LM slots one image takes: boi + vision tokens + eoi (1227 for the 490 models, 2306 for
 * CogVLM2's 1344). */
static inline int cvlm_config_image_tokens(const struct cvlm_config *c)
{
    return c->has_vision ? cvlm_config_vision_tokens(c) + 2 : 0;
}
/* 1 if id ends generation (any of the EOS ids). */
static inline int cvlm_config_is_eos(const struct cvlm_config *c, int id)
{
    if (c->n_eos <= 0)
        return id == c->eos_token_id;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id)
            return 1;
    return 0;
}
static inline const char *cvlm_variant_name(enum cvlm_variant v)
{
    return v == CVLM_VARIANT_COGVLM2 ? "cogvlm2" : "cogvlm";
}

/* Index into the per-expert arrays of a decoder layer. */
enum { CVLM_EXPERT_LANG = 0, CVLM_EXPERT_VISION = 1 };

struct cvlm_lm_layer {
    struct cvlm_tensor input_norm, post_norm; /* [D] */
    struct cvlm_tensor qkv[2];                /* [D + 2*Hkv*hd, D] */
    struct cvlm_tensor qkv_b[2];              /* CogVLM2: vision [D + 2*Hkv*hd]; else absent */
    struct cvlm_tensor dense[2];              /* [D, D] */
    struct cvlm_tensor gate[2], up[2];        /* [I, D] */
    struct cvlm_tensor down[2];               /* [D, I] */
    struct cvlm_tensor inv_freq;              /* [head_dim/2], optional: data NULL if absent */
};

struct cvlm_vit_layer {
    struct cvlm_tensor qkv_w, qkv_b;         /* [3d, d], [3d] */
    struct cvlm_tensor dense_w, dense_b;     /* [d, d], [d] */
    struct cvlm_tensor ln_in_w, ln_in_b;     /* [d] */
    struct cvlm_tensor fc1_w, fc1_b;         /* [F, d], [F] */
    struct cvlm_tensor fc2_w, fc2_b;         /* [d, F], [d] */
    struct cvlm_tensor ln_post_w, ln_post_b; /* [d] */
};

struct cvlm_weights {
    struct cvlm_config cfg;
    struct cvlm_safetensors *st;
    struct cvlm_tensor embed;      /* [V, D] */
    struct cvlm_tensor final_norm; /* [D] */
    struct cvlm_tensor lm_head;    /* [V, D] */
    struct cvlm_lm_layer *layers;  /* [num_layers] */
    /* vision tower + adapter (has_vision only) */
    struct cvlm_tensor patch_w;                  /* [d, C, P, P] */
    struct cvlm_tensor patch_b;                  /* [d] */
    struct cvlm_tensor cls;                      /* [1, d] */
    struct cvlm_tensor pos;                      /* [num_positions, d] */
    struct cvlm_tensor conv_w, conv_b;           /* CogVLM2: [d, d, 2, 2], [d] */
    struct cvlm_vit_layer *vit;                  /* [vision.num_layers] */
    struct cvlm_tensor proj;                     /* [D, d] */
    struct cvlm_tensor proj_norm_w, proj_norm_b; /* [D] */
    struct cvlm_tensor glu_gate, glu_up;         /* [I, D] */
    struct cvlm_tensor glu_down;                 /* [D, I] */
    struct cvlm_tensor boi, eoi;                 /* [1, 1, D] */
    /* buffers the weights own besides the mapping (cvlm_weights_dummy); freed by destroy */
    void **owned;
    size_t n_owned;
};

/* `dir` holds config.json and the safetensors file(s). */
int cvlm_weights_load(const char *dir, struct cvlm_weights **out);
/* Binds an already opened checkpoint against a given config (takes ownership of st,
 * also on failure). */
int cvlm_weights_bind(struct cvlm_safetensors *st, const struct cvlm_config *cfg,
                      struct cvlm_weights **out);
void cvlm_weights_destroy(struct cvlm_weights *w);
/* A buffer of `bytes` that w owns (freed by cvlm_weights_destroy), 64-byte aligned with 64
 * bytes to spare past the end; from 4 MiB on 2 MiB aligned and asked to be backed by
 * transparent huge pages (decode streams every weight per token: with 4 KiB pages it
 * takes a TLB miss every 4 KiB and the hardware prefetchers stop at each page). NULL when
 * out of memory. */
void *cvlm_weights_own(struct cvlm_weights *w, size_t bytes);
/* Lets the kernel drop the checkpoint pages of [p, p + bytes) once nothing reads them any
 * more (a private read-only file mapping: they would be read again on access); nothing
 * for memory that is not the checkpoint's. */
void cvlm_weights_release(const struct cvlm_weights *w, const void *p, size_t bytes);
/* The CPU backend's load step: every 16/32-bit matrix of 4 MiB or more that still lies in
 * the checkpoint mapping is copied into memory of its own (cvlm_weights_own: huge pages)
 * and its file pages released, one tensor at a time (peak: the model plus one tensor).
 * The mapping's page-cache pages are 4 KiB: decode streams every matrix per token, and in
 * 4 KiB pages the 1.1B BF16 model decoded 3-15 % slower (docs/PERFORMANCE.md). 0 or
 * CVLM_ENOMEM. */
int cvlm_weights_to_memory(struct cvlm_weights *w);

/* Random weights for every tensor of cfg (engine/model/weights_dummy.c), in `dtype`, scaled
 * like a fresh init so activations stay finite: matrices and embeddings uniform with
 * standard deviation 0.02, norm weights 1, biases 0; optional tensors absent. The same
 * seed gives the same weights. For benchmarks and tests. */
int cvlm_weights_dummy(const struct cvlm_config *cfg, enum cvlm_dtype dtype, uint64_t seed,
                       struct cvlm_weights **out);
/* The same table with no data: every tensor carries its shape and a fill (RANDOM, ONES
 * for norm weights, ZEROS for biases) that the backend's upload_weights generates in its
 * own memory (a 17B configuration on a GPU without 35 GB of host work). */
int cvlm_weights_dummy_lazy(const struct cvlm_config *cfg, enum cvlm_dtype dtype,
                            struct cvlm_weights **out);
/* Writes `dir`/config.json and `dir`/model.safetensors (creating dir) so that
 * cvlm_weights_load(dir) reads the same weights back. */
int cvlm_weights_write(const struct cvlm_weights *w, const char *dir);

/* ---- tensor parallelism (engine/model/weights_shard.c) ---- */
#define CVLM_MAX_TP 8

/* 0 if tp ranks can split cfg (heads and MLP widths of the LM and the ViT divide by tp),
 * else CVLM_EINVAL with a message naming what does not divide. */
int cvlm_weights_check_tp(const struct cvlm_config *cfg, int tp);
/* Rank `rank`'s part of w for tp ranks (cogvlm-model.md §8; see weights_shard.c for the
 * split of every tensor). With tp == 1, a table of views of all of w. The shard borrows
 * w's memory: w must outlive it. */
int cvlm_weights_shard(const struct cvlm_weights *w, int rank, int tp, struct cvlm_weights **out);

/* Calls fn once per tensor the config requires, with its HF name and expected shape;
 * stops at the first non-zero return. Used by the binder, by tools that write
 * checkpoints, and by tests. */
typedef int (*cvlm_weight_visit_fn)(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                                    const int64_t *shape, int optional);
int cvlm_weights_visit(struct cvlm_weights *w, cvlm_weight_visit_fn fn, void *ctx);

#endif
