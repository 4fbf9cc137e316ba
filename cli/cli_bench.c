/* cli_bench.c - `cogvlm bench`: CPU throughput on random weights of a given shape.
 *
 * Builds dummy weights (engine/model/weights_dummy.c) for a preset or a config.json, creates
 * the CPU backend and the model, and measures, in one run:
 * - the machine (cli_bench_probe.c): memory bandwidth (memcpy, and the best read-only
 *   pass), the FMA peak of the CPU backend's instruction set, and the backend's GEMM at a
 *   prefill shape (512 x 2048 x 2048) and a batched-decode shape (16 rows) in GFLOP/s;
 * - prefill: one forward of a --prompt-tokens random prompt (tokens/s, GFLOP/s);
 * - decode: --decode-tokens greedy steps after it, each one token (tokens/s), and the
 *   weight bandwidth that implies (bytes of weights one decode step reads / step time);
 * - the vision tower: one image through a ViT with the 17B config's per-layer shapes
 *   (hidden 1792, 16 heads, MLP 15360, 490 px / patch 14 = 1225 patches + CLS) and only
 *   --vision-layers layers, in GFLOP/s; a tiny language model carries the adapter.
 * --write-checkpoint DIR saves the text model's weights (config.json + safetensors) so
 * tools/bench/ can run llama.cpp on exactly the same weights.
 */
#include "base/clock.h"
#include "cli/cli.h"
#include "cli/cli_bench_probe.h"
#include "engine/error.h"
#include "engine/model/model.h"
#include "engine/model/quantize.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct bench_opts {
    const char *preset, *config, *json, *ckpt, *logits_out;
    enum cvlm_dtype dtype;
    struct cvlm_model_opts mo; /* backend, tp, threads */
    enum cvlm_quant quant;     /* --quantize: the decoder's linear weights after they exist */
    int quant_lm_head;         /* --quantize-lm-head (default true): lm_head int8 too */
    int threads, prompt, decode, vit_layers;
    uint64_t seed;
};

struct bench_result {
    double bw_copy, bw_read;            /* GB/s */
    double t_init, t_prefill, t_decode; /* seconds */
    double prefill_flop, weight_bytes;  /* per prompt / per decode step */
    double kv_bytes;                    /* KV cache read by an average decode step */
    double t_vit, vit_flop, vit_layer_flop;
    double fma_peak;                   /* GFLOP/s, register-only FMA loop */
    double gemm_gflops, gemm16_gflops; /* 512 and 16 rows x 2048 x 2048, the bench dtype */
    int threads;
};

/* Seconds of the monotonic clock. */
static double now_s(void)
{
    return cvlm_now_ms() / 1e3;
}

/* ---- presets ------------------------------------------------------------------------ */

static void lm_shape(struct cvlm_config *c, int V, int D, int L, int H, int I)
{
    memset(c, 0, sizeof(*c));
    c->vocab_size = V;
    c->hidden_size = D;
    c->num_layers = L;
    c->num_heads = H;
    c->intermediate_size = I;
    c->max_position_embeddings = 4096;
    c->rms_norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->bos_token_id = 1;
    c->eos_token_id = 2;
    c->template_version = CVLM_TEMPLATE_BASE;
}

/* The 17B vision tower's shapes with `layers` layers. */
static void vit_17b(struct cvlm_config *c, int layers)
{
    struct cvlm_vision_config *v = &c->vision;
    c->has_vision = 1;
    v->image_size = 490;
    v->patch_size = 14;
    v->in_channels = 3;
    v->hidden_size = 1792;
    v->num_heads = 16;
    v->num_layers = layers;
    v->intermediate_size = 15360;
    v->num_positions = 35 * 35 + 1;
    v->layer_norm_eps = 1e-6f;
}

static int preset(const char *name, int vit_layers, struct cvlm_config *c)
{
    if (!strcmp(name, "llama-2048")) { /* TinyLlama-1.1B's shapes, full multi-head attn */
        lm_shape(c, 32000, 2048, 22, 32, 5632);
    } else if (!strcmp(name, "llama-small")) { /* quick smoke runs */
        lm_shape(c, 32000, 512, 4, 8, 1376);
    } else if (!strcmp(name, "cogvlm-17b-l2")) { /* two 17B decoder layers + 17B ViT shapes */
        lm_shape(c, 32000, 4096, 2, 32, 11008);
        vit_17b(c, vit_layers > 0 ? vit_layers : 1);
    } else if (!strcmp(name, "vit-17b")) { /* 17B ViT shapes, tiny LM for the adapter */
        lm_shape(c, 1024, 512, 1, 8, 1024);
        vit_17b(c, vit_layers > 0 ? vit_layers : 1);
    } else {
        return cvlm_errf(CVLM_EINVAL,
                         "unknown preset '%s' (llama-2048, llama-small, "
                         "cogvlm-17b-l2, vit-17b)",
                         name);
    }
    return 0;
}

/* ---- options ------------------------------------------------------------------------ */

static int usage(int rc)
{
    fprintf(
        rc ? stderr : stdout,
        "usage: cogvlm bench [--preset NAME | --config config.json] [--dtype bf16|f16|f32]\n"
        "                    [--threads N] [--prompt-tokens 512] [--decode-tokens 64]\n"
        "                    [--vision-layers 4] [--seed S] [--json FILE]\n"
        "                    [--write-checkpoint DIR] [--logits-out FILE]\n"
        "                    [--quantize none|int8|int4] [--quantize-lm-head true|false]\n"
        "                    " CVLM_CLI_MODEL_USAGE "\n"
        "Presets: llama-2048 (default; LLaMA-shaped, hidden 2048, 22 layers, 32 heads,\n"
        "MLP 5632, vocab 32000), llama-small, cogvlm-17b-l2, vit-17b.\n"
        "--vision-layers 0 skips the vision tower; --prompt-tokens 0 skips the text\n"
        "model. --write-checkpoint saves the text model's random weights;\n"
        "--logits-out writes the last prompt token's logits (raw float32).\n"
        "--quantize: the decoder's linear weights to int8 / int4 after the random 16-bit\n"
        "weights are made (and saved): the text model only; lm_head int8 too unless\n"
        "--quantize-lm-head false.\n"
        "On --backend cuda the random weights are generated on the device.\n" CVLM_CLI_MODEL_HELP);
    return rc;
}

static int parse_dtype(const char *s, enum cvlm_dtype *dt)
{
    if (!strcmp(s, "bf16"))
        *dt = CVLM_DTYPE_BF16;
    else if (!strcmp(s, "f16"))
        *dt = CVLM_DTYPE_F16;
    else if (!strcmp(s, "f32"))
        *dt = CVLM_DTYPE_F32;
    else
        return -1;
    return 0;
}

static int parse(int argc, char **argv, struct bench_opts *o)
{
    *o = (struct bench_opts){.preset = "llama-2048",
                             .quant_lm_head = 1,
                             .dtype = CVLM_DTYPE_BF16,
                             .prompt = 512,
                             .decode = 64,
                             .vit_layers = 4,
                             .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *a, *v;
        int k = cvlm_cli_arg(argc, argv, &i, &o->mo, &a, &v);
        if (k != 1) {
            if (k)
                return k == 2 ? 1 : -1;
            continue;
        }
        if (!strcmp(a, "--preset"))
            o->preset = v;
        else if (!strcmp(a, "--config"))
            o->config = v;
        else if (!strcmp(a, "--dtype")) {
            if (parse_dtype(v, &o->dtype))
                return -1;
        } else if (!strcmp(a, "--prompt-tokens"))
            o->prompt = atoi(v);
        else if (!strcmp(a, "--decode-tokens"))
            o->decode = atoi(v);
        else if (!strcmp(a, "--vision-layers"))
            o->vit_layers = atoi(v);
        else if (!strcmp(a, "--seed"))
            o->seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--json"))
            o->json = v;
        else if (!strcmp(a, "--write-checkpoint"))
            o->ckpt = v;
        else if (!strcmp(a, "--logits-out"))
            o->logits_out = v;
        else if (!strcmp(a, "--quantize")) {
            if (cvlm_quant_parse(v, &o->quant))
                return -1;
        } else if (!strcmp(a, "--quantize-lm-head")) {
            if (cvlm_cli_bool(a, v, &o->quant_lm_head))
                return -1;
        } else
            return -1;
    }
    o->threads = o->mo.threads;
    if (o->threads < 0 || o->prompt < 0 || o->decode < 0 || o->vit_layers < 0 ||
        o->vit_layers > 63 || (o->decode > 0 && o->prompt == 0))
        return -1;
    return 0;
}

/* ---- text model: prefill and decode ------------------------------------------------- */

/* Bytes a tensor streams (quantized: codes and scales). */
static size_t tensor_bytes(const struct cvlm_tensor *t)
{
    if (!t->data)
        return 0;
    if (cvlm_dtype_is_quant(t->dtype))
        return cvlm_quant_bytes(t->dtype, t->shape[0], t->shape[1]);
    return cvlm_tensor_bytes(t);
}

/* Bytes of weights one language-expert decode step reads. */
static double decode_weight_bytes(const struct cvlm_weights *w)
{
    const struct cvlm_config *c = &w->cfg;
    double b = (double)tensor_bytes(&w->final_norm) + (double)tensor_bytes(&w->lm_head) +
               (double)c->hidden_size * cvlm_dtype_size(w->embed.dtype);
    for (int l = 0; l < c->num_layers; l++) {
        const struct cvlm_lm_layer *L = &w->layers[l];
        b += (double)(tensor_bytes(&L->input_norm) + tensor_bytes(&L->post_norm) +
                      tensor_bytes(&L->qkv[0]) + tensor_bytes(&L->dense[0]) +
                      tensor_bytes(&L->gate[0]) + tensor_bytes(&L->up[0]) +
                      tensor_bytes(&L->down[0]));
    }
    return b;
}

/* Matrix FLOPs of a T-token prefill from position 0 (2 per multiply-add), causal attn. */
static double prefill_flop(const struct cvlm_config *c, int T)
{
    double D = c->hidden_size, I = c->intermediate_size, L = c->num_layers;
    double per_tok = L * (4 * D * D + 3 * D * I) * 2;
    double attn = L * 2.0 * 2.0 * D * ((double)T * (T + 1) / 2);
    return per_tok * T + attn + 2.0 * D * c->vocab_size; /* logits of the last token */
}

struct text_run {
    struct cvlm_model *m;
    int32_t *ids, *pos, *seq, *slot, *blocks;
    uint8_t *expert;
    float *logits;
    int n_blocks;
};

/* Runs tokens [from, from + n) of the run's arrays (slot = position = index). */
static int step(struct text_run *t, int from, int n)
{
    struct cvlm_seq_kv kv = {t->blocks, t->n_blocks};
    struct cvlm_batch b = {.n_tokens = n,
                           .ids = t->ids + from,
                           .pos = t->pos + from,
                           .expert = t->expert + from,
                           .seq = t->seq + from,
                           .slot = t->slot + from,
                           .seqs = &kv,
                           .n_seqs = 1};
    return cvlm_model_forward(t->m, &b, t->logits);
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = v[i] > v[best] ? i : best;
    return best;
}

static int alloc_run(struct text_run *t, const struct cvlm_config *c, int total)
{
    t->ids = calloc((size_t)total, sizeof(int32_t));
    t->pos = calloc((size_t)total, sizeof(int32_t));
    t->seq = calloc((size_t)total, sizeof(int32_t));
    t->slot = calloc((size_t)total, sizeof(int32_t));
    t->expert = calloc((size_t)total, 1);
    t->blocks = calloc((size_t)t->n_blocks, sizeof(int32_t));
    t->logits = malloc((size_t)c->vocab_size * sizeof(float));
    if (!t->ids || !t->pos || !t->seq || !t->slot || !t->expert || !t->blocks || !t->logits)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (int i = 0; i < t->n_blocks; i++)
        t->blocks[i] = i;
    for (int i = 0; i < total; i++) {
        t->pos[i] = t->slot[i] = i;
        t->ids[i] = 3 + (int32_t)(((uint32_t)i * 2654435761u) % (uint32_t)(c->vocab_size - 3));
    }
    return 0;
}

static void free_run(struct text_run *t)
{
    free(t->ids);
    free(t->pos);
    free(t->seq);
    free(t->slot);
    free(t->expert);
    free(t->blocks);
    free(t->logits);
}

static int save_floats(const char *path, const float *v, int n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return cvlm_errf(CVLM_EIO, "%s: cannot create", path);
    size_t ok = fwrite(v, sizeof(float), (size_t)n, f);
    if (fclose(f) || ok != (size_t)n)
        return cvlm_errf(CVLM_EIO, "%s: write failed", path);
    return 0;
}

static int time_text(const struct bench_opts *o, struct cvlm_model *m, const struct cvlm_config *c,
                     struct bench_result *r)
{
    int P = o->prompt, total = P + o->decode, rc, bs = cvlm_model_block_size(m);
    struct text_run t = {.m = m, .n_blocks = cvlm_model_kv_blocks(m)};
    if (t.n_blocks * bs < total)
        return cvlm_errf(CVLM_EINVAL, "KV cache too small");
    if ((rc = alloc_run(&t, c, total)))
        goto out;
    /* warm-up: grows scratch, faults in the arena and the KV cache */
    if ((rc = step(&t, 0, P < 64 ? P : 64)))
        goto out;
    double t0 = now_s();
    if ((rc = step(&t, 0, P)))
        goto out;
    r->t_prefill = now_s() - t0;
    if (o->logits_out && (rc = save_floats(o->logits_out, t.logits, c->vocab_size)))
        goto out;
    t0 = now_s();
    for (int k = 0; k < o->decode; k++) {
        t.ids[P + k] = argmax(t.logits, c->vocab_size);
        if ((rc = step(&t, P + k, 1)))
            goto out;
    }
    r->t_decode = now_s() - t0;
out:
    free_run(&t);
    return rc;
}

static int load_config(const struct bench_opts *o, struct cvlm_config *c)
{
    if (o->config)
        return cvlm_config_load(o->config, c);
    return preset(o->preset, o->vit_layers, c);
}

/* Host random weights, or, with nothing to save, shapes only: generated on the device
 * (CUDA), or quantized, as random codes directly (--quantize: the speed is the same and the
 * 16-bit weights and their rounding, minutes for a 1.1B model, are skipped). */
static int dummy_weights(const struct bench_opts *o, const struct cvlm_config *c, uint64_t seed,
                         struct cvlm_weights **w)
{
    if ((o->mo.backend == CVLM_BACKEND_CUDA || o->quant) && !o->ckpt && !o->logits_out)
        return cvlm_weights_dummy_lazy(c, o->dtype, w);
    return cvlm_weights_dummy(c, o->dtype, seed, w);
}

static int bench_text(const struct bench_opts *o, struct bench_result *r)
{
    struct cvlm_config c;
    struct cvlm_weights *w = NULL;
    struct cvlm_backend *be;
    struct cvlm_model *m = NULL;
    int rc, bs = 16;
    if ((rc = load_config(o, &c)))
        return rc;
    double t0 = now_s();
    if ((rc = dummy_weights(o, &c, o->seed, &w)))
        return rc;
    if ((o->ckpt && (rc = cvlm_weights_write(w, o->ckpt))) ||
        (rc = cvlm_weights_quantize(w, o->quant, 0, o->quant_lm_head)))
        goto out;
    struct cvlm_model_opts mo = o->mo;
    mo.max_tokens = o->prompt;
    mo.block_size = bs;
    mo.kv_blocks = (o->prompt + o->decode + bs) / bs;
    if ((rc = cvlm_model_create(w, &mo, &m)))
        goto out;
    r->t_init = now_s() - t0; /* includes generating or uploading the weights */
    be = cvlm_model_backend(m);
    r->threads = be->n_threads * cvlm_model_tp(m);
    r->weight_bytes = decode_weight_bytes(w);
    /* keys + values of every layer at the mean context of the decode steps, in the KV dtype
     * (int8: + its F32 scale per head_dim codes) */
    enum cvlm_dtype kvt = cvlm_model_kv_dtype(m);
    double kes = (double)cvlm_dtype_size(kvt) +
                 (kvt == CVLM_DTYPE_Q8 ? 4.0 / cvlm_config_head_dim(&c) : 0.0);
    r->kv_bytes = 2.0 * c.num_layers * c.hidden_size * kes * (o->prompt + (o->decode + 1) / 2.0);
    r->prefill_flop = prefill_flop(&c, o->prompt);
    rc = time_text(o, m, &c, r);
out:
    cvlm_model_destroy(m);
    cvlm_weights_destroy(w);
    return rc;
}

/* ---- vision tower ------------------------------------------------------------------- */

static void vit_flops(const struct cvlm_config *c, struct bench_result *r)
{
    const struct cvlm_vision_config *v = &c->vision;
    double np = cvlm_config_num_patches(c), N = np + 1, d = v->hidden_size;
    double F = v->intermediate_size, D = c->hidden_size, I = c->intermediate_size;
    double P2C = (double)v->in_channels * v->patch_size * v->patch_size;
    r->vit_layer_flop = 2 * N * (4 * d * d + 2 * d * F) + 4 * N * N * d;
    r->vit_flop = r->vit_layer_flop * v->num_layers + 2 * np * d * P2C +
                  2 * np * (d * D + 3 * D * I); /* patch embedding, adapter */
}

static int bench_vision(const struct bench_opts *o, struct bench_result *r)
{
    struct cvlm_config c;
    struct cvlm_weights *w = NULL;
    struct cvlm_model *m = NULL;
    float *px = NULL;
    struct cvlm_feats *feats = NULL;
    int rc;
    if ((rc = preset("vit-17b", o->vit_layers, &c)) || (rc = dummy_weights(o, &c, o->seed + 1, &w)))
        return rc;
    size_t npx = (size_t)3 * c.vision.image_size * c.vision.image_size;
    if (!(px = malloc(npx * sizeof(float)))) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto out;
    }
    struct cvlm_model_opts mo = o->mo;
    mo.max_tokens = 16;
    if ((rc = cvlm_model_create(w, &mo, &m)))
        goto out;
    for (size_t i = 0; i < npx; i++)
        px[i] = (float)((i * 7919) % 256) / 128.0f - 1.0f;
    if (!(feats = cvlm_model_feats_alloc(m))) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto out;
    }
    if ((rc = cvlm_model_encode_image(m, px, feats, NULL))) /* warm-up */
        goto out;
    double t0 = now_s();
    rc = cvlm_model_encode_image(m, px, feats, NULL);
    r->t_vit = now_s() - t0;
    vit_flops(&c, r);
out:
    if (feats)
        cvlm_model_feats_free(m, feats);
    cvlm_model_destroy(m);
    cvlm_weights_destroy(w);
    free(px);
    return rc;
}

/* ---- report ------------------------------------------------------------------------- */

static void report(const struct bench_opts *o, const struct bench_result *r, FILE *f)
{
    const char *dt = cvlm_dtype_name(o->dtype);
    fprintf(f, "cogvlm bench: %s, %s weights%s%s, %d threads\n", o->config ? o->config : o->preset,
            dt, o->quant ? " quantized to " : "", o->quant ? cvlm_quant_name(o->quant) : "",
            r->threads);
    fprintf(f, "  memory bandwidth      copy %.1f GB/s (read+write), read %.1f GB/s\n", r->bw_copy,
            r->bw_read);
    fprintf(f, "  FMA peak (%s)%*s%.1f GFLOP/s\n", cvlm_backend_cpu_isa(),
            (int)(10 - strlen(cvlm_backend_cpu_isa())), "", r->fma_peak);
    fprintf(f, "  GEMM 512x2048x2048    %.1f GFLOP/s (%.0f%% of FMA peak)\n", r->gemm_gflops,
            100.0 * r->gemm_gflops / r->fma_peak);
    fprintf(f, "  GEMM  16x2048x2048    %.1f GFLOP/s (%.0f%% of FMA peak)\n", r->gemm16_gflops,
            100.0 * r->gemm16_gflops / r->fma_peak);
    if (o->prompt > 0) {
        fprintf(f, "  weights init          %.1f s\n", r->t_init);
        fprintf(f, "  prefill %4d tokens    %.1f tokens/s  (%.1f GFLOP/s, %.2f s)\n", o->prompt,
                o->prompt / r->t_prefill, r->prefill_flop / r->t_prefill / 1e9, r->t_prefill);
    }
    if (o->decode > 0) {
        double step = r->t_decode / o->decode;
        fprintf(f, "  decode  %4d tokens    %.2f tokens/s  (%.1f ms/token)\n", o->decode,
                1.0 / step, step * 1e3);
        fprintf(f, "  decode weight stream  %.1f GB/s of %.2f GB/token (%.0f%% of read bw)\n",
                r->weight_bytes / step / 1e9, r->weight_bytes / 1e9,
                100.0 * r->weight_bytes / step / 1e9 / r->bw_read);
        fprintf(f, "  + KV cache reads      %.1f GB/s in all (%.3f GB/token of keys/values)\n",
                (r->weight_bytes + r->kv_bytes) / step / 1e9, r->kv_bytes / 1e9);
    }
    if (o->vit_layers > 0)
        fprintf(f,
                "  vision tower          %d of 63 layers (17B shapes): %.2f s, %.1f GFLOP/s "
                "(%.1f GFLOP; est. 63 layers %.1f s)\n",
                o->vit_layers, r->t_vit, r->vit_flop / r->t_vit / 1e9, r->vit_flop / 1e9,
                r->t_vit *
                    (63.0 * r->vit_layer_flop + r->vit_flop - o->vit_layers * r->vit_layer_flop) /
                    r->vit_flop);
}

static int write_json(const struct bench_opts *o, const struct bench_result *r)
{
    FILE *f = fopen(o->json, "w");
    double step = o->decode > 0 ? r->t_decode / o->decode : 0;
    if (!f)
        return cvlm_errf(CVLM_EIO, "%s: cannot create", o->json);
    fprintf(f,
            "{\"model\": \"%s\", \"dtype\": \"%s\", \"quantize\": \"%s\", \"threads\": %d,"
            " \"isa\": \"%s\",\n",
            o->config ? o->config : o->preset, cvlm_dtype_name(o->dtype), cvlm_quant_name(o->quant),
            r->threads, cvlm_backend_cpu_isa());
    fprintf(f, " \"fma_peak_gflops\": %.3f, \"gemm_gflops\": %.3f, \"gemm16_gflops\": %.3f,\n",
            r->fma_peak, r->gemm_gflops, r->gemm16_gflops);
    fprintf(f, " \"copy_gbs\": %.3f, \"read_gbs\": %.3f,\n", r->bw_copy, r->bw_read);
    fprintf(f,
            " \"prompt_tokens\": %d, \"prefill_s\": %.6f, \"prefill_tok_s\": %.3f,"
            " \"prefill_gflops\": %.3f,\n",
            o->prompt, r->t_prefill, r->t_prefill > 0 ? o->prompt / r->t_prefill : 0,
            r->t_prefill > 0 ? r->prefill_flop / r->t_prefill / 1e9 : 0);
    fprintf(f,
            " \"decode_tokens\": %d, \"decode_s\": %.6f, \"decode_tok_s\": %.3f,"
            " \"decode_weight_gb\": %.4f, \"decode_gbs\": %.3f, \"decode_kv_gb\": %.4f,\n",
            o->decode, r->t_decode, step > 0 ? 1 / step : 0, r->weight_bytes / 1e9,
            step > 0 ? r->weight_bytes / step / 1e9 : 0, r->kv_bytes / 1e9);
    fprintf(f,
            " \"vision_layers\": %d, \"vision_s\": %.6f, \"vision_gflop\": %.3f,"
            " \"vision_gflops\": %.3f}\n",
            o->vit_layers, r->t_vit, r->vit_flop / 1e9,
            r->t_vit > 0 ? r->vit_flop / r->t_vit / 1e9 : 0);
    return fclose(f) ? cvlm_errf(CVLM_EIO, "%s: write failed", o->json) : 0;
}

int cvlm_cli_bench(int argc, char **argv)
{
    struct bench_opts o;
    struct bench_result r = {0};
    int rc = parse(argc, argv, &o);
    if (rc)
        return usage(rc < 0 ? 2 : 0);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    r.threads = o.threads ? o.threads : (int)(ncpu > 0 ? ncpu : 1);
    r.fma_peak = cvlm_backend_cpu_fma_peak(r.threads);
    if ((rc = cvlm_probe_bandwidth(r.threads, &r.bw_copy, &r.bw_read)) ||
        (rc = cvlm_probe_gemm(o.dtype, r.threads, 512, 2048, 2048, &r.gemm_gflops)) ||
        (rc = cvlm_probe_gemm(o.dtype, r.threads, 16, 2048, 2048, &r.gemm16_gflops)) ||
        (o.prompt > 0 && (rc = bench_text(&o, &r))) ||
        (o.vit_layers > 0 && (rc = bench_vision(&o, &r))) ||
        (o.json && (rc = write_json(&o, &r)))) {
        fprintf(stderr, "cogvlm bench: %s\n", cvlm_last_error());
        return 1;
    }
    report(&o, &r, stdout);
    return 0;
}
