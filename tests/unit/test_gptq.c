/* test_gptq.c - GPTQ int4 checkpoints (engine/model/gptq.c) against the weights they encode.
 *
 * tools/gptq_pack.py (a packer written from the format's description) turns an F32
 * checkpoint into GPTQ checkpoints, sym and asym, desc_act false and true (random g_idx),
 * v1 and v2 zeros, group 128 and one group per row, and writes the dequantized weights as
 * an F32 checkpoint. Checked here: every loaded matrix, dequantized by the engine's helper
 * (cvlm_tensor_get_f32, perm undone), equals the packer's F32 weights exactly; the prompt
 * logits of the GPTQ model match those of the dequantized F32 model (1e-5 relative), with
 * one rank and with two (a desc_act checkpoint is refused at tp 2, with its reason); the
 * packer also runs on the golden-tiny checkpoint (a short group of 64, layers it cannot
 * quantize left in F32). The source model of the first checks is random (cvlm_weights_dummy)
 * with widths of 256 and 512, so that the matrices have 2 to 4 groups. Needs python3 with
 * numpy (Debian's python3-numpy, installed by `make deps`).
 */
#include "engine/error.h"
#include "engine/model/model.h"
#include "engine/model/quantize.h"
#include "tests/unit/harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *python(void)
{
    static const char *const cands[] = {"python3", "/usr/bin/python3"};
    const char *env = getenv("COGVLM_PYTHON");
    char cmd[300];
    if (env && *env)
        return env;
    for (int i = 0; i < 2; i++) {
        snprintf(cmd, sizeof(cmd), "%s -c 'import numpy' >/dev/null 2>&1", cands[i]);
        if (system(cmd) == 0)
            return cands[i];
    }
    return NULL;
}

/* Runs the packer: src -> dir/gptq-<tag> and dir/f32-<tag>; 0 on success. */
static int pack(const char *src, const char *tag, const char *flags)
{
    const char *py = python();
    char cmd[2048];
    if (!py)
        return -1;
    snprintf(cmd, sizeof(cmd),
             "%s tools/gptq_pack.py '%s' '%s/gptq-%s' --dequant '%s/f32-%s' %s > '%s/pack-%s.log' "
             "2>&1",
             py, src, cvlm_test_tmpdir(), tag, cvlm_test_tmpdir(), tag, flags, cvlm_test_tmpdir(),
             tag);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *out_dir(const char *kind, const char *tag)
{
    static char buf[2][600];
    static int at;
    char *p = buf[at++ & 1];
    snprintf(p, 600, "%s/%s-%s", cvlm_test_tmpdir(), kind, tag);
    return p;
}

/* The random source checkpoint (written once). */
static const char *source_dir(void)
{
    static const char cfg_json[] =
        "{\"hidden_size\": 256, \"intermediate_size\": 512, \"num_attention_heads\": 4,"
        " \"num_hidden_layers\": 2, \"vocab_size\": 320, \"max_position_embeddings\": 256,"
        " \"rms_norm_eps\": 1e-5, \"bos_token_id\": 1, \"eos_token_id\": 2, \"pad_token_id\": 0,"
        " \"vision_config\": {\"image_size\": 28, \"patch_size\": 14, \"hidden_size\": 32,"
        " \"num_heads\": 2, \"num_hidden_layers\": 1, \"intermediate_size\": 64,"
        " \"num_positions\": 5}}";
    static char dir[600];
    struct cvlm_config cfg;
    struct cvlm_weights *w;
    if (dir[0])
        return dir;
    snprintf(dir, sizeof(dir), "%s/gptq-src", cvlm_test_tmpdir());
    if (cvlm_config_parse(cfg_json, sizeof(cfg_json) - 1, &cfg) ||
        cvlm_weights_dummy(&cfg, CVLM_DTYPE_F32, 77, &w))
        return NULL;
    int rc = cvlm_weights_write(w, dir);
    cvlm_weights_destroy(w);
    return rc ? NULL : dir;
}

/* max |GPTQ value - F32 value| over the matrix, the GPTQ one read through perm. */
static double matrix_diff(const struct cvlm_tensor *q, const struct cvlm_tensor *f)
{
    int64_t N = q->shape[0], K = q->shape[1];
    double worst = 0;
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < K; j++) {
            int64_t k = q->perm ? q->perm[j] : j;
            double d =
                fabs((double)cvlm_tensor_get_f32(q, n * K + j) - cvlm_tensor_get_f32(f, n * K + k));
            worst = d > worst || isnan(d) ? d : worst;
        }
    return worst;
}

struct want {
    int asym, desc; /* expect mins / perm on the quantized matrices */
};

/* Every decoder matrix of g against f: exactly equal where g has it quantized; returns the
 * count of quantized matrices. */
static int check_weights(const struct cvlm_weights *g, const struct cvlm_weights *f,
                         struct want want, const char *tag)
{
    int nq = 0;
    double worst = 0;
    for (int l = 0; l < g->cfg.num_layers; l++)
        for (int e = 0; e < (g->cfg.has_vision ? 2 : 1); e++) {
            const struct cvlm_lm_layer *G = &g->layers[l], *F = &f->layers[l];
            const struct cvlm_tensor *gs[5] = {&G->qkv[e], &G->dense[e], &G->gate[e], &G->up[e],
                                               &G->down[e]};
            const struct cvlm_tensor *fs[5] = {&F->qkv[e], &F->dense[e], &F->gate[e], &F->up[e],
                                               &F->down[e]};
            for (int i = 0; i < 5; i++) {
                if (gs[i]->dtype != CVLM_DTYPE_Q4) {
                    CHECKF(matrix_diff(gs[i], fs[i]) == 0, "%s: unquantized matrix differs", tag);
                    continue;
                }
                nq++;
                double d = matrix_diff(gs[i], fs[i]);
                worst = d > worst ? d : worst;
                CHECKF(!!gs[i]->mins == want.asym, "%s layer %d: mins %p", tag, l,
                       (const void *)gs[i]->mins);
                CHECKF(!!gs[i]->perm == want.desc, "%s layer %d: perm %p", tag, l,
                       (const void *)gs[i]->perm);
            }
        }
    printf("  gptq %s: %d matrices, max |loaded - dequantized| = %g\n", tag, nq, worst);
    CHECKF(worst == 0, "%s: loaded weights differ from the dequantized ones by %g", tag, worst);
    return nq;
}

/* Prompt logits [T, V] of w through the engine: bos, an image (6 vision-expert slots), 9
 * text tokens (so each expert's GEMMs take several rows, as in a prefill). */
#define PT 16
static int prompt_logits(struct cvlm_weights *w, int tp, float *logits)
{
    struct cvlm_model_opts o = {
        .max_tokens = 64, .block_size = 4, .kv_blocks = 32, .threads = 2, .tp = tp};
    struct cvlm_model *m;
    int rc = cvlm_model_create(w, &o, &m);
    if (rc)
        return rc;
    const int S = w->cfg.vision.image_size, img_len = cvlm_config_image_tokens(&w->cfg);
    float *px = malloc((size_t)3 * S * S * sizeof(float));
    struct cvlm_feats *feats = cvlm_model_feats_alloc(m);
    int32_t ids[PT], pos[PT], seq[PT] = {0}, slot[PT], img[PT], bt[8] = {3, 0, 5, 1, 2, 4, 6, 7};
    uint8_t ex[PT], want[PT];
    for (int i = 0; px && i < 3 * S * S; i++)
        px[i] = (float)((i * 37 % 101) - 50) / 50.0f;
    rc = !px || !feats ? CVLM_ENOMEM : cvlm_model_encode_image(m, px, feats, NULL);
    for (int t = 0; t < PT; t++) {
        int rel = t - 1;
        ids[t] = t ? (t * 53 + 7) % w->cfg.vocab_size : 1;
        img[t] = rel >= 0 && rel < img_len ? rel : -1;
        ex[t] = img[t] >= 0 ? CVLM_EXPERT_VISION : CVLM_EXPERT_LANG;
        pos[t] = t < 2 ? t : t < img_len ? 2 : t - img_len + 3; /* image interior shares one */
        slot[t] = t;
        want[t] = 1;
    }
    struct cvlm_seq_kv kv = {bt, 8};
    struct cvlm_batch b = {.n_tokens = PT,
                           .ids = ids,
                           .pos = pos,
                           .expert = ex,
                           .seq = seq,
                           .slot = slot,
                           .img_row = img,
                           .img_feats = (const struct cvlm_feats *const *)&feats,
                           .seqs = &kv,
                           .n_seqs = 1,
                           .want_logits = want};
    if (!rc)
        rc = cvlm_model_forward(m, &b, logits);
    free(px);
    if (feats)
        cvlm_model_feats_free(m, feats);
    cvlm_model_destroy(m);
    return rc;
}

/* One packer configuration: weights exact, logits at tp 1 and 2. */
static void gptq_case(const char *tag, const char *flags, struct want want)
{
    const char *src = source_dir();
    struct cvlm_weights *g = NULL, *f = NULL;
    REQUIRE(src);
    REQUIRE(python());
    CHECKF(pack(src, tag, flags) == 0, "%s: the packer failed (log in %s)", tag,
           cvlm_test_tmpdir());
    CHECKF(cvlm_weights_load(out_dir("gptq", tag), &g) == 0, "%s: %s", tag, cvlm_last_error());
    CHECKF(cvlm_weights_load(out_dir("f32", tag), &f) == 0, "%s: %s", tag, cvlm_last_error());
    if (!g || !f)
        goto out;
    CHECK(check_weights(g, f, want, tag) == 5 * 2 * g->cfg.num_layers); /* all of them */
    size_t n = (size_t)PT * g->cfg.vocab_size;
    float *lg = malloc(n * sizeof(float)), *lf = malloc(n * sizeof(float));
    REQUIRE(lg && lf);
    for (int tp = 1; tp <= 2; tp++) {
        int rg = prompt_logits(g, tp, lg);
        if (tp == 2 && want.desc) {
            CHECKF(rg == CVLM_EUNSUPPORTED && strstr(cvlm_last_error(), "desc_act"),
                   "%s tp 2: expected the desc_act refusal, got %d (%s)", tag, rg,
                   cvlm_last_error());
            continue;
        }
        CHECKF(rg == 0, "%s tp %d: %s", tag, tp, cvlm_last_error());
        CHECK(prompt_logits(f, tp, lf) == 0);
        double rel = cvlm_test_max_rel(lg, lf, n);
        printf("  gptq %s tp %d: prompt logits vs the dequantized F32 model: max rel %.3g\n", tag,
               tp, rel);
        CHECKF(rel < 1e-5, "%s tp %d: prompt logits off by %g", tag, tp, rel);
    }
    free(lg);
    free(lf);
out:
    cvlm_weights_destroy(g);
    cvlm_weights_destroy(f);
}

TEST(gptq_sym_v1)
{
    gptq_case("sym-v1", "", (struct want){0, 0});
}

TEST(gptq_asym_v1)
{
    gptq_case("asym-v1", "--asym --seed 2", (struct want){1, 0});
}

TEST(gptq_sym_desc_act_v2)
{
    gptq_case("sym-desc-v2", "--desc-act --v2 --seed 3", (struct want){0, 1});
}

TEST(gptq_asym_desc_act_v2)
{
    gptq_case("asym-desc-v2", "--asym --desc-act --v2 --seed 4", (struct want){1, 1});
}

TEST(gptq_asym_row_group_v1)
{
    gptq_case("asym-row-v1", "--asym --group-size -1 --seed 5", (struct want){1, 0});
}

TEST(gptq_asym_desc_act_v1)
{
    gptq_case("asym-desc-v1", "--asym --desc-act --seed 6", (struct want){1, 1});
}

/* The golden-tiny checkpoint (hidden 64: one short group, so desc_act's order sorts back to
 * the identity and perm stays NULL; MLP width 172: its gate, up and down stay F32). */
TEST(gptq_golden_tiny)
{
    struct cvlm_weights *g = NULL, *f = NULL;
    REQUIRE(python());
    REQUIRE(pack(cvlm_test_data("golden-tiny/model"), "tiny", "--asym --desc-act --seed 7") == 0);
    REQUIRE(cvlm_weights_load(out_dir("gptq", "tiny"), &g) == 0);
    REQUIRE(cvlm_weights_load(out_dir("f32", "tiny"), &f) == 0);
    CHECK(check_weights(g, f, (struct want){1, 0}, "golden-tiny") == 8);
    cvlm_weights_destroy(g);
    cvlm_weights_destroy(f);
}

/* What the loader refuses, each with the tensor or option named. */
TEST(gptq_refusals)
{
    struct cvlm_weights *g = NULL;
    REQUIRE(python());
    REQUIRE(pack(source_dir(), "ref", "--seed 8") == 0);
    REQUIRE(cvlm_weights_load(out_dir("gptq", "ref"), &g) == 0);
    CHECK(cvlm_weights_quantize(g, CVLM_QUANT_INT4, 0, 1) == CVLM_EINVAL &&
          strstr(cvlm_last_error(), "GPTQ"));
    CHECK(cvlm_weights_quantize(g, CVLM_QUANT_NONE, 0, 1) == 0);
    cvlm_weights_destroy(g);
    /* a config without quantization_config: the GPTQ tensors are named */
    char cmd[1400];
    snprintf(cmd, sizeof(cmd),
             "%s -c \"import json,sys; p=sys.argv[1]+'/config.json'; c=json.load(open(p)); "
             "c.pop('quantization_config'); json.dump(c, open(p,'w'))\" '%s'",
             python(), out_dir("gptq", "ref"));
    REQUIRE(system(cmd) == 0);
    CHECK(cvlm_weights_load(out_dir("gptq", "ref"), &g) == CVLM_EFORMAT &&
          strstr(cvlm_last_error(), ".qweight"));
    /* bits 8 and group 64 are refused by the config */
    struct cvlm_config cfg;
    const char *bad[] = {"\"bits\": 8, \"group_size\": 128", "\"bits\": 4, \"group_size\": 64"};
    for (int i = 0; i < 2; i++) {
        char js[600];
        snprintf(js, sizeof(js),
                 "{\"hidden_size\": 64, \"intermediate_size\": 128, \"num_attention_heads\": 4,"
                 " \"num_hidden_layers\": 1, \"vocab_size\": 100, \"quantization_config\":"
                 " {\"quant_method\": \"gptq\", %s}}",
                 bad[i]);
        CHECKF(cvlm_config_parse(js, strlen(js), &cfg) == CVLM_EUNSUPPORTED, "%s", bad[i]);
    }
}
