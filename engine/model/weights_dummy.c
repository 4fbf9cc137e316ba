/* weights_dummy.c - random weights for any config (benchmarks, tests) and a writer that
 * saves a weight table as config.json + model.safetensors.
 *
 * cvlm_weights_dummy() walks cvlm_weights_visit() twice: once to size one buffer for all
 * tensors (each 64-byte aligned), once to bind every slot into it and fill it. The buffer
 * is recorded in w->owned, so cvlm_weights_destroy() frees it. Values come from a
 * splitmix64 stream seeded per tensor (seed, tensor index), so a tensor's values do not
 * depend on the dtype's size or on the other tensors.
 */
#include "engine/error.h"
#include "engine/model/weights.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define INIT_STD 0.02f

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Round-to-nearest-even float -> IEEE half, with subnormals, inf and nan. */
static uint16_t f32_to_f16(float f)
{
    uint32_t u, sign, man;
    int32_t e;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    e = (int32_t)((u >> 23) & 0xffu);
    man = u & 0x7fffffu;
    if (e == 0xff)
        return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    e = e - 127 + 15;
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) { /* half subnormal (or zero) */
        if (e < -10)
            return (uint16_t)sign;
        man |= 0x800000u;
        int shift = 14 - e;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
        h++; /* a carry into the exponent is the correct rounding */
    return (uint16_t)h;
}

enum fill_kind { FILL_RANDOM, FILL_ONE, FILL_ZERO };

static enum fill_kind kind_of(const char *name)
{
    size_t n = strlen(name);
    int is_weight = n > 7 && !strcmp(name + n - 7, ".weight");
    if (n > 5 && !strcmp(name + n - 5, ".bias"))
        return FILL_ZERO;
    if (is_weight && strstr(name, "norm"))
        return FILL_ONE;
    return FILL_RANDOM;
}

static void fill(void *data, enum cvlm_dtype dt, size_t n, enum fill_kind kind, uint64_t seed)
{
    const float a = INIT_STD * 1.7320508f; /* uniform [-a, a) has std a / sqrt(3) */
    uint64_t s = seed, bits = 0;
    for (size_t i = 0; i < n; i++) {
        float v = kind == FILL_ONE ? 1.0f : 0.0f;
        if (kind == FILL_RANDOM) {
            if (!(i & 1))
                bits = splitmix64(&s); /* two 24-bit draws per 64-bit output */
            uint32_t r = (uint32_t)(i & 1 ? bits >> 40 : (bits >> 8) & 0xffffffu);
            v = ((float)r * (1.0f / 8388608.0f) - 1.0f) * a;
        }
        if (dt == CVLM_DTYPE_F32)
            ((float *)data)[i] = v;
        else if (dt == CVLM_DTYPE_BF16)
            ((uint16_t *)data)[i] = cvlm_f32_to_bf16(v);
        else
            ((uint16_t *)data)[i] = f32_to_f16(v);
    }
}

struct dummy_ctx {
    enum cvlm_dtype dt;
    uint64_t seed;
    size_t bytes, index;
    unsigned char *buf; /* NULL during the sizing pass */
    int lazy;           /* shapes and fills only: the backend generates the values */
};

static int dummy_one(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                     const int64_t *shape, int optional)
{
    struct dummy_ctx *d = ctx;
    size_t n = 1;
    memset(slot, 0, sizeof(*slot));
    if (optional)
        return 0; /* e.g. rotary inv_freq: the model computes it */
    for (int i = 0; i < ndim; i++)
        n *= (size_t)shape[i];
    size_t at = d->bytes, nbytes = n * cvlm_dtype_size(d->dt);
    d->bytes += (nbytes + 63) / 64 * 64;
    d->index++;
    if (!d->buf && !d->lazy)
        return 0;
    slot->dtype = d->dt;
    slot->ndim = ndim;
    memcpy(slot->shape, shape, (size_t)ndim * sizeof(int64_t));
    if (d->lazy) {
        static const enum cvlm_fill fills[] = {CVLM_FILL_RANDOM, CVLM_FILL_ONES, CVLM_FILL_ZEROS};
        slot->fill = fills[kind_of(name)];
        return 0;
    }
    slot->data = d->buf + at;
    fill(d->buf + at, d->dt, n, kind_of(name), d->seed * 0x100000001b3ull + d->index);
    return 0;
}

/* An empty weight table for cfg (NULL if out of memory). */
static struct cvlm_weights *empty_table(const struct cvlm_config *cfg)
{
    struct cvlm_weights *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->cfg = *cfg;
    w->layers = calloc((size_t)cfg->num_layers, sizeof(*w->layers));
    w->vit = calloc(cfg->has_vision ? (size_t)cfg->vision.num_layers : 1, sizeof(*w->vit));
    if (!w->layers || !w->vit) {
        cvlm_weights_destroy(w);
        return NULL;
    }
    return w;
}

int cvlm_weights_dummy(const struct cvlm_config *cfg, enum cvlm_dtype dtype, uint64_t seed,
                       struct cvlm_weights **out)
{
    struct cvlm_weights *w = empty_table(cfg);
    struct dummy_ctx d = {.dt = dtype, .seed = seed};
    int rc;
    *out = NULL;
    if (!w)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if ((rc = cvlm_weights_visit(w, dummy_one, &d))) {
        cvlm_weights_destroy(w);
        return rc;
    }
    /* one buffer, backed by huge pages where the kernel allows (cvlm_weights_own) */
    if (!(d.buf = cvlm_weights_own(w, d.bytes))) {
        cvlm_weights_destroy(w);
        return cvlm_errf(CVLM_ENOMEM, "out of memory for %zu bytes of weights", d.bytes);
    }
    d.bytes = d.index = 0;
    if ((rc = cvlm_weights_visit(w, dummy_one, &d))) {
        cvlm_weights_destroy(w);
        return rc;
    }
    *out = w;
    return 0;
}

int cvlm_weights_dummy_lazy(const struct cvlm_config *cfg, enum cvlm_dtype dtype,
                            struct cvlm_weights **out)
{
    struct cvlm_weights *w = empty_table(cfg);
    struct dummy_ctx d = {.dt = dtype, .lazy = 1};
    int rc = w ? cvlm_weights_visit(w, dummy_one, &d) : cvlm_errf(CVLM_ENOMEM, "out of memory");
    *out = NULL;
    if (rc) {
        cvlm_weights_destroy(w);
        return rc;
    }
    *out = w;
    return 0;
}

/* ---- writer -------------------------------------------------------------------------- */

struct write_ctx {
    FILE *f;
    int pass;   /* 0: header JSON, 1: data */
    size_t off; /* data offset so far */
    int first, err;
};

static int write_one(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                     const int64_t *shape, int optional)
{
    struct write_ctx *c = ctx;
    size_t nbytes;
    (void)shape;
    (void)optional;
    if (!slot->data)
        return 0;
    nbytes = (size_t)cvlm_tensor_numel(slot) * cvlm_dtype_size(slot->dtype);
    if (c->pass == 1) {
        c->err |= fwrite(slot->data, 1, nbytes, c->f) != nbytes;
        return 0;
    }
    fprintf(c->f, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", c->first ? "" : ",", name,
            cvlm_dtype_name(slot->dtype));
    for (int i = 0; i < ndim; i++)
        fprintf(c->f, "%s%lld", i ? "," : "", (long long)slot->shape[i]);
    fprintf(c->f, "],\"data_offsets\":[%zu,%zu]}", c->off, c->off + nbytes);
    c->off += nbytes;
    c->first = 0;
    return 0;
}

static int write_config(const struct cvlm_config *c, const char *path)
{
    static const char *const tmpl[] = {"base", "chat", "vqa"};
    char eos[16 * CVLM_MAX_EOS + 4] = "";
    size_t at = 0;
    for (int i = 0; i < c->n_eos && c->n_eos > 1; i++) /* a list (CogVLM2), else one id */
        at += (size_t)snprintf(eos + at, sizeof(eos) - at, "%s%d", i ? ", " : "[", c->eos_ids[i]);
    if (c->n_eos > 1)
        snprintf(eos + at, sizeof(eos) - at, "]");
    else
        snprintf(eos, sizeof(eos), "%d", c->eos_token_id);
    FILE *f = fopen(path, "w");
    if (!f)
        return cvlm_errf(CVLM_EIO, "%s: cannot create", path);
    fprintf(f, "{\n  \"architectures\": [\"%s\"],\n",
            c->has_vision ? "CogVLMForCausalLM" : "LlamaForCausalLM");
    fprintf(f,
            "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n  \"intermediate_size\": %d,\n"
            "  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n"
            "  \"max_position_embeddings\": %d,\n  \"rms_norm_eps\": %.9g,\n"
            "  \"rope_theta\": %.9g,\n  \"bos_token_id\": %d,\n  \"eos_token_id\": %s,\n"
            "  \"pad_token_id\": %d,\n  \"template_version\": \"%s\"",
            c->vocab_size, c->hidden_size, c->intermediate_size, c->num_layers, c->num_heads,
            c->max_position_embeddings, (double)c->rms_norm_eps, (double)c->rope_theta,
            c->bos_token_id, eos, c->pad_token_id, tmpl[c->template_version]);
    if (c->variant == CVLM_VARIANT_COGVLM2) /* what makes config.json a CogVLM2 one */
        fprintf(f, ",\n  \"num_multi_query_heads\": %d", cvlm_config_kv_heads(c));
    if (c->has_vision) {
        const struct cvlm_vision_config *v = &c->vision;
        fprintf(f,
                ",\n  \"vision_config\": {\"image_size\": %d, \"patch_size\": %d, "
                "\"in_channels\": %d, \"hidden_size\": %d, \"num_heads\": %d, "
                "\"num_hidden_layers\": %d, \"intermediate_size\": %d, "
                "\"num_positions\": %d, \"layer_norm_eps\": %.9g}",
                v->image_size, v->patch_size, v->in_channels, v->hidden_size, v->num_heads,
                v->num_layers, v->intermediate_size, v->num_positions, (double)v->layer_norm_eps);
    }
    fprintf(f, "\n}\n");
    if (fclose(f))
        return cvlm_errf(CVLM_EIO, "%s: write failed", path);
    return 0;
}

int cvlm_weights_write(const struct cvlm_weights *w, const char *dir)
{
    char path[4096];
    struct write_ctx c = {.first = 1};
    struct cvlm_weights *mw = (struct cvlm_weights *)w; /* visit only reads the slots here */
    uint64_t hlen;
    long h0;
    int rc;
    if (mkdir(dir, 0755) && errno != EEXIST)
        return cvlm_errf(CVLM_EIO, "%s: cannot create directory", dir);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    if ((rc = write_config(&w->cfg, path)))
        return rc;
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    if (!(c.f = fopen(path, "wb")))
        return cvlm_errf(CVLM_EIO, "%s: cannot create", path);
    /* header: 8-byte length placeholder, JSON, spaces up to a multiple of 8 */
    fwrite("\0\0\0\0\0\0\0\0{", 1, 9, c.f);
    cvlm_weights_visit(mw, write_one, &c);
    fprintf(c.f, ",\"__metadata__\":{\"format\":\"pt\"}}");
    h0 = ftell(c.f) - 8;
    while (h0 % 8) {
        fputc(' ', c.f);
        h0++;
    }
    hlen = (uint64_t)h0;
    c.pass = 1;
    cvlm_weights_visit(mw, write_one, &c);
    for (int i = 0; i < 8; i++)
        path[i] = (char)(hlen >> (8 * i)); /* little-endian length */
    c.err |= fseek(c.f, 0, SEEK_SET) != 0 || fwrite(path, 1, 8, c.f) != 8;
    c.err |= fclose(c.f) != 0;
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    return c.err ? cvlm_errf(CVLM_EIO, "%s: write failed", path) : 0;
}
