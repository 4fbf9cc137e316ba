/* test_tp.c - tensor parallelism on in-process CPU ranks (cogvlm-model.md §8): TP=2 and
 * TP=4 give the same vision features and logits as TP=1 (within float tolerance: only the
 * order of the partial sums changes) and the same greedy tokens, for F32 and BF16
 * weights of a config whose heads and widths divide by 4; a TP that does not divide a
 * config is refused at load with a message naming what does not divide. */
#include "engine/error.h"
#include "engine/model/model.h"
#include "engine/model/quantize.h"
#include "tests/unit/harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* Small CogVLM: LM 4 heads (hidden 64, MLP 128), ViT 4 heads (hidden 32, MLP 64),
 * 28 px image of 14 px patches: 4 patches, 6 image slots. */
static void small_config(struct cvlm_config *c)
{
    memset(c, 0, sizeof(*c));
    *c = (struct cvlm_config){.vocab_size = 300,
                              .hidden_size = 64,
                              .intermediate_size = 128,
                              .num_layers = 2,
                              .num_heads = 4,
                              .max_position_embeddings = 256,
                              .rms_norm_eps = 1e-5f,
                              .rope_theta = 10000.0f,
                              .bos_token_id = 1,
                              .eos_token_id = 2,
                              .template_version = CVLM_TEMPLATE_CHAT,
                              .has_vision = 1};
    c->vision = (struct cvlm_vision_config){.image_size = 28,
                                            .patch_size = 14,
                                            .in_channels = 3,
                                            .hidden_size = 32,
                                            .num_heads = 4,
                                            .num_layers = 2,
                                            .intermediate_size = 64,
                                            .num_positions = 5,
                                            .layer_norm_eps = 1e-6f};
}

#define T_PROMPT 12
#define N_DECODE 4
#define IMG_TOKENS 6

struct tp_run {
    float *feats;  /* [IMG_TOKENS, hidden] */
    float *vit;    /* [num_positions, vision hidden] */
    float *logits; /* [T_PROMPT + N_DECODE, vocab]: the prompt's rows, then each step's */
    int32_t tokens[N_DECODE];
};

/* Prompt: BOS, the image (vision expert), text; then greedy decoding token by token. */
static int run(struct cvlm_weights *w, int tp, struct tp_run *out)
{
    const struct cvlm_config *c = &w->cfg;
    int V = c->vocab_size, D = c->hidden_size, rc;
    struct cvlm_model_opts o = {
        .max_tokens = 32, .block_size = 4, .kv_blocks = 8, .tp = tp, .threads = 2};
    struct cvlm_model *m = NULL;
    struct cvlm_feats *f = NULL;
    float px[3 * 28 * 28];
    int32_t ids[T_PROMPT], pos[T_PROMPT], seq[T_PROMPT] = {0}, slot[T_PROMPT], img[T_PROMPT];
    uint8_t expert[T_PROMPT], want[T_PROMPT];
    int32_t bt[8] = {3, 0, 6, 1, 7, 2, 5, 4};
    struct cvlm_seq_kv kv = {bt, 8};
    if ((rc = cvlm_model_create(w, &o, &m)))
        return rc;
    for (int i = 0; i < 3 * 28 * 28; i++)
        px[i] = (float)((i * 37) % 255) / 127.0f - 1.0f;
    rc =
        (f = cvlm_model_feats_alloc(m)) ? cvlm_model_encode_image(m, px, f, out->vit) : CVLM_ENOMEM;
    if (rc)
        goto out;
    cvlm_model_feats_to_host(m, f, out->feats);
    for (int t = 0; t < T_PROMPT; t++) {
        int im = t >= 1 && t <= IMG_TOKENS;
        ids[t] = t == 0 ? 1 : 3 + (t * 53) % (V - 3);
        img[t] = im ? t - 1 : -1;
        expert[t] = im ? CVLM_EXPERT_VISION : CVLM_EXPERT_LANG;
        pos[t] = t <= 1 ? t : t <= IMG_TOKENS - 1 ? 2 : t - IMG_TOKENS + 3; /* interior share one */
        slot[t] = t;
        want[t] = 1;
    }
    const struct cvlm_feats *fs[1] = {f};
    struct cvlm_batch b = {.n_tokens = T_PROMPT,
                           .ids = ids,
                           .pos = pos,
                           .expert = expert,
                           .seq = seq,
                           .slot = slot,
                           .img_row = img,
                           .img_feats = fs,
                           .seqs = &kv,
                           .n_seqs = 1,
                           .want_logits = want};
    if ((rc = cvlm_model_forward(m, &b, out->logits)))
        goto out;
    const float *last = out->logits + (size_t)(T_PROMPT - 1) * V;
    for (int k = 0; k < N_DECODE; k++) {
        int best = 0;
        for (int v = 1; v < V; v++)
            best = last[v] > last[best] ? v : best;
        out->tokens[k] = best;
        int32_t id = best, p = pos[T_PROMPT - 1] + 1 + k, s = T_PROMPT + k, z = 0, noimg = -1;
        uint8_t ex = CVLM_EXPERT_LANG;
        struct cvlm_batch d = {.n_tokens = 1,
                               .ids = &id,
                               .pos = &p,
                               .expert = &ex,
                               .seq = &z,
                               .slot = &s,
                               .img_row = &noimg,
                               .seqs = &kv,
                               .n_seqs = 1};
        float *row = out->logits + (size_t)(T_PROMPT + k) * V;
        if ((rc = cvlm_model_forward(m, &d, row)))
            goto out;
        last = row;
    }
    (void)D;
out:
    cvlm_model_feats_free(m, f);
    cvlm_model_destroy(m);
    return rc;
}

static void alloc_run(struct tp_run *r, const struct cvlm_config *c)
{
    r->feats = calloc((size_t)IMG_TOKENS * c->hidden_size, sizeof(float));
    r->vit = calloc((size_t)c->vision.num_positions * c->vision.hidden_size, sizeof(float));
    r->logits = calloc((size_t)(T_PROMPT + N_DECODE) * c->vocab_size, sizeof(float));
}

static void free_run(struct tp_run *r)
{
    free(r->feats);
    free(r->vit);
    free(r->logits);
}

/* TP ranks against one rank, weights of dtype dt, quantized by q (with the vision tower
 * for int8; int4 groups of 128 need the wider language model, and tp 4 must be refused).
 * Quantized weights run on the scalar kernels: the AVX2 ones round x to int8 per block of
 * 32 for few rows (kernels/cpu/q_dot_avx2.c), per rank over its own slice of x, so a
 * rank whose slice is not whole blocks, or a last-bit difference upstream that moves a
 * value across a rounding boundary, differs from one rank by that rounding (~1e-3), not
 * by the order of the sums. The sharding itself is what this test checks. */
static void check_dtype_q(enum cvlm_dtype dt, enum cvlm_quant q)
{
    struct cvlm_config c;
    struct cvlm_weights *w = NULL;
    struct tp_run ref, got;
    char *isa = getenv("COGVLM_CPU_ISA") ? strdup(getenv("COGVLM_CPU_ISA")) : NULL;
    if (q != CVLM_QUANT_NONE)
        setenv("COGVLM_CPU_ISA", "scalar", 1);
    small_config(&c);
    if (q == CVLM_QUANT_INT4) {
        c.hidden_size = 256;
        c.intermediate_size = 512;
    }
    REQUIRE(cvlm_weights_dummy(&c, dt, 7, &w) == 0);
    REQUIRE(cvlm_weights_quantize(w, q, q == CVLM_QUANT_INT8, 1) == 0);
    if (q == CVLM_QUANT_INT4) {
        struct cvlm_weights *sh = NULL;
        CHECK(w->layers[0].qkv[0].dtype == CVLM_DTYPE_Q4);
        CHECK(cvlm_weights_shard(w, 1, 4, &sh) == CVLM_EINVAL &&
              strstr(cvlm_last_error(), "int4 groups"));
        cvlm_weights_destroy(sh);
    }
    alloc_run(&ref, &c);
    alloc_run(&got, &c);
    REQUIRE(run(w, 1, &ref) == 0);
    for (int tp = 2; tp <= (q == CVLM_QUANT_INT4 ? 2 : 4); tp *= 2) {
        CHECKF(run(w, tp, &got) == 0, "tp %d: %s", tp, cvlm_last_error());
        double ev = cvlm_test_max_rel(got.vit, ref.vit,
                                      (size_t)c.vision.num_positions * c.vision.hidden_size);
        double ef = cvlm_test_max_rel(got.feats, ref.feats, (size_t)IMG_TOKENS * c.hidden_size);
        double el =
            cvlm_test_max_rel(got.logits, ref.logits, (size_t)(T_PROMPT + N_DECODE) * c.vocab_size);
        CHECKF(ev < 5e-5 && ef < 1e-5 && el < 1e-5,
               "%s tp %d vs 1: vit %.3g, features %.3g, logits %.3g", cvlm_dtype_name(dt), tp, ev,
               ef, el);
        CHECKF(!memcmp(got.tokens, ref.tokens, sizeof(ref.tokens)), "%s tp %d: greedy tokens",
               cvlm_dtype_name(dt), tp);
        /* not trivially equal: the model's outputs depend on the weights at all */
        CHECK(fabs(ref.logits[0] - ref.logits[1]) > 0);
    }
    free_run(&ref);
    free_run(&got);
    cvlm_weights_destroy(w);
    if (isa)
        setenv("COGVLM_CPU_ISA", isa, 1);
    else
        unsetenv("COGVLM_CPU_ISA");
    free(isa);
}

static void check_dtype(enum cvlm_dtype dt)
{
    check_dtype_q(dt, CVLM_QUANT_NONE);
}

TEST(tp_cpu_ranks_match_one_rank_f32)
{
    check_dtype(CVLM_DTYPE_F32);
}

/* quantized weights shard with their scales (rows) or groups (columns) */
TEST(tp_cpu_ranks_match_one_rank_int8_int4)
{
    check_dtype_q(CVLM_DTYPE_BF16, CVLM_QUANT_INT8);
    check_dtype_q(CVLM_DTYPE_BF16, CVLM_QUANT_INT4);
}

TEST(tp_cpu_ranks_match_one_rank_bf16)
{
    check_dtype(CVLM_DTYPE_BF16);
}

TEST(tp_refuses_what_does_not_divide)
{
    struct cvlm_config c;
    struct cvlm_weights *w = NULL;
    struct cvlm_model *m = NULL;
    struct cvlm_model_opts o = {.max_tokens = 8, .tp = 3, .threads = 1};
    small_config(&c);
    REQUIRE(cvlm_weights_dummy(&c, CVLM_DTYPE_F32, 1, &w) == 0);
    CHECK(cvlm_model_create(w, &o, &m) == CVLM_EINVAL && !m);
    CHECKF(strstr(cvlm_last_error(), "language model") != NULL, "%s", cvlm_last_error());
    /* LM divides by 2, the ViT's 4 heads do not divide by 8 */
    o.tp = 8;
    c.num_heads = 8;
    c.intermediate_size = 128;
    cvlm_weights_destroy(w);
    REQUIRE(cvlm_weights_dummy(&c, CVLM_DTYPE_F32, 1, &w) == 0);
    CHECK(cvlm_model_create(w, &o, &m) == CVLM_EINVAL && !m);
    CHECKF(strstr(cvlm_last_error(), "vision tower") != NULL, "%s", cvlm_last_error());
    o.tp = 9;
    CHECK(cvlm_model_create(w, &o, &m) == CVLM_EINVAL && !m);
    cvlm_weights_destroy(w);
}

/* The shard of rank r holds exactly its rows / columns of each split matrix. */
TEST(tp_shard_slices)
{
    struct cvlm_config c;
    struct cvlm_weights *w = NULL, *s = NULL;
    small_config(&c);
    REQUIRE(cvlm_weights_dummy(&c, CVLM_DTYPE_F32, 3, &w) == 0);
    REQUIRE(cvlm_weights_shard(w, 1, 2, &s) == 0);
    int D = c.hidden_size, I = c.intermediate_size;
    const struct cvlm_lm_layer *L = &w->layers[1], *Ls = &s->layers[1];
    const float *qkv = L->qkv[1].data, *qs = Ls->qkv[1].data;
    CHECK(Ls->qkv[1].shape[0] == 3 * D / 2 && Ls->dense[0].shape[1] == D / 2 &&
          Ls->gate[0].shape[0] == I / 2 && Ls->down[1].shape[1] == I / 2);
    /* k block, rank 1: rows D + D/2 .. 2D of the full matrix */
    CHECK(!memcmp(qs + (size_t)(D / 2) * D, qkv + (size_t)(D + D / 2) * D, sizeof(float) * D));
    const float *dn = L->down[1].data, *ds = Ls->down[1].data;
    CHECK(ds[3 * (I / 2) + 5] == dn[3 * I + I / 2 + 5]);
    CHECK(!s->lm_head.data && !s->vit[0].dense_b.data && s->vit[0].fc1_b.shape[0] == 32);
    cvlm_weights_destroy(s);
    cvlm_weights_destroy(w);
}

/* Runs a command, returns its exit status and whether its output contains `want`. */
static int run_cmd(const char *cmd, const char *want, int *found)
{
    char line[1024];
    FILE *p = popen(cmd, "r");
    *found = 0;
    if (!p)
        return -1;
    while (fgets(line, sizeof(line), p))
        *found |= strstr(line, want) != NULL;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Bad placement options are refused with a message, by the CLI and by the server (before
 * or at load), never run with a wrong split. */
TEST(tp_bad_options_refused)
{
    const char *cli = getenv("COGVLM_BIN"), *srv = getenv("COGVLM_SERVER_BIN");
    const char *model = cvlm_test_data("golden-tiny/model");
    char cmd[2048];
    int found;
    REQUIRE(cli && srv);
    snprintf(cmd, sizeof(cmd), "%s run --prompt hi --model %s --tp 0 2>&1", cli, model);
    CHECK(run_cmd(cmd, "bad value '0' for --tp", &found) == 2 && found);
    snprintf(cmd, sizeof(cmd), "%s bench-vlm --backend gpu 2>&1", cli);
    CHECK(run_cmd(cmd, "--backend must be cpu or cuda", &found) == 2 && found);
    snprintf(cmd, sizeof(cmd), "%s --backend tpu --port 0 2>&1", srv);
    CHECK(run_cmd(cmd, "--backend must be cpu or cuda", &found) == 2 && found);
    snprintf(cmd, sizeof(cmd), "%s --tp 9 --port 0 2>&1", srv);
    CHECK(run_cmd(cmd, "tp (--tp): 9 is out of range: 1 to 8", &found) == 2 && found);
    snprintf(cmd, sizeof(cmd), "%s --model %s --tokenizer %s --tp 3 --port 0 2>&1", srv, model,
             cvlm_test_data("llama2-tokenizer.model"));
    CHECK(run_cmd(cmd, "does not divide the language model", &found) == 1 && found);
    snprintf(cmd, sizeof(cmd), "%s --model %s --tokenizer %s --backend cuda --port 0 2>&1", srv,
             model, cvlm_test_data("llama2-tokenizer.model"));
    CHECK(run_cmd(cmd, "not built with CUDA", &found) == 1 && found);
}

/* `cogvlm bench-vlm --preset cogvlm2-19b`: the cogvlm2-llama3-chat-19B shapes (2306 image
 * slots, the 117-TFLOP tower: its 63 layers' FLOPs from the shapes, without weights), and
 * a whole run (vision, prefill, decode) of a CogVLM2 config with int4 weights generated
 * as codes; a tiny config, as the 19B preset takes minutes per layer on a CPU. */
TEST(cli_bench_vlm_cogvlm2_preset)
{
    const char *cli = getenv("COGVLM_BIN");
    char cmd[2048];
    int found;
    REQUIRE(cli);
    snprintf(cmd, sizeof(cmd),
             "%s bench-vlm --preset cogvlm2-19b --layers 1 --vit-layers 1 --dry-run 2>&1", cli);
    CHECK(run_cmd(cmd, "image slots           2306 (boi + 2304 + eoi)", &found) == 0 && found);
    CHECK(run_cmd(cmd, "1 ViT layer x 1.9 TFLOP + 924.2 GFLOP", &found) == 0 && found);
    CHECK(run_cmd(cmd, "all 63 layers: 118.1 TFLOP", &found) == 0 && found);
    CHECK(run_cmd(cmd, "32 query / 8 KV heads, MLP 14336, vocab 128256", &found) == 0 && found);
    snprintf(cmd, sizeof(cmd), "%s bench-vlm --dry-run 2>&1", cli);
    CHECK(run_cmd(cmd, "image slots           1227", &found) == 0 && found);
    snprintf(cmd, sizeof(cmd),
             "%s bench-vlm --config %s --quantize int4 --batch 1,2 --decode-steps 2 "
             "--warmup 0 --threads 1 2>&1",
             cli, cvlm_test_data("golden-cogvlm2-tiny/model/config.json"));
    CHECK(run_cmd(cmd, "decode batch   2", &found) == 0 && found);
    CHECK(run_cmd(cmd, "image slots           6 (boi + 4 + eoi)", &found) == 0 && found);
    snprintf(cmd, sizeof(cmd), "%s bench-vlm --preset cogvlm3 --dry-run 2>&1", cli);
    CHECK(run_cmd(cmd, "unknown preset 'cogvlm3'", &found) == 1 && found);
}
