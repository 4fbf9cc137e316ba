/* weights.c - config.json parsing and binding checkpoint tensors to the weight table.
 *
 * The weight table is described once, by cvlm_weights_visit(): every tensor name of the
 * HF CogVLM checkpoint (see cogvlm-model.md §2) with the shape the config implies. The
 * binder walks it, looks each name up in the checkpoint, checks the shape and records a
 * view; afterwards every checkpoint tensor must have been claimed.
 */
#include "engine/model/weights.h"

#include "engine/error.h"
#include "engine/model/gptq.h"
#include "engine/util/fileio.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- config.json ------------------------------------------------------------------- */

/* Reads an integer field; `def` < 0 means required. Bounds keep every derived size far
 * from overflow (a 17B model is well inside them). */
static int get_int(json_t *o, const char *key, int def, int lo, int hi, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (def < 0)
            return cvlm_errf(CVLM_EFORMAT, "config.json: missing %s", key);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return cvlm_errf(CVLM_EFORMAT, "config.json: %s must be an integer in [%d, %d]", key, lo,
                         hi);
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_float(json_t *o, const char *key, double def, double lo, double hi, float *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (def < 0)
            return cvlm_errf(CVLM_EFORMAT, "config.json: missing %s", key);
        *out = (float)def;
        return 0;
    }
    if (!json_is_number(v) || json_number_value(v) < lo || json_number_value(v) > hi)
        return cvlm_errf(CVLM_EFORMAT, "config.json: %s must be a number in [%g, %g]", key, lo, hi);
    *out = (float)json_number_value(v);
    return 0;
}

static int parse_vision(json_t *v, struct cvlm_vision_config *vc)
{
    int rc;
    if (!json_is_object(v))
        return cvlm_errf(CVLM_EFORMAT, "config.json: vision_config must be an object");
    if ((rc = get_int(v, "image_size", -1, 1, 8192, &vc->image_size)) ||
        (rc = get_int(v, "patch_size", -1, 1, 1024, &vc->patch_size)) ||
        (rc = get_int(v, "in_channels", 3, 3, 3, &vc->in_channels)) ||
        (rc = get_int(v, "hidden_size", -1, 1, 65536, &vc->hidden_size)) ||
        (rc = get_int(v, "num_heads", -1, 1, 1024, &vc->num_heads)) ||
        (rc = get_int(v, "num_hidden_layers", -1, 1, 1024, &vc->num_layers)) ||
        (rc = get_int(v, "intermediate_size", -1, 1, 1 << 20, &vc->intermediate_size)) ||
        (rc = get_int(v, "num_positions", -1, 1, 1 << 20, &vc->num_positions)) ||
        (rc = get_float(v, "layer_norm_eps", 1e-6, 0, 1, &vc->layer_norm_eps)))
        return rc;
    if (vc->image_size % vc->patch_size)
        return cvlm_errf(CVLM_EFORMAT, "config.json: image_size %d not a multiple of patch_size %d",
                         vc->image_size, vc->patch_size);
    int g = vc->image_size / vc->patch_size;
    if (vc->num_positions != g * g + 1)
        return cvlm_errf(CVLM_EFORMAT, "config.json: num_positions %d, expected %d patches + 1",
                         vc->num_positions, g * g);
    if (vc->hidden_size % vc->num_heads)
        return cvlm_errf(CVLM_EFORMAT,
                         "config.json: vision hidden_size %d not divisible by %d heads",
                         vc->hidden_size, vc->num_heads);
    return 0;
}

static int parse_template(json_t *root, enum cvlm_template *t)
{
    json_t *v = json_object_get(root, "template_version");
    const char *s = json_is_string(v) ? json_string_value(v) : NULL;
    if (!v || json_is_null(v))
        s = "chat"; /* the HF configuration class default */
    if (!s)
        return cvlm_errf(CVLM_EFORMAT, "config.json: template_version must be a string");
    if (!strcmp(s, "base"))
        *t = CVLM_TEMPLATE_BASE;
    else if (!strcmp(s, "chat") || !strcmp(s, "chat_old"))
        *t = CVLM_TEMPLATE_CHAT;
    else if (!strcmp(s, "vqa"))
        *t = CVLM_TEMPLATE_VQA;
    else
        return cvlm_errf(CVLM_EUNSUPPORTED, "config.json: template_version '%s' (base/chat/vqa)",
                         s);
    return 0;
}

/* eos_token_id: one id or a list of them (CogVLM2: [128001, 128009]). */
static int parse_eos(json_t *r, struct cvlm_config *c)
{
    json_t *v = json_object_get(r, "eos_token_id"), *e;
    size_t i;
    if (!json_is_array(v)) {
        int rc = get_int(r, "eos_token_id", 2, 0, 1 << 22, &c->eos_token_id);
        c->eos_ids[0] = c->eos_token_id;
        c->n_eos = 1;
        return rc;
    }
    if (json_array_size(v) < 1 || json_array_size(v) > CVLM_MAX_EOS)
        return cvlm_errf(CVLM_EFORMAT, "config.json: eos_token_id: 1..%d ids", CVLM_MAX_EOS);
    json_array_foreach (v, i, e) {
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= 1 << 22)
            return cvlm_errf(CVLM_EFORMAT, "config.json: eos_token_id: a list of token ids");
        c->eos_ids[c->n_eos++] = (int)json_integer_value(e);
    }
    c->eos_token_id = c->eos_ids[0];
    return 0;
}

/* CogVLM2 (cogvlm-model.md §9): GQA with num_multi_query_heads KV heads, RoPE base 500000
 * unless the config names one. */
static int parse_variant(json_t *r, struct cvlm_config *c)
{
    int rc;
    if (!json_object_get(r, "num_multi_query_heads"))
        return 0;
    c->variant = CVLM_VARIANT_COGVLM2;
    if ((rc = get_int(r, "num_multi_query_heads", -1, 1, 1024, &c->num_kv_heads)))
        return rc;
    if (c->num_heads % c->num_kv_heads)
        return cvlm_errf(CVLM_EFORMAT,
                         "config.json: %d attention heads not a multiple of %d KV heads",
                         c->num_heads, c->num_kv_heads);
    return 0;
}

static int parse_root(json_t *r, struct cvlm_config *c)
{
    json_t *vis = json_object_get(r, "vision_config");
    int rc;
    memset(c, 0, sizeof(*c));
    if ((rc = get_int(r, "vocab_size", -1, 3, 1 << 22, &c->vocab_size)) ||
        (rc = get_int(r, "hidden_size", -1, 1, 65536, &c->hidden_size)) ||
        (rc = get_int(r, "intermediate_size", -1, 1, 1 << 20, &c->intermediate_size)) ||
        (rc = get_int(r, "num_hidden_layers", -1, 1, 1024, &c->num_layers)) ||
        (rc = get_int(r, "num_attention_heads", -1, 1, 1024, &c->num_heads)) ||
        (rc = parse_variant(r, c)) ||
        (rc = get_int(r, "max_position_embeddings", 2048, 1, 1 << 24,
                      &c->max_position_embeddings)) ||
        (rc = get_int(r, "bos_token_id", 1, 0, 1 << 22, &c->bos_token_id)) ||
        (rc = parse_eos(r, c)) ||
        (rc = get_int(r, "pad_token_id", 0, 0, 1 << 22, &c->pad_token_id)) ||
        (rc = get_float(r, "rms_norm_eps", 1e-6, 0, 1, &c->rms_norm_eps)) ||
        (rc = get_float(r, "rope_theta", c->variant == CVLM_VARIANT_COGVLM2 ? 500000.0 : 10000.0, 1,
                        1e9, &c->rope_theta)) ||
        (rc = parse_template(r, &c->template_version)) ||
        (rc = cvlm_gptq_parse_config(r, &c->gptq)))
        return rc;
    if (c->hidden_size % c->num_heads || (c->hidden_size / c->num_heads) % 2)
        return cvlm_errf(CVLM_EFORMAT,
                         "config.json: hidden_size %d / %d heads must be an even "
                         "head size",
                         c->hidden_size, c->num_heads);
    int bad_eos = 0;
    for (int i = 0; i < c->n_eos; i++)
        bad_eos |= c->eos_ids[i] >= c->vocab_size;
    if (c->bos_token_id >= c->vocab_size || bad_eos || c->pad_token_id >= c->vocab_size)
        return cvlm_errf(CVLM_EFORMAT, "config.json: special token id beyond vocab_size %d",
                         c->vocab_size);
    if (vis && !json_is_null(vis)) {
        c->has_vision = 1;
        if ((rc = parse_vision(vis, &c->vision)))
            return rc;
        if (cvlm_config_has_conv(c) && (c->vision.image_size / c->vision.patch_size) % 2)
            return cvlm_errf(CVLM_EFORMAT,
                             "config.json: CogVLM2's 2x2 conv needs an even patch grid, not %d",
                             c->vision.image_size / c->vision.patch_size);
    }
    return 0;
}

int cvlm_config_parse(const char *json, size_t len, struct cvlm_config *cfg)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    int rc;
    if (!root)
        return cvlm_errf(CVLM_EFORMAT, "config.json: %s (line %d)", jerr.text, jerr.line);
    if (!json_is_object(root))
        rc = cvlm_errf(CVLM_EFORMAT, "config.json: not a JSON object");
    else
        rc = parse_root(root, cfg);
    json_decref(root);
    return rc;
}

int cvlm_config_load(const char *path, struct cvlm_config *cfg)
{
    unsigned char *buf;
    size_t n;
    int rc = cvlm_read_file(path, 1 << 20, &buf, &n);
    if (rc == CVLM_ENOENT)
        return cvlm_errf(CVLM_ENOENT, "%s: cannot open", path);
    if (rc)
        return rc;
    rc = cvlm_config_parse((const char *)buf, n, cfg);
    free(buf);
    return rc;
}

/* ---- the weight table ------------------------------------------------------------------ */

struct visit {
    cvlm_weight_visit_fn fn;
    void *ctx;
    char name[160];
};

static int vis(struct visit *v, struct cvlm_tensor *slot, int optional, int ndim, int64_t d0,
               int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));

static int vis(struct visit *v, struct cvlm_tensor *slot, int optional, int ndim, int64_t d0,
               int64_t d1, int64_t d2, int64_t d3, const char *fmt, ...)
{
    int64_t shape[CVLM_MAX_DIMS] = {d0, d1, d2, d3};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v->name, sizeof(v->name), fmt, ap);
    va_end(ap);
    return v->fn(v->ctx, v->name, slot, ndim, shape, optional);
}

#define V1(slot, a, ...) vis(v, slot, 0, 1, a, 0, 0, 0, __VA_ARGS__)
#define V2(slot, a, b, ...) vis(v, slot, 0, 2, a, b, 0, 0, __VA_ARGS__)

static int visit_lm_layer(struct visit *v, const struct cvlm_config *c, struct cvlm_lm_layer *l,
                          int i)
{
    static const char *const ex[2] = {"language", "vision"};
    static const char *const mlp[2] = {"language_mlp", "vision_mlp"};
    const int64_t D = c->hidden_size, I = c->intermediate_size, Q = cvlm_config_qkv_rows(c);
    const char *p = "model.layers";
    int rc;
    if ((rc = V1(&l->input_norm, D, "%s.%d.input_layernorm.weight", p, i)) ||
        (rc = V1(&l->post_norm, D, "%s.%d.post_attention_layernorm.weight", p, i)) ||
        (rc = vis(v, &l->inv_freq, 1, 1, cvlm_config_head_dim(c) / 2, 0, 0, 0,
                  "%s.%d.self_attn.rotary_emb.inv_freq", p, i)))
        return rc;
    for (int e = 0; e < (c->has_vision ? 2 : 1); e++) {
        if ((rc = V2(&l->qkv[e], Q, D, "%s.%d.self_attn.%s_expert_query_key_value.weight", p, i,
                     ex[e])) ||
            (rc = V2(&l->dense[e], D, D, "%s.%d.self_attn.%s_expert_dense.weight", p, i, ex[e])) ||
            (rc = V2(&l->gate[e], I, D, "%s.%d.mlp.%s.gate_proj.weight", p, i, mlp[e])) ||
            (rc = V2(&l->up[e], I, D, "%s.%d.mlp.%s.up_proj.weight", p, i, mlp[e])) ||
            (rc = V2(&l->down[e], D, I, "%s.%d.mlp.%s.down_proj.weight", p, i, mlp[e])))
            return rc;
    }
    /* CogVLM2: the vision expert's QKV has a bias, the language expert's none (§9) */
    if (c->has_vision && c->variant == CVLM_VARIANT_COGVLM2)
        return V1(&l->qkv_b[CVLM_EXPERT_VISION], Q,
                  "%s.%d.self_attn.vision_expert_query_key_value.bias", p, i);
    return 0;
}

static int visit_vit_layer(struct visit *v, const struct cvlm_vision_config *vc,
                           struct cvlm_vit_layer *l, int j)
{
    const int64_t d = vc->hidden_size, F = vc->intermediate_size;
    const char *p = "model.vision.transformer.layers";
    int rc;
    (void)((rc = V2(&l->qkv_w, 3 * d, d, "%s.%d.attention.query_key_value.weight", p, j)) ||
           (rc = V1(&l->qkv_b, 3 * d, "%s.%d.attention.query_key_value.bias", p, j)) ||
           (rc = V2(&l->dense_w, d, d, "%s.%d.attention.dense.weight", p, j)) ||
           (rc = V1(&l->dense_b, d, "%s.%d.attention.dense.bias", p, j)) ||
           (rc = V1(&l->ln_in_w, d, "%s.%d.input_layernorm.weight", p, j)) ||
           (rc = V1(&l->ln_in_b, d, "%s.%d.input_layernorm.bias", p, j)) ||
           (rc = V2(&l->fc1_w, F, d, "%s.%d.mlp.fc1.weight", p, j)) ||
           (rc = V1(&l->fc1_b, F, "%s.%d.mlp.fc1.bias", p, j)) ||
           (rc = V2(&l->fc2_w, d, F, "%s.%d.mlp.fc2.weight", p, j)) ||
           (rc = V1(&l->fc2_b, d, "%s.%d.mlp.fc2.bias", p, j)) ||
           (rc = V1(&l->ln_post_w, d, "%s.%d.post_attention_layernorm.weight", p, j)) ||
           (rc = V1(&l->ln_post_b, d, "%s.%d.post_attention_layernorm.bias", p, j)));
    return rc;
}

static int visit_vision(struct visit *v, struct cvlm_weights *w)
{
    const struct cvlm_config *c = &w->cfg;
    const struct cvlm_vision_config *vc = &c->vision;
    const int64_t D = c->hidden_size, I = c->intermediate_size, d = vc->hidden_size;
    const char *pe = "model.vision.patch_embedding", *lp = "model.vision.linear_proj";
    int rc;
    if ((rc = vis(v, &w->patch_w, 0, 4, d, vc->in_channels, vc->patch_size, vc->patch_size,
                  "%s.proj.weight", pe)) ||
        (rc = V1(&w->patch_b, d, "%s.proj.bias", pe)) ||
        (rc = V2(&w->cls, 1, d, "%s.cls_embedding", pe)) ||
        (rc = V2(&w->pos, vc->num_positions, d, "%s.position_embedding.weight", pe)))
        return rc;
    if (cvlm_config_has_conv(c) &&
        ((rc = vis(v, &w->conv_w, 0, 4, d, d, 2, 2, "model.vision.conv.weight")) ||
         (rc = V1(&w->conv_b, d, "model.vision.conv.bias"))))
        return rc;
    for (int j = 0; j < vc->num_layers; j++)
        if ((rc = visit_vit_layer(v, vc, &w->vit[j], j)))
            return rc;
    (void)((rc = V2(&w->proj, D, d, "%s.linear_proj.weight", lp)) ||
           (rc = V1(&w->proj_norm_w, D, "%s.norm1.weight", lp)) ||
           (rc = V1(&w->proj_norm_b, D, "%s.norm1.bias", lp)) ||
           (rc = V2(&w->glu_gate, I, D, "%s.gate_proj.weight", lp)) ||
           (rc = V2(&w->glu_up, I, D, "%s.dense_h_to_4h.weight", lp)) ||
           (rc = V2(&w->glu_down, D, I, "%s.dense_4h_to_h.weight", lp)) ||
           (rc = vis(v, &w->boi, 0, 3, 1, 1, D, 0, "model.vision.boi")) ||
           (rc = vis(v, &w->eoi, 0, 3, 1, 1, D, 0, "model.vision.eoi")));
    return rc;
}

int cvlm_weights_visit(struct cvlm_weights *w, cvlm_weight_visit_fn fn, void *ctx)
{
    const struct cvlm_config *c = &w->cfg;
    struct visit vs = {.fn = fn, .ctx = ctx}, *v = &vs;
    int rc;
    if ((rc = V2(&w->embed, c->vocab_size, c->hidden_size, "model.embed_tokens.weight")) ||
        (rc = V1(&w->final_norm, c->hidden_size, "model.norm.weight")) ||
        (rc = V2(&w->lm_head, c->vocab_size, c->hidden_size, "lm_head.weight")))
        return rc;
    for (int i = 0; i < c->num_layers; i++)
        if ((rc = visit_lm_layer(v, c, &w->layers[i], i)))
            return rc;
    return c->has_vision ? visit_vision(v, w) : 0;
}

/* ---- binding ------------------------------------------------------------------------ */

struct bind_ctx {
    const struct cvlm_safetensors *st;
    struct cvlm_weights *w;
    unsigned char *claimed; /* [st->n_tensors] */
};

/* 1 if slot is a matrix the GEMM takes quantized (what --quantize quantizes): both experts'
 * QKV, dense, gate, up, down; the ViT's QKV, dense, fc1, fc2; the adapter's four. */
static int is_linear(const struct cvlm_weights *w, const struct cvlm_tensor *t)
{
    for (int i = 0; i < w->cfg.num_layers; i++)
        for (int e = 0; e < 2; e++) {
            const struct cvlm_lm_layer *L = &w->layers[i];
            if (t == &L->qkv[e] || t == &L->dense[e] || t == &L->gate[e] || t == &L->up[e] ||
                t == &L->down[e])
                return 1;
        }
    for (int j = 0; w->cfg.has_vision && j < w->cfg.vision.num_layers; j++) {
        const struct cvlm_vit_layer *V = &w->vit[j];
        if (t == &V->qkv_w || t == &V->dense_w || t == &V->fc1_w || t == &V->fc2_w)
            return 1;
    }
    return w->cfg.has_vision &&
           (t == &w->proj || t == &w->glu_gate || t == &w->glu_up || t == &w->glu_down);
}

/* `name` (X.weight) absent: its GPTQ parts X.qweight etc. if the checkpoint has them, the
 * config says GPTQ and the slot may be quantized; 1 if there are none (not GPTQ). */
static int bind_gptq(struct bind_ctx *b, const char *name, struct cvlm_tensor *slot, int ndim,
                     const int64_t *shape)
{
    char base[200], qn[220];
    size_t n = strlen(name);
    if (n < 7 || n >= sizeof(base) || strcmp(name + n - 7, ".weight"))
        return 1;
    memcpy(base, name, n - 7);
    base[n - 7] = 0;
    snprintf(qn, sizeof(qn), "%s.qweight", base);
    if (!cvlm_st_find(b->st, qn))
        return 1;
    if (!b->w->cfg.gptq.enabled)
        return cvlm_errf(CVLM_EFORMAT,
                         "tensor %s: GPTQ-quantized, but config.json has no quantization_config "
                         "with quant_method gptq",
                         qn);
    if (ndim != 2 || !is_linear(b->w, slot))
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "tensor %s: GPTQ-quantized, but this model takes %s only unquantized "
                         "(F32/F16/BF16); quantized are the decoder's and the vision tower's "
                         "linear layers",
                         qn, name);
    return cvlm_gptq_bind(b->w, b->st, base, shape[0], shape[1], slot, b->claimed);
}

/* An unclaimed tensor that may stay: X.bias of a GPTQ layer X that has no bias in the model,
 * when it is all zeros (some exporters write one for every quantized layer). */
static int zero_gptq_bias(const struct cvlm_safetensors *st, const struct cvlm_st_tensor *t)
{
    char qn[220];
    size_t n = strlen(t->name);
    if (n < 5 || n >= 200 || strcmp(t->name + n - 5, ".bias"))
        return 0;
    snprintf(qn, sizeof(qn), "%.*s.qweight", (int)(n - 5), t->name);
    if (!cvlm_st_find(st, qn) || t->t.dtype == CVLM_DTYPE_I32 || cvlm_dtype_is_quant(t->t.dtype))
        return 0;
    for (int64_t i = 0; i < cvlm_tensor_numel(&t->t); i++)
        if (cvlm_tensor_get_f32(&t->t, i) != 0)
            return 0;
    return 1;
}

static void fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape)
{
    size_t off = 0;
    off += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && off < cap; i++)
        off += (size_t)snprintf(buf + off, cap - off, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (off < cap)
        snprintf(buf + off, cap - off, "]");
}

static int bind_one(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                    const int64_t *shape, int optional)
{
    struct bind_ctx *b = ctx;
    const struct cvlm_st_tensor *t = cvlm_st_find(b->st, name);
    char want[96], got[96];

    memset(slot, 0, sizeof(*slot));
    if (!t) {
        int rc = bind_gptq(b, name, slot, ndim, shape);
        if (rc <= 0)
            return rc;
        if (optional)
            return 0;
        return cvlm_errf(CVLM_ENOENT, "checkpoint lacks tensor %s", name);
    }
    b->claimed[t - b->st->tensors] = 1;
    if (t->t.dtype == CVLM_DTYPE_I32)
        return cvlm_errf(CVLM_EFORMAT, "tensor %s: I32 (a float dtype expected)", name);
    if (t->t.ndim != ndim || memcmp(t->t.shape, shape, (size_t)ndim * sizeof(int64_t))) {
        fmt_shape(want, sizeof(want), ndim, shape);
        fmt_shape(got, sizeof(got), t->t.ndim, t->t.shape);
        return cvlm_errf(CVLM_ESHAPE, "tensor %s has shape %s, the config needs %s", name, got,
                         want);
    }
    *slot = t->t;
    return 0;
}

int cvlm_weights_bind(struct cvlm_safetensors *st, const struct cvlm_config *cfg,
                      struct cvlm_weights **out)
{
    struct cvlm_weights *w = calloc(1, sizeof(*w));
    struct bind_ctx b = {.st = st, .w = w};
    int rc = 0;

    *out = NULL;
    if (!w) {
        cvlm_st_close(st);
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    }
    w->cfg = *cfg;
    w->st = st;
    w->layers = calloc((size_t)cfg->num_layers, sizeof(*w->layers));
    w->vit = calloc(cfg->has_vision ? (size_t)cfg->vision.num_layers : 1, sizeof(*w->vit));
    b.claimed = calloc(st->n_tensors + 1, 1);
    if (!w->layers || !w->vit || !b.claimed) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = cvlm_weights_visit(w, bind_one, &b)))
        goto out;
    for (size_t i = 0; i < st->n_tensors; i++)
        if (!b.claimed[i] && !zero_gptq_bias(st, &st->tensors[i])) {
            rc = cvlm_errf(CVLM_EFORMAT, "unexpected tensor %s (not part of this config's model%s)",
                           st->tensors[i].name,
                           cvlm_gptq_is_part(st->tensors[i].name)
                               ? "; a GPTQ part of a layer the model has no matrix for"
                               : "");
            goto out;
        }
out:
    free(b.claimed);
    if (rc) {
        cvlm_weights_destroy(w);
        return rc;
    }
    *out = w;
    return 0;
}

int cvlm_weights_load(const char *dir, struct cvlm_weights **out)
{
    struct cvlm_config cfg;
    struct cvlm_safetensors *st;
    char path[4096];
    int rc;

    *out = NULL;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    if ((rc = cvlm_config_load(path, &cfg)))
        return rc;
    if ((rc = cvlm_st_open(dir, &st)))
        return rc;
    return cvlm_weights_bind(st, &cfg, out);
}

#define HUGE_PAGE ((size_t)2 << 20)

void *cvlm_weights_own(struct cvlm_weights *w, size_t bytes)
{
    void **o = realloc(w->owned, (w->n_owned + 1) * sizeof(void *)), *p;
    if (!o)
        return NULL;
    w->owned = o;
    bytes = (bytes + 63) / 64 * 64 + 64;
    if (bytes < 2 * HUGE_PAGE) {
        p = aligned_alloc(64, bytes);
    } else {
        bytes = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
        p = aligned_alloc(HUGE_PAGE, bytes);
#if defined(MADV_HUGEPAGE)
        if (p)
            madvise(p, bytes, MADV_HUGEPAGE); /* a hint: failure changes nothing */
#endif
    }
    if (p)
        w->owned[w->n_owned++] = p;
    return p;
}

/* Whether p lies in one of the checkpoint's file mappings. */
static int in_mapping(const struct cvlm_weights *w, const void *p)
{
    for (int i = 0; w->st && i < w->st->n_files; i++) {
        const char *m = w->st->files[i].map;
        if (m && (const char *)p >= m && (const char *)p < m + w->st->files[i].size)
            return 1;
    }
    return 0;
}

void cvlm_weights_release(const struct cvlm_weights *w, const void *p, size_t bytes)
{
    long pg = sysconf(_SC_PAGESIZE);
    if (pg <= 0 || !in_mapping(w, p))
        return;
    uintptr_t a = ((uintptr_t)p + (uintptr_t)pg - 1) / (uintptr_t)pg * (uintptr_t)pg;
    uintptr_t e = ((uintptr_t)p + bytes) / (uintptr_t)pg * (uintptr_t)pg;
    if (e > a)
        madvise((void *)a, e - a, MADV_DONTNEED);
}

struct to_memory {
    struct cvlm_weights *w;
    int rc;
};

static int to_memory_one(void *ctx, const char *name, struct cvlm_tensor *t, int ndim,
                         const int64_t *shape, int optional)
{
    struct to_memory *c = ctx;
    (void)ndim, (void)shape, (void)optional;
    if (c->rc || !t->data || t->ndim != 2 || cvlm_dtype_is_quant(t->dtype) ||
        !in_mapping(c->w, t->data) || cvlm_tensor_bytes(t) < 2 * HUGE_PAGE)
        return 0;
    size_t bytes = cvlm_tensor_bytes(t);
    void *p = cvlm_weights_own(c->w, bytes);
    if (!p)
        return c->rc = cvlm_errf(CVLM_ENOMEM, "out of memory copying %s (%zu bytes)", name, bytes);
    memcpy(p, t->data, bytes);
    cvlm_weights_release(c->w, t->data, bytes);
    t->data = p;
    return 0;
}

int cvlm_weights_to_memory(struct cvlm_weights *w)
{
    struct to_memory c = {.w = w};
    cvlm_weights_visit(w, to_memory_one, &c);
    return c.rc;
}

void cvlm_weights_destroy(struct cvlm_weights *w)
{
    if (!w)
        return;
    cvlm_st_close(w->st);
    for (size_t i = 0; i < w->n_owned; i++)
        free(w->owned[i]);
    free(w->owned);
    free(w->layers);
    free(w->vit);
    free(w);
}
