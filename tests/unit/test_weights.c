/* test_weights.c - checkpoint loader: the golden-tiny checkpoints in every dtype and
 * layout, and one test per kind of hostile file (each must fail with a clear error). */
#include "engine/error.h"
#include "engine/model/weights.h"
#include "tests/unit/harness.h"
#include "tests/unit/st_writer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define GOLDEN_F32 "golden-tiny/model"
#define GOLDEN_BF16 "golden-tiny/model-bf16"

/* A fresh directory under the run's scratch dir with the golden config.json in it. */
static const char *scratch_model_dir(const char *name)
{
    static char dir[512];
    char cfg[600];
    snprintf(dir, sizeof(dir), "%s/%s", cvlm_test_tmpdir(), name);
    mkdir(dir, 0700);
    snprintf(cfg, sizeof(cfg), "%s/config.json", dir);
    st_copy_file(cvlm_test_data(GOLDEN_F32 "/config.json"), cfg);
    return dir;
}

/* The golden F32 tensors as writer entries (views into an open checkpoint). */
static struct st_entry *entries_of(const struct cvlm_safetensors *st)
{
    struct st_entry *e = calloc(st->n_tensors, sizeof(*e));
    for (size_t i = 0; e && i < st->n_tensors; i++) {
        const struct cvlm_st_tensor *t = &st->tensors[i];
        e[i].name = t->name;
        e[i].dtype = cvlm_dtype_name(t->t.dtype);
        e[i].ndim = t->t.ndim;
        memcpy(e[i].shape, t->t.shape, sizeof(e[i].shape));
        e[i].data = t->t.data;
        e[i].nbytes = t->nbytes;
    }
    return e;
}

/* Loads `dir` expecting failure with `code`; checks that the detail mentions `needle`. */
static void expect_fail(const char *dir, int code, const char *needle)
{
    struct cvlm_weights *w = NULL;
    cvlm_clear_error();
    int rc = cvlm_weights_load(dir, &w);
    CHECKF(rc == code, "%s: rc %d (%s), expected %d (%s)", needle, rc, cvlm_last_error(), code,
           cvlm_strerror(code));
    CHECKF(!needle || strstr(cvlm_last_error(), needle), "detail '%s' lacks '%s'",
           cvlm_last_error(), needle);
    CHECK(w == NULL);
    cvlm_weights_destroy(w);
}

/* A CogVLM2 checkpoint (golden-cogvlm2-tiny) is recognised from num_multi_query_heads:
 * GQA QKV rows, the vision-expert QKV bias, the conv, RoPE base 500000, two EOS ids. */
TEST(weights_cogvlm2_config)
{
    struct cvlm_weights *w;
    int rc = cvlm_weights_load(cvlm_test_data("golden-cogvlm2-tiny/model"), &w);
    REQUIRE(rc == 0 || (printf("  %s\n", cvlm_last_error()), 0));
    const struct cvlm_config *c = &w->cfg;
    CHECK(c->variant == CVLM_VARIANT_COGVLM2 && !strcmp(cvlm_variant_name(c->variant), "cogvlm2"));
    CHECK(c->num_heads == 4 && cvlm_config_kv_heads(c) == 2 && cvlm_config_qkv_rows(c) == 64);
    CHECK(fabsf(c->rope_theta - 500000.0f) < 1.0f);
    CHECK(c->n_eos == 2 && c->eos_token_id == 128001 && cvlm_config_is_eos(c, 128009));
    CHECK(!cvlm_config_is_eos(c, 128002) && c->pad_token_id == 128002);
    CHECK(cvlm_config_has_conv(c) && cvlm_config_vision_tokens(c) == 4);
    CHECK(cvlm_config_image_tokens(c) == 6);
    CHECK(w->layers[0].qkv[CVLM_EXPERT_LANG].shape[0] == 64 && !w->layers[0].qkv_b[0].data);
    CHECK(w->layers[1].qkv_b[CVLM_EXPERT_VISION].data &&
          w->layers[1].qkv_b[CVLM_EXPERT_VISION].shape[0] == 64);
    CHECK(w->conv_w.ndim == 4 && w->conv_w.shape[0] == 32 && w->conv_w.shape[3] == 2);
    CHECK(cvlm_weights_check_tp(c, 2) == 0 && cvlm_weights_check_tp(c, 4) == CVLM_EINVAL);
    /* written back (config.json from the struct), it reads as the same CogVLM2 model */
    char dir[1024];
    struct cvlm_weights *w2 = NULL;
    snprintf(dir, sizeof(dir), "%s/cogvlm2-copy", cvlm_test_tmpdir());
    CHECK(cvlm_weights_write(w, dir) == 0);
    rc = cvlm_weights_load(dir, &w2);
    CHECK(rc == 0 || (printf("  %s\n", cvlm_last_error()), 0));
    if (w2) {
        CHECK(w2->cfg.variant == CVLM_VARIANT_COGVLM2 && cvlm_config_kv_heads(&w2->cfg) == 2);
        CHECK(w2->cfg.n_eos == 2 && w2->cfg.eos_ids[1] == 128009);
        CHECK(w2->conv_w.ndim == 4 && w2->layers[0].qkv_b[CVLM_EXPERT_VISION].data);
    }
    cvlm_weights_destroy(w2);
    cvlm_weights_destroy(w);
}

TEST(weights_golden_f32)
{
    struct cvlm_weights *w;
    int rc = cvlm_weights_load(cvlm_test_data(GOLDEN_F32), &w);
    REQUIRE(rc == 0 || (printf("  %s\n", cvlm_last_error()), 0));
    const struct cvlm_config *c = &w->cfg;
    CHECK(c->vocab_size == 32000 && c->hidden_size == 64 && c->num_layers == 2);
    CHECK(c->num_heads == 4 && c->intermediate_size == 172 && c->has_vision);
    CHECK(fabsf(c->rms_norm_eps - 1e-5f) < 1e-12f);
    CHECK(c->template_version == CVLM_TEMPLATE_CHAT);
    CHECK(c->vision.image_size == 28 && c->vision.patch_size == 14);
    CHECK(c->vision.num_positions == 5 && cvlm_config_image_tokens(c) == 6);
    CHECK(w->embed.dtype == CVLM_DTYPE_F32 && w->embed.shape[0] == 32000);
    CHECK(w->layers[1].qkv[CVLM_EXPERT_VISION].shape[0] == 192);
    CHECK(w->layers[0].down[CVLM_EXPERT_LANG].shape[1] == 172);
    CHECK(w->layers[0].inv_freq.data && w->layers[0].inv_freq.shape[0] == 8);
    CHECK(w->patch_w.ndim == 4 && w->patch_w.shape[1] == 3 && w->patch_w.shape[3] == 14);
    CHECK(w->boi.ndim == 3 && w->boi.shape[2] == 64);
    CHECK(w->vit[1].fc1_w.shape[0] == 64 && w->vit[1].fc1_w.shape[1] == 32);
    /* inv_freq is a derived constant: base^(-2j/head_dim), stored in the file */
    for (int j = 0; j < 8; j++) {
        float want = powf(10000.0f, -2.0f * j / 16.0f);
        float got = cvlm_tensor_get_f32(&w->layers[0].inv_freq, j);
        CHECKF(fabsf(got - want) <= 1e-2f * want, "inv_freq[%d] %g vs %g", j, got, want);
    }
    cvlm_weights_destroy(w);
}

struct cmp_ctx {
    struct cvlm_weights *other;
    int64_t compared, mismatches;
    int mode; /* 0: other is the BF16 rounding of this; 1: other equals this */
};

/* Visits the F32 model and looks each tensor up in `other` by name. */
static int cmp_one(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                   const int64_t *shape, int optional)
{
    struct cmp_ctx *c = ctx;
    const struct cvlm_st_tensor *o = cvlm_st_find(c->other->st, name);
    (void)ndim, (void)shape, (void)optional;
    if (!o || o->t.ndim != slot->ndim) {
        c->mismatches++;
        return 0;
    }
    for (int64_t i = 0; i < cvlm_tensor_numel(slot); i++) {
        float a = cvlm_tensor_get_f32(slot, i), b = cvlm_tensor_get_f32(&o->t, i);
        float want = c->mode == 0 ? cvlm_bf16_to_f32(cvlm_f32_to_bf16(a)) : a;
        c->mismatches += memcmp(&want, &b, 4) != 0;
        c->compared++;
    }
    return 0;
}

TEST(weights_golden_bf16_is_rounded_f32)
{
    struct cvlm_weights *f, *b;
    REQUIRE(cvlm_weights_load(cvlm_test_data(GOLDEN_F32), &f) == 0);
    if (cvlm_weights_load(cvlm_test_data(GOLDEN_BF16), &b)) {
        CHECKF(0, "%s", cvlm_last_error());
        cvlm_weights_destroy(f);
        return;
    }
    CHECK(b->embed.dtype == CVLM_DTYPE_BF16 && b->layers[1].qkv[1].dtype == CVLM_DTYPE_BF16);
    struct cmp_ctx c = {.other = b, .mode = 0};
    cvlm_weights_visit(f, cmp_one, &c);
    CHECK(c.compared > 4000000);
    CHECKF(c.mismatches == 0, "%lld of %lld values differ", (long long)c.mismatches,
           (long long)c.compared);
    cvlm_weights_destroy(f);
    cvlm_weights_destroy(b);
}

/* Independent f32 -> f16 (round to nearest even, no NaN handling needed for weights). */
static uint16_t to_f16(float f)
{
    uint32_t u, sign, mag;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    float a = fabsf(f);
    if (a >= 65520.0f)
        return (uint16_t)(sign | 0x7c00u);
    if (a < 6.103515625e-05f) { /* subnormal half: multiples of 2^-24 */
        mag = (uint32_t)lrintf(a * 16777216.0f);
        return (uint16_t)(sign | mag);
    }
    memcpy(&u, &a, 4);
    mag = ((u >> 23) - 112) << 10 | ((u >> 13) & 0x3ffu);
    uint32_t rem = u & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (mag & 1)))
        mag++;
    return (uint16_t)(sign | mag);
}

TEST(weights_f16_checkpoint)
{
    struct cvlm_safetensors *st;
    struct cvlm_weights *f, *h = NULL;
    char path[700];
    REQUIRE(cvlm_st_open(cvlm_test_data(GOLDEN_F32), &st) == 0);
    struct st_entry *e = entries_of(st);
    uint16_t **bufs = calloc(st->n_tensors, sizeof(*bufs));
    for (size_t i = 0; i < st->n_tensors; i++) {
        size_t n = st->tensors[i].nbytes / 4;
        bufs[i] = malloc(n * 2 + 2);
        for (size_t k = 0; k < n; k++)
            bufs[i][k] = to_f16(cvlm_tensor_get_f32(&st->tensors[i].t, (int64_t)k));
        e[i].dtype = "F16";
        e[i].data = bufs[i];
        e[i].nbytes = n * 2;
    }
    const char *dir = scratch_model_dir("f16");
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK(st_write(path, e, st->n_tensors, 0) == 0);
    CHECKF(cvlm_weights_load(dir, &h) == 0, "%s", cvlm_last_error());
    REQUIRE(cvlm_weights_load(cvlm_test_data(GOLDEN_F32), &f) == 0);
    if (h) {
        CHECK(h->lm_head.dtype == CVLM_DTYPE_F16);
        int64_t bad = 0, n = cvlm_tensor_numel(&f->lm_head);
        for (int64_t i = 0; i < n; i++) {
            float a = cvlm_tensor_get_f32(&f->lm_head, i), b = cvlm_tensor_get_f32(&h->lm_head, i);
            bad += fabsf(a - b) > fmaxf(fabsf(a) * (1.0f / 2048), 1.0f / 16777216);
        }
        CHECKF(bad == 0, "%lld lm_head values off by more than f16 rounding", (long long)bad);
    }
    cvlm_weights_destroy(f);
    cvlm_weights_destroy(h);
    for (size_t i = 0; i < st->n_tensors; i++)
        free(bufs[i]);
    free(bufs);
    free(e);
    cvlm_st_close(st);
}

/* Writes the golden tensors into `nshards` files plus an index; `mutate` may alter the
 * index text before it is written (for the hostile-index tests). */
static const char *write_sharded(const char *name, int nshards, const char *index_override)
{
    struct cvlm_safetensors *st;
    static char dir_copy[512];
    char path[700];
    if (cvlm_st_open(cvlm_test_data(GOLDEN_F32), &st))
        return NULL;
    struct st_entry *e = entries_of(st);
    const char *dir = scratch_model_dir(name);
    snprintf(dir_copy, sizeof(dir_copy), "%s", dir);
    size_t per = (st->n_tensors + nshards - 1) / nshards, cap = 64 + st->n_tensors * 160, off;
    char *idx = malloc(cap);
    off = (size_t)snprintf(idx, cap, "{\"metadata\":{\"total_size\":1},\"weight_map\":{");
    for (int s = 0; s < nshards; s++) {
        size_t lo = (size_t)s * per, hi = lo + per > st->n_tensors ? st->n_tensors : lo + per;
        snprintf(path, sizeof(path), "%s/model-%05d-of-%05d.safetensors", dir_copy, s + 1, nshards);
        st_write(path, e + lo, hi - lo, 0);
        for (size_t i = lo; i < hi; i++)
            off += (size_t)snprintf(idx + off, cap - off,
                                    "%s\"%s\":\"model-%05d-of-%05d.safetensors\"", i ? "," : "",
                                    e[i].name, s + 1, nshards);
    }
    snprintf(idx + off, cap - off, "}}");
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir_copy);
    const char *text = index_override ? index_override : idx;
    cvlm_test_write_file(path, text, strlen(text));
    free(idx);
    free(e);
    cvlm_st_close(st);
    return dir_copy;
}

TEST(weights_sharded_equals_single)
{
    const char *dir = write_sharded("sharded", 3, NULL);
    struct cvlm_weights *f, *s = NULL;
    REQUIRE(dir);
    CHECKF(cvlm_weights_load(dir, &s) == 0, "%s", cvlm_last_error());
    REQUIRE(s);
    CHECK(s->st->n_files == 3);
    REQUIRE(cvlm_weights_load(cvlm_test_data(GOLDEN_F32), &f) == 0);
    struct cmp_ctx c = {.other = s, .mode = 1};
    cvlm_weights_visit(f, cmp_one, &c);
    CHECK(c.compared > 4000000 && c.mismatches == 0);
    cvlm_weights_destroy(f);
    cvlm_weights_destroy(s);
}

TEST(weights_hostile_index)
{
    char dir[600], path[700];
    const char *d = write_sharded("badidx", 2, NULL);
    REQUIRE(d);
    snprintf(dir, sizeof(dir), "%s", d);
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    /* each case overwrites the index of the same two valid shards */
    static const struct {
        const char *text, *needle;
        int code;
    } cases[] = {
        {"{\"weight_map\": ", "index.json", CVLM_EFORMAT},
        {"{\"metadata\": {}}", "no weight_map", CVLM_EFORMAT},
        {"{\"weight_map\": {\"lm_head.weight\": \"../../etc/passwd\"}}", "bad shard file name",
         CVLM_EFORMAT},
        {"{\"weight_map\": {\"lm_head.weight\": \"nope.safetensors\"}}", "nope.safetensors",
         CVLM_ENOENT},
        {"{\"weight_map\": {\"lm_head.weight\": \"model-00001-of-00002.safetensors\"}}",
         "does not list it", CVLM_EFORMAT},
        {"{\"weight_map\": {\"lm_head.weight\": 7}}", "bad shard file name", CVLM_EFORMAT},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cvlm_test_write_file(path, cases[i].text, strlen(cases[i].text));
        expect_fail(dir, cases[i].code, cases[i].needle);
    }
}

TEST(weights_misaligned_data_is_copied)
{
    /* An unpadded header puts F32 data at an odd address; values must still be right. */
    float v[6] = {1.5f, -2.25f, 3.0f, 4.0f, 5.0f, 6.0f};
    struct st_entry e = {"x", "F32", 2, {2, 3}, v, sizeof(v)};
    char path[600];
    struct cvlm_safetensors *st;
    snprintf(path, sizeof(path), "%s/odd.safetensors", cvlm_test_tmpdir());
    REQUIRE(st_write(path, &e, 1, 1) == 0);
    REQUIRE(cvlm_st_open(path, &st) == 0);
    const struct cvlm_st_tensor *t = cvlm_st_find(st, "x");
    REQUIRE(t);
    CHECK((uintptr_t)t->t.data % 4 == 0);
    for (int i = 0; i < 6; i++)
        CHECK(((const float *)t->t.data)[i] == v[i]);
    CHECK(st->n_copies == 1);
    cvlm_st_close(st);
}

/* Opens a raw single file; expects `code` and a detail containing `needle`. */
static void raw_case(const char *header, long long hlen, const void *data, size_t dlen, int code,
                     const char *needle)
{
    char path[600];
    struct cvlm_safetensors *st = NULL;
    snprintf(path, sizeof(path), "%s/raw.safetensors", cvlm_test_tmpdir());
    REQUIRE(st_write_raw(path, header, hlen, data, dlen) == 0);
    cvlm_clear_error();
    int rc = cvlm_st_open(path, &st);
    CHECKF(rc == code, "[%s]: rc %d (%s), expected %d", needle, rc, cvlm_last_error(), code);
    CHECKF(strstr(cvlm_last_error(), needle), "detail '%s' lacks '%s'", cvlm_last_error(), needle);
    CHECK(st == NULL);
    cvlm_st_close(st);
}

TEST(weights_hostile_headers)
{
    static const unsigned char data[64];
    char path[600];
    struct cvlm_safetensors *st = NULL;
    /* files too short to hold the length field */
    snprintf(path, sizeof(path), "%s/short.safetensors", cvlm_test_tmpdir());
    cvlm_test_write_file(path, "abc", 3);
    CHECK(cvlm_st_open(path, &st) == CVLM_EFORMAT && strstr(cvlm_last_error(), "too short"));
    cvlm_test_write_file(path, "", 0);
    CHECK(cvlm_st_open(path, &st) == CVLM_EFORMAT);

    const char *ok = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    raw_case(ok, 4096, data, 8, CVLM_EFORMAT, "beyond the end of the file");
    raw_case(ok, 1ll << 40, data, 8, CVLM_ETOOBIG, "limit");
    raw_case("{\"a\": nope}", -1, data, 8, CVLM_EFORMAT, "header JSON");
    raw_case("[1, 2]", -1, data, 8, CVLM_EFORMAT, "not a JSON object");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", -1, data, 4,
             CVLM_EFORMAT, "beyond the data section");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", -1, data, 8,
             CVLM_EFORMAT, "bad data_offsets");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
             "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
             -1, data, 24, CVLM_EFORMAT, "overlap");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", -1, data, 8,
             CVLM_ESHAPE, "bytes stored");
    raw_case("{\"a\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", -1, data, 8,
             CVLM_EUNSUPPORTED, "unsupported dtype I64");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", -1, data, 8,
             CVLM_EFORMAT, "bad shape entry");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776,1048576],"
             "\"data_offsets\":[0,8]}}",
             -1, data, 8, CVLM_EFORMAT, "overflows");
    /* 2^31 x 2^31 elements pass the element-count bound, but times 4 bytes the count
     * wrapped to 0 and an empty data range was accepted for a 16 EiB tensor */
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[2147483648,2147483648],"
             "\"data_offsets\":[0,0]}}",
             -1, data, 8, CVLM_EFORMAT, "overflows");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[1073741824,4,1073741824],"
             "\"data_offsets\":[0,0]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
             "\"data_offsets\":[0,8]}}",
             -1, data, 8, CVLM_EFORMAT, "overflows");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
             "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
             -1, data, 8, CVLM_EFORMAT, "duplicate");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", -1, data, 8, CVLM_EFORMAT,
             "needs dtype, shape and data_offsets");
    raw_case("{\"__metadata__\":{\"format\":3}}", -1, data, 0, CVLM_EFORMAT, "__metadata__");
    raw_case("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", -1, data,
             4, CVLM_EUNSUPPORTED, "dims");
}

/* Golden tensors with one change, written as a single file, loaded with the golden config. */
static void golden_variant(const char *name, const char *drop, const char *rename_to, int reshape,
                           int code, const char *needle)
{
    struct cvlm_safetensors *st;
    char path[700];
    REQUIRE(cvlm_st_open(cvlm_test_data(GOLDEN_F32), &st) == 0);
    struct st_entry *e = entries_of(st);
    size_t n = 0;
    for (size_t i = 0; i < st->n_tensors; i++) {
        if (drop && !strcmp(e[i].name, drop)) {
            if (rename_to)
                e[i].name = rename_to, e[n++] = e[i];
            else if (reshape)
                e[i].shape[0] /= 2, e[i].shape[1] *= 2, e[n++] = e[i];
            continue;
        }
        e[n++] = e[i];
    }
    const char *dir = scratch_model_dir(name);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK(st_write(path, e, n, 0) == 0);
    expect_fail(dir, code, needle);
    free(e);
    cvlm_st_close(st);
}

TEST(weights_missing_unexpected_misshapen)
{
    golden_variant("missing", "lm_head.weight", NULL, 0, CVLM_ENOENT,
                   "lacks tensor lm_head.weight");
    golden_variant("unexpected", "model.layers.1.mlp.vision_mlp.up_proj.weight",
                   "model.layers.1.mlp.vision_mlp.upp_proj.weight", 0, CVLM_ENOENT,
                   "model.layers.1.mlp.vision_mlp.up_proj.weight");
    golden_variant("reshaped", "model.vision.linear_proj.gate_proj.weight", NULL, 1, CVLM_ESHAPE,
                   "gate_proj.weight has shape [86, 128], the config needs [172, 64]");
    /* inv_freq is optional: dropping it is fine; an extra unknown tensor is not */
    struct cvlm_safetensors *st;
    char path[700];
    REQUIRE(cvlm_st_open(cvlm_test_data(GOLDEN_F32), &st) == 0);
    struct st_entry *e = entries_of(st);
    size_t n = 0;
    float extra[2] = {1, 2};
    for (size_t i = 0; i < st->n_tensors; i++)
        if (!strstr(e[i].name, "inv_freq"))
            e[n++] = e[i];
    e[n++] = (struct st_entry){"model.extra.weight", "F32", 1, {2}, extra, 8};
    const char *dir = scratch_model_dir("extra");
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK(st_write(path, e, n, 0) == 0);
    expect_fail(dir, CVLM_EFORMAT, "unexpected tensor model.extra.weight");
    CHECK(st_write(path, e, n - 1, 0) == 0); /* without the extra: loads, inv_freq absent */
    struct cvlm_weights *w = NULL;
    CHECKF(cvlm_weights_load(dir, &w) == 0, "%s", cvlm_last_error());
    CHECK(w && w->layers[0].inv_freq.data == NULL);
    cvlm_weights_destroy(w);
    free(e);
    cvlm_st_close(st);
}

TEST(weights_truncated_and_flipped_files)
{
    size_t len;
    unsigned char *buf = cvlm_test_read_file(cvlm_test_data(GOLDEN_F32 "/model.safetensors"), &len);
    char path[600];
    REQUIRE(buf);
    snprintf(path, sizeof(path), "%s/cut.safetensors", cvlm_test_tmpdir());
    /* Every truncation must fail: the header promises data that is no longer there. */
    size_t cuts[] = {1, 7, 8, 9, 100, 1000, 5000, 20000, 40000, len / 2, len - 1};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        struct cvlm_safetensors *st = NULL;
        cvlm_test_write_file(path, buf, cuts[i]);
        int rc = cvlm_st_open(path, &st);
        CHECKF(rc < 0 && st == NULL, "truncated at %zu: rc %d", cuts[i], rc);
        cvlm_st_close(st);
    }
    /* Byte flips inside the header: an error or a consistent table, never a crash (ASan). */
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | buf[i];
    unsigned s = 12345;
    for (int trial = 0; trial < 300; trial++) {
        unsigned char *m = malloc(len);
        memcpy(m, buf, len);
        for (int k = 0; k < 3; k++) {
            s = s * 1103515245u + 12345u;
            m[8 + (s >> 8) % hlen] ^= (unsigned char)(1u << ((s >> 4) % 8));
        }
        struct cvlm_safetensors *st = NULL;
        cvlm_test_write_file(path, m, len);
        if (cvlm_st_open(path, &st) == 0) {
            for (size_t t = 0; t < st->n_tensors; t++) {
                const unsigned char *p = st->tensors[t].t.data;
                const unsigned char *base = st->files[0].map;
                CHECK(p >= base && p + st->tensors[t].nbytes <= base + st->files[0].size);
            }
        }
        cvlm_st_close(st);
        free(m);
    }
    free(buf);
}

TEST(weights_bad_config)
{
    struct cvlm_config c;
    static const struct {
        const char *json, *needle;
    } cases[] = {
        {"{", "config.json"},
        {"[]", "not a JSON object"},
        {"{\"hidden_size\": 64}", "missing vocab_size"},
        {"{\"vocab_size\": 100, \"hidden_size\": \"64\", \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 2}",
         "hidden_size must be an integer"},
        {"{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 3}",
         "even head size"},
        {"{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 0, \"num_attention_heads\": 4}",
         "num_hidden_layers must be"},
        {"{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"vision_config\": "
         "{\"image_size\": 30, \"patch_size\": 14, \"hidden_size\": 8, \"num_heads\": 2, "
         "\"num_hidden_layers\": 1, \"intermediate_size\": 8, \"num_positions\": 5}}",
         "not a multiple of patch_size"},
        {"{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"vision_config\": "
         "{\"image_size\": 28, \"patch_size\": 14, \"hidden_size\": 8, \"num_heads\": 2, "
         "\"num_hidden_layers\": 1, \"intermediate_size\": 8, \"num_positions\": 7}}",
         "num_positions 7"},
        {"{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"template_version\": \"x\"}",
         "template_version 'x'"},
        {"{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8, "
         "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"eos_token_id\": 100}",
         "beyond vocab_size"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = cvlm_config_parse(cases[i].json, strlen(cases[i].json), &c);
        CHECKF(rc < 0 && strstr(cvlm_last_error(), cases[i].needle), "case %zu: rc %d '%s'", i, rc,
               cvlm_last_error());
    }
    const char *text_only = "{\"vocab_size\": 100, \"hidden_size\": 64, \"intermediate_size\": 8,"
                            " \"num_hidden_layers\": 1, \"num_attention_heads\": 4}";
    CHECK(cvlm_config_parse(text_only, strlen(text_only), &c) == 0);
    CHECK(!c.has_vision && c.template_version == CVLM_TEMPLATE_CHAT && c.bos_token_id == 1);
    expect_fail("/nonexistent-model-dir", CVLM_ENOENT, "cannot open");
}

/* Buffers the weights own: 64-byte aligned with 64 bytes to spare (the kernels read whole
 * vectors past a row's end), 2 MiB aligned from 4 MiB on (huge pages), writable to the last
 * byte, all freed by destroy (ASan's leak check). */
TEST(weights_own_buffers)
{
    struct cvlm_weights *w = calloc(1, sizeof(*w));
    static const size_t sizes[] = {0, 1, 63, 64, 4095, (4u << 20) - 200, 4u << 20, (6u << 20) + 3};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t n = sizes[i];
        unsigned char *p = cvlm_weights_own(w, n);
        CHECKF(p != NULL, "%zu bytes", n);
        if (!p)
            continue;
        CHECKF((uintptr_t)p % 64 == 0, "%zu bytes at %p", n, (void *)p);
        CHECKF(n < (4u << 20) - 128 || (uintptr_t)p % (2u << 20) == 0, "%zu bytes at %p", n,
               (void *)p);
        memset(p, 0xa5, (n + 63) / 64 * 64 + 64);
        CHECK(w->n_owned == i + 1 && w->owned[i] == p);
    }
    cvlm_weights_destroy(w);
}

/* The CPU backend's copy of the checkpoint's big matrices into memory of their own: a
 * matrix of 4 MiB or more leaves the mapping for a 2 MiB aligned buffer with the same
 * bytes; smaller ones (and the norms) stay where they were. */
TEST(weights_to_memory)
{
    /* vocab 16384 x hidden 64 in F32: embed and lm_head 4 MiB each, the rest small */
    static const char cfg_json[] =
        "{\"vocab_size\": 16384, \"hidden_size\": 64, \"intermediate_size\": 96,"
        " \"num_hidden_layers\": 1, \"num_attention_heads\": 4}";
    struct cvlm_config cfg;
    struct cvlm_weights *src = NULL, *a = NULL, *b = NULL;
    REQUIRE(cvlm_config_parse(cfg_json, sizeof(cfg_json) - 1, &cfg) == 0);
    REQUIRE(cvlm_weights_dummy(&cfg, CVLM_DTYPE_F32, 5, &src) == 0);
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/to-memory", cvlm_test_tmpdir());
    REQUIRE(cvlm_weights_write(src, dir) == 0);
    cvlm_weights_destroy(src);
    REQUIRE(cvlm_weights_load(dir, &a) == 0 && cvlm_weights_load(dir, &b) == 0);
    const void *lm_before = a->lm_head.data, *qkv_before = a->layers[0].qkv[0].data;
    REQUIRE(cvlm_weights_to_memory(a) == 0);
    CHECK(a->lm_head.data != lm_before && (uintptr_t)a->lm_head.data % (2u << 20) == 0);
    CHECK(a->embed.data != b->embed.data && (uintptr_t)a->embed.data % (2u << 20) == 0);
    CHECK(a->layers[0].qkv[0].data == qkv_before); /* 48 KiB: stays mapped */
    CHECK(!memcmp(a->lm_head.data, b->lm_head.data, cvlm_tensor_bytes(&b->lm_head)));
    CHECK(!memcmp(a->embed.data, b->embed.data, cvlm_tensor_bytes(&b->embed)));
    /* a second pass finds nothing left to copy */
    const void *lm_after = a->lm_head.data;
    size_t owned = a->n_owned;
    REQUIRE(cvlm_weights_to_memory(a) == 0);
    CHECK(a->lm_head.data == lm_after && a->n_owned == owned);
    cvlm_weights_destroy(a);
    cvlm_weights_destroy(b);
}
