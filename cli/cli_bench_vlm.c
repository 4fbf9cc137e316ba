/* cli_bench_vlm.c - `cogvlm bench-vlm`: the serving-shaped model benchmark (GPU first).
 *
 * On random weights of a CogVLM shape (--preset cogvlm-17b, the default: cogvlm-chat-hf;
 * --preset cogvlm2-19b: cogvlm2-llama3-chat-19B; or --config's), generated on the device
 * with --backend cuda, in host memory on the CPU (with --quantize: codes generated
 * directly, as the daemon's --dummy-weights does, so the 19B shape fits 24 GB), measures
 * what one image request and a decode batch cost:
 * - vision: the tower + adapter on one image (time, FLOPs counted from the shapes, achieved
 *   GFLOP/s; with fewer --vit-layers than the model has, the full tower's time estimated
 *   from the measured one in proportion to FLOPs);
 * - prefill: BOS + the image's slots + --question-tokens text tokens in one forward
 *   (1278 tokens for the 490 px models, 2357 for CogVLM2's 1344 px with its 2x2 conv, and
 *   a 50-token question), with CogVLM's position ids and expert routing;
 * - decode at each --batch size B: B sequences share the prompt's full KV blocks (as
 *   prefix-cached requests do) and each decodes --decode-steps tokens, one per step, with
 *   logits for all B rows; tokens/s, and the bytes one step must read (the language
 *   expert's weights, lm_head, and B contexts of keys and values) per second.
 * Every phase is warmed up once and synchronized (the model's calls return after the
 * backend's status check, which waits for the device). JSON for tests/gpu/run.sh.
 */
#include "base/clock.h"
#include "cli/cli.h"
#include "engine/error.h"
#include "engine/model/model.h"
#include "engine/model/quantize.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BATCHES 8

struct vlm_opts {
    const char *preset, *config, *json;
    enum cvlm_dtype dtype;
    enum cvlm_quant quant; /* --quantize: the decoder's linear weights */
    int quant_vision;      /* --quantize-vision: also the ViT's and the adapter's */
    int quant_lm_head;     /* --quantize-lm-head (default true): lm_head int8 too */
    struct cvlm_model_opts mo;
    int question, steps, layers, vit_layers, warmup, dry_run;
    int batch[MAX_BATCHES], n_batch;
};

struct vlm_result {
    int T, ctx, threads;
    int full_layers, full_vit_layers; /* the model's own layer counts */
    double t_vision, t_prefill, vision_flop, prefill_flop;
    double cpu_vision, cpu_prefill; /* the process's CPU seconds in those phases (all threads) */
    double vit_layer_flop, lm_layer_flop; /* one ViT layer; one decoder layer over the prompt */
    double t_step[MAX_BATCHES], step_bytes[MAX_BATCHES];
};

/* Seconds of the monotonic clock. */
static double now_s(void)
{
    return cvlm_now_ms() / 1e3;
}

/* CPU seconds of the whole process (every thread): against wall time x threads, how much
 * of the machine a CPU run got where other processes share its cores. */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* cogvlm-chat-hf (cogvlm-model.md §1): LM 32 x (4096, 32 heads, MLP 11008), vocab 32000;
 * EVA2-CLIP-E 63 x (1792, 16 heads, MLP 15360) on 490 px / 14 px patches. */
static void config_17b(struct cvlm_config *c, int layers, int vit_layers)
{
    memset(c, 0, sizeof(*c));
    *c = (struct cvlm_config){.vocab_size = 32000,
                              .hidden_size = 4096,
                              .intermediate_size = 11008,
                              .num_layers = layers,
                              .num_heads = 32,
                              .max_position_embeddings = 4096,
                              .rms_norm_eps = 1e-5f,
                              .rope_theta = 10000.0f,
                              .bos_token_id = 1,
                              .eos_token_id = 2,
                              .template_version = CVLM_TEMPLATE_CHAT,
                              .has_vision = 1};
    c->vision = (struct cvlm_vision_config){.image_size = 490,
                                            .patch_size = 14,
                                            .in_channels = 3,
                                            .hidden_size = 1792,
                                            .num_heads = 16,
                                            .num_layers = vit_layers,
                                            .intermediate_size = 15360,
                                            .num_positions = 35 * 35 + 1,
                                            .layer_norm_eps = 1e-6f};
}

/* cogvlm2-llama3-chat-19B (cogvlm-model.md §9): LM 32 x (4096, 32 query / 8 KV heads, MLP
 * 14336), vocab 128256, RoPE base 500000, context 8192; the same EVA2-CLIP-E on 1344 px (96 x
 * 96 patches + CLS), then the 2x2 stride-2 conv: 48 x 48 = 2304 tokens + boi/eoi. */
static void config_19b(struct cvlm_config *c, int layers, int vit_layers)
{
    config_17b(c, layers, vit_layers);
    c->variant = CVLM_VARIANT_COGVLM2;
    c->vocab_size = 128256;
    c->intermediate_size = 14336;
    c->num_kv_heads = 8;
    c->max_position_embeddings = 8192;
    c->rope_theta = 500000.0f;
    c->bos_token_id = 128000;
    c->eos_token_id = 128001;
    c->eos_ids[0] = 128001, c->eos_ids[1] = 128009, c->n_eos = 2;
    c->pad_token_id = 128002;
    c->vision.image_size = 1344;
    c->vision.num_positions = 96 * 96 + 1;
}

/* The preset's or --config's shapes; *full / *full_vit: the model's own layer counts. */
static int load_config(const struct vlm_opts *o, struct cvlm_config *c, int *full, int *full_vit)
{
    int rc = 0;
    if (o->config) {
        if ((rc = cvlm_config_load(o->config, c)))
            return rc;
        *full = c->num_layers, *full_vit = c->vision.num_layers;
        c->num_layers = o->layers < c->num_layers ? o->layers : c->num_layers;
        if (c->has_vision && o->vit_layers < c->vision.num_layers)
            c->vision.num_layers = o->vit_layers;
    } else if (!strcmp(o->preset, "cogvlm-17b") || !strcmp(o->preset, "cogvlm2-19b")) {
        if (!strcmp(o->preset, "cogvlm2-19b"))
            config_19b(c, o->layers, o->vit_layers);
        else
            config_17b(c, o->layers, o->vit_layers);
        *full = 32, *full_vit = 63;
    } else {
        return cvlm_errf(CVLM_EINVAL, "unknown preset '%s' (cogvlm-17b, cogvlm2-19b)", o->preset);
    }
    return c->has_vision ? 0
                         : cvlm_errf(CVLM_EINVAL, "bench-vlm needs a config with a vision tower");
}

static int usage(int rc)
{
    fprintf(rc ? stderr : stdout,
            "usage: cogvlm bench-vlm [--preset cogvlm-17b|cogvlm2-19b | --config config.json]\n"
            "                        [--dtype bf16|f16|f32] [--quantize none|int8|int4]\n"
            "                        [--quantize-vision] [--quantize-lm-head true|false]\n"
            "                        [--question-tokens 50]\n"
            "                        [--batch 1,16,64] [--decode-steps 32] [--layers 32]\n"
            "                        [--vit-layers 63] [--warmup 1] [--dry-run] [--json FILE]\n"
            "                        " CVLM_CLI_MODEL_USAGE "\n"
            "Random weights of a CogVLM shape: cogvlm-17b (default; cogvlm-chat-hf, 490 px,\n"
            "1227 image slots), cogvlm2-19b (cogvlm2-llama3-chat-19B: GQA 32/8 heads, vocab\n"
            "128256, 1344 px, 2x2 conv, 2306 image slots), or --config's; --layers and\n"
            "--vit-layers keep only the first layers (the full tower's time is estimated).\n"
            "Generated on the device with --backend cuda; on the CPU with --quantize the\n"
            "codes are generated directly (no 16-bit copy: the 19B shape at int4 fits 24 GB).\n"
            "Times the vision tower + adapter, the prefill of one image prompt, and decode\n"
            "steps at each batch size, each after --warmup untimed runs. --dry-run prints the\n"
            "shapes and FLOP counts without making weights.\n" CVLM_CLI_MODEL_HELP);
    return rc;
}

static int parse_batches(const char *v, struct vlm_opts *o)
{
    o->n_batch = 0;
    for (const char *p = v; *p && o->n_batch < MAX_BATCHES;) {
        char *end;
        long b = strtol(p, &end, 10);
        if (end == p || b < 1 || b > 1024)
            return -1;
        o->batch[o->n_batch++] = (int)b;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return o->n_batch ? 0 : -1;
}

static int parse(int argc, char **argv, struct vlm_opts *o)
{
    *o = (struct vlm_opts){.preset = "cogvlm-17b",
                           .quant_lm_head = 1,
                           .dtype = CVLM_DTYPE_BF16,
                           .question = 50,
                           .steps = 32,
                           .layers = 32,
                           .vit_layers = 63,
                           .warmup = 1,
                           .batch = {1, 16, 64},
                           .n_batch = 3};
    for (int i = 1; i < argc; i++) {
        const char *a, *v;
        if (!strcmp(argv[i], "--quantize-vision") || !strcmp(argv[i], "--dry-run")) {
            *(argv[i][2] == 'q' ? &o->quant_vision : &o->dry_run) = 1;
            continue;
        }
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
        else if (!strcmp(a, "--quantize")) {
            if (cvlm_quant_parse(v, &o->quant))
                return -1;
        } else if (!strcmp(a, "--quantize-lm-head")) {
            if (cvlm_cli_bool(a, v, &o->quant_lm_head))
                return -1;
        } else if (!strcmp(a, "--warmup"))
            o->warmup = atoi(v);
        else if (!strcmp(a, "--json"))
            o->json = v;
        else if (!strcmp(a, "--question-tokens"))
            o->question = atoi(v);
        else if (!strcmp(a, "--decode-steps"))
            o->steps = atoi(v);
        else if (!strcmp(a, "--layers"))
            o->layers = atoi(v);
        else if (!strcmp(a, "--vit-layers"))
            o->vit_layers = atoi(v);
        else if (!strcmp(a, "--batch")) {
            if (parse_batches(v, o))
                return -1;
        } else if (!strcmp(a, "--dtype")) {
            if (!strcmp(v, "bf16"))
                o->dtype = CVLM_DTYPE_BF16;
            else if (!strcmp(v, "f16"))
                o->dtype = CVLM_DTYPE_F16;
            else if (!strcmp(v, "f32"))
                o->dtype = CVLM_DTYPE_F32;
            else
                return -1;
        } else
            return -1;
    }
    return o->question < 1 || o->steps < 1 || o->layers < 1 || o->vit_layers < 1 || o->warmup < 0 ||
                   o->warmup > 100
               ? -1
               : 0;
}

/* ---- the image prompt ---------------------------------------------------------------- */

struct plan {
    int T, img_len, bs;
    int32_t *ids, *pos, *seq, *slot, *img, *bt;
    uint8_t *expert;
};

/* BOS, the image's slots (vision expert; boi at position 1, every interior slot at 2,
 * eoi at 3, cogvlm-model.md §4.6), then the question's tokens at 4, 5, ... */
static int plan_prompt(struct plan *p, const struct cvlm_config *c, int question, int bs)
{
    p->img_len = cvlm_config_image_tokens(c);
    p->T = 1 + p->img_len + question;
    p->bs = bs;
    size_t n = (size_t)p->T;
    p->ids = calloc(n, 4), p->pos = calloc(n, 4), p->seq = calloc(n, 4);
    p->slot = calloc(n, 4), p->img = calloc(n, 4), p->expert = calloc(n, 1);
    p->bt = calloc((size_t)(p->T + bs - 1) / bs, 4);
    if (!p->ids || !p->pos || !p->seq || !p->slot || !p->img || !p->expert || !p->bt)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (int t = 0; t < p->T; t++) {
        int rel = t - 1, in_img = rel >= 0 && rel < p->img_len;
        p->ids[t] =
            t == 0 ? c->bos_token_id
                   : 3 + (int32_t)(((uint32_t)t * 2654435761u) % (uint32_t)(c->vocab_size - 3));
        p->img[t] = in_img ? rel : -1;
        p->expert[t] = in_img ? CVLM_EXPERT_VISION : CVLM_EXPERT_LANG;
        p->pos[t] = t == 0                  ? 0
                    : !in_img               ? 4 + (rel - p->img_len)
                    : rel == 0              ? 1
                    : rel == p->img_len - 1 ? 3
                                            : 2;
        p->slot[t] = t;
    }
    for (int b = 0; b < (p->T + bs - 1) / bs; b++)
        p->bt[b] = b;
    return 0;
}

static void plan_free(struct plan *p)
{
    free(p->ids), free(p->pos), free(p->seq), free(p->slot), free(p->img), free(p->expert);
    free(p->bt);
}

static int prefill(struct cvlm_model *m, const struct plan *p, struct cvlm_feats *f, float *logits)
{
    const struct cvlm_feats *fs[1] = {f};
    struct cvlm_seq_kv kv = {p->bt, (p->T + p->bs - 1) / p->bs};
    struct cvlm_batch b = {.n_tokens = p->T,
                           .ids = p->ids,
                           .pos = p->pos,
                           .expert = p->expert,
                           .seq = p->seq,
                           .slot = p->slot,
                           .img_row = p->img,
                           .img_feats = fs,
                           .seqs = &kv,
                           .n_seqs = 1};
    return cvlm_model_forward(m, &b, logits);
}

/* ---- decode ---------------------------------------------------------------------------- */

/* B sequences: each block table = the prompt's full blocks (shared) + its own blocks for
 * the decoded tokens, which start at slot ctx (the shared part's end). */
struct dec {
    int B, ctx, own, nb;
    int32_t *bt, *ids, *pos, *seq, *slot, *img;
    uint8_t *expert, *want;
    struct cvlm_seq_kv *seqs;
};

static int dec_init(struct dec *d, const struct plan *p, int B, int steps)
{
    int shared = p->T / p->bs, first = (p->T + p->bs - 1) / p->bs;
    d->B = B;
    d->ctx = shared * p->bs;
    d->own = (steps + p->bs) / p->bs;
    d->nb = shared + d->own;
    d->bt = malloc((size_t)B * d->nb * 4);
    d->seqs = malloc((size_t)B * sizeof(*d->seqs));
    d->ids = calloc((size_t)B, 4), d->pos = calloc((size_t)B, 4), d->seq = calloc((size_t)B, 4);
    d->slot = calloc((size_t)B, 4), d->img = calloc((size_t)B, 4);
    d->expert = calloc((size_t)B, 1), d->want = calloc((size_t)B, 1);
    if (!d->bt || !d->seqs || !d->ids || !d->pos || !d->seq || !d->slot || !d->img || !d->expert ||
        !d->want)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (int s = 0; s < B; s++) {
        int32_t *t = d->bt + (size_t)s * d->nb;
        for (int i = 0; i < d->nb; i++)
            t[i] = i < shared ? i : first + s * d->own + (i - shared);
        d->seqs[s] = (struct cvlm_seq_kv){t, d->nb};
        d->seq[s] = s;
        d->img[s] = -1;
        d->want[s] = 1;
        d->ids[s] = 3 + s;
    }
    return 0;
}

static void dec_free(struct dec *d)
{
    free(d->bt), free(d->seqs), free(d->ids), free(d->pos), free(d->seq), free(d->slot);
    free(d->img), free(d->expert), free(d->want);
}

/* Decode step k of every sequence (slot ctx + k, the position after the prompt's). */
static int dec_step(struct cvlm_model *m, struct dec *d, int pos0, int k, float *logits)
{
    for (int s = 0; s < d->B; s++) {
        d->slot[s] = d->ctx + k;
        d->pos[s] = pos0 + k;
        d->ids[s] = 3 + (d->ids[s] * 31 + k) % 1000;
    }
    struct cvlm_batch b = {.n_tokens = d->B,
                           .ids = d->ids,
                           .pos = d->pos,
                           .expert = d->expert,
                           .seq = d->seq,
                           .slot = d->slot,
                           .img_row = d->img,
                           .seqs = d->seqs,
                           .n_seqs = d->B,
                           .want_logits = d->want};
    return cvlm_model_forward(m, &b, logits);
}

/* ---- the run ---------------------------------------------------------------------------- */

/* Matrix FLOPs (2 per multiply-add) from the shapes. The ViT: N = patches + CLS rows,
 * 2N(4d^2 + 2dF) + 4N^2 d per layer (QKV, dense, the MLP; scores and their product with V
 * over all N keys), plus the patch embedding, CogVLM2's 2x2 conv (a [n/4, 4d] x [4d, d]
 * GEMM) and the adapter (proj, GLU gate/up/down) over its n rows. The prompt: per decoder
 * layer QKV (D x (D + 2 KV heads' dims)), dense, MLP per token, causal attention (every
 * query head over the keys before it), plus lm_head for the last token. */
static void flops(const struct cvlm_config *c, int T, struct vlm_result *r)
{
    const struct cvlm_vision_config *v = &c->vision;
    double np = cvlm_config_num_patches(c), N = np + 1, d = v->hidden_size;
    double n = cvlm_config_vision_tokens(c);
    double F = v->intermediate_size, D = c->hidden_size, I = c->intermediate_size;
    double kvd = (double)cvlm_config_kv_heads(c) * cvlm_config_head_dim(c);
    double P2C = (double)v->in_channels * v->patch_size * v->patch_size;
    r->vit_layer_flop = 2 * N * (4 * d * d + 2 * d * F) + 4 * N * N * d;
    r->vision_flop = v->num_layers * r->vit_layer_flop + 2 * np * d * P2C +
                     (cvlm_config_has_conv(c) ? 2 * np * d * d : 0) + 2 * n * (d * D + 3 * D * I);
    r->lm_layer_flop = 2.0 * T * (D * (D + 2 * kvd) + D * D + 3 * D * I) +
                       2.0 * 2.0 * D * ((double)T * (T + 1) / 2);
    r->prefill_flop = c->num_layers * r->lm_layer_flop + 2.0 * D * c->vocab_size;
}

/* Bytes a weight matrix streams (quantized: codes and scales); from its shape, as lazy
 * dummy tensors have no data. */
static double tensor_bytes(const struct cvlm_tensor *t)
{
    if (cvlm_dtype_is_quant(t->dtype))
        return (double)cvlm_quant_bytes(t->dtype, t->shape[0], t->shape[1]);
    return (double)cvlm_tensor_bytes(t);
}

/* Bytes of weights one language-expert decode step reads: every layer's language expert,
 * lm_head, and the final norm. */
static double decode_weight_bytes(const struct cvlm_weights *w)
{
    double b = tensor_bytes(&w->lm_head) + tensor_bytes(&w->final_norm);
    for (int l = 0; l < w->cfg.num_layers; l++) {
        const struct cvlm_lm_layer *L = &w->layers[l];
        b += tensor_bytes(&L->input_norm) + tensor_bytes(&L->post_norm) + tensor_bytes(&L->qkv[0]) +
             tensor_bytes(&L->dense[0]) + tensor_bytes(&L->gate[0]) + tensor_bytes(&L->up[0]) +
             tensor_bytes(&L->down[0]);
    }
    return b;
}

static int bench_decode(struct cvlm_model *m, const struct cvlm_weights *w,
                        const struct vlm_opts *o, const struct plan *p, int bi, float *logits,
                        struct vlm_result *r)
{
    const struct cvlm_config *c = cvlm_model_config(m);
    struct dec d = {0};
    int rc = dec_init(&d, p, o->batch[bi], o->steps), pos0 = p->pos[p->T - 1] + 1;
    for (int k = 0; !rc && k < o->warmup; k++)
        rc = dec_step(m, &d, pos0, 0, logits);
    double t0 = now_s();
    for (int k = 0; !rc && k < o->steps; k++)
        rc = dec_step(m, &d, pos0, k, logits);
    r->t_step[bi] = (now_s() - t0) / o->steps;
    /* keys and values of the KV heads only (GQA), in the cache's dtype */
    double kvd = (double)cvlm_config_kv_heads(c) * cvlm_config_head_dim(c);
    enum cvlm_dtype kvt = cvlm_model_kv_dtype(m); /* int8: + an F32 scale per head */
    double as = (double)cvlm_dtype_size(kvt) +
                (kvt == CVLM_DTYPE_Q8 ? 4.0 / (double)cvlm_config_head_dim(c) : 0.0);
    r->step_bytes[bi] =
        decode_weight_bytes(w) + d.B * (d.ctx + o->steps / 2.0) * 2.0 * c->num_layers * kvd * as;
    r->ctx = d.ctx;
    dec_free(&d);
    return rc;
}

static int run_all(const struct vlm_opts *o, struct cvlm_weights *w, struct vlm_result *r)
{
    const struct cvlm_config *c = &w->cfg;
    struct plan p = {0};
    struct cvlm_model *m = NULL;
    struct cvlm_feats *f = NULL;
    int rc, bs = 16, maxB = 1;
    float *px = NULL, *logits = NULL;
    for (int i = 0; i < o->n_batch; i++)
        maxB = o->batch[i] > maxB ? o->batch[i] : maxB;
    if ((rc = plan_prompt(&p, c, o->question, bs)))
        goto out;
    struct cvlm_model_opts mo = o->mo;
    mo.max_tokens = p.T > maxB ? p.T : maxB;
    mo.block_size = bs;
    mo.kv_blocks = (p.T + bs - 1) / bs + maxB * ((o->steps + bs) / bs);
    size_t npx = (size_t)3 * c->vision.image_size * c->vision.image_size;
    if ((rc = cvlm_model_create(w, &mo, &m)))
        goto out;
    px = malloc(npx * sizeof(float));
    logits = malloc((size_t)maxB * c->vocab_size * sizeof(float));
    f = cvlm_model_feats_alloc(m);
    if (!px || !logits || !f) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < npx; i++)
        px[i] = (float)((i * 7919) % 256) / 128.0f - 1.0f;
    for (int k = 0; k < o->warmup; k++)
        if ((rc = cvlm_model_encode_image(m, px, f, NULL)) || (rc = prefill(m, &p, f, logits)))
            goto out;
    double t0 = now_s(), c0 = cpu_s();
    if ((rc = cvlm_model_encode_image(m, px, f, NULL)))
        goto out;
    r->t_vision = now_s() - t0;
    r->cpu_vision = cpu_s() - c0;
    t0 = now_s(), c0 = cpu_s();
    if ((rc = prefill(m, &p, f, logits)))
        goto out;
    r->t_prefill = now_s() - t0;
    r->cpu_prefill = cpu_s() - c0;
    r->threads = cvlm_model_backend(m)->n_threads * cvlm_model_tp(m);
    for (int i = 0; !rc && i < o->n_batch; i++)
        rc = bench_decode(m, w, o, &p, i, logits, r);
out:
    if (f)
        cvlm_model_feats_free(m, f);
    cvlm_model_destroy(m);
    plan_free(&p);
    free(px);
    free(logits);
    return rc;
}

/* "12.3 GFLOP/s" or "123.4 TFLOP/s" (CPU and GPU rates in one format). */
static const char *rate(char *buf, size_t n, double flop, double s)
{
    double g = s > 0 ? flop / s / 1e9 : 0;
    snprintf(buf, n, g < 1e3 ? "%.1f GFLOP/s" : "%.1f TFLOP/s", g < 1e3 ? g : g / 1e3);
    return buf;
}

/* "1860.5 GFLOP", "118.1 TFLOP", "3.2 MFLOP": an amount of FLOPs, CPU-sized or not. */
static const char *amount(char *buf, size_t n, double flop)
{
    if (flop >= 1e12)
        snprintf(buf, n, "%.1f TFLOP", flop / 1e12);
    else if (flop >= 1e9)
        snprintf(buf, n, "%.1f GFLOP", flop / 1e9);
    else
        snprintf(buf, n, "%.2f MFLOP", flop / 1e6);
    return buf;
}

/* The model's own layer counts' FLOPs and the times at the measured rates. */
static double vision_full_flop(const struct cvlm_config *c, const struct vlm_result *r)
{
    return r->vision_flop + (r->full_vit_layers - c->vision.num_layers) * r->vit_layer_flop;
}
static double prefill_full_flop(const struct cvlm_config *c, const struct vlm_result *r)
{
    return r->prefill_flop + (r->full_layers - c->num_layers) * r->lm_layer_flop;
}

static void report_text(const struct vlm_opts *o, const struct cvlm_config *c,
                        const struct vlm_result *r)
{
    const struct cvlm_vision_config *v = &c->vision;
    int tp = o->mo.tp > 1 ? o->mo.tp : 1, nt = cvlm_config_vision_tokens(c);
    double vf = vision_full_flop(c, r), pf = prefill_full_flop(c, r);
    char b1[32], b2[32], b3[32], b4[32];
    printf("cogvlm bench-vlm: %s, %s backend, tp %d, %s weights", o->config ? o->config : o->preset,
           o->mo.backend == CVLM_BACKEND_CUDA ? "cuda" : "cpu", tp, cvlm_dtype_name(o->dtype));
    if (o->quant)
        printf(", decoder%s %s", o->quant_vision ? " and vision" : "", cvlm_quant_name(o->quant));
    printf("\n  LM  %d of %d layers: hidden %d, %d query / %d KV heads, MLP %d, vocab %d, "
           "rope base %.0f, context %d\n",
           c->num_layers, r->full_layers, c->hidden_size, c->num_heads, cvlm_config_kv_heads(c),
           c->intermediate_size, c->vocab_size, c->rope_theta, c->max_position_embeddings);
    printf("  ViT %d of %d layers: %d px / %d = %d patches + CLS, width %d, %d heads, MLP %d%s\n",
           v->num_layers, r->full_vit_layers, v->image_size, v->patch_size,
           cvlm_config_num_patches(c), v->hidden_size, v->num_heads, v->intermediate_size,
           cvlm_config_has_conv(c) ? ", 2x2 stride-2 conv" : "");
    printf("  image slots           %d (boi + %d + eoi); prompt %d tokens (BOS + image + %d)\n",
           cvlm_config_image_tokens(c), nt, r->T, o->question);
    printf("  vision FLOPs          %s: %d ViT layer%s x %s + %s (patch embedding, %sadapter); "
           "all %d layers: %s\n",
           amount(b1, sizeof(b1), r->vision_flop), v->num_layers, v->num_layers > 1 ? "s" : "",
           amount(b2, sizeof(b2), r->vit_layer_flop),
           amount(b3, sizeof(b3), r->vision_flop - v->num_layers * r->vit_layer_flop),
           cvlm_config_has_conv(c) ? "conv, " : "", r->full_vit_layers, amount(b4, sizeof(b4), vf));
    printf("  prefill FLOPs         %s: %d layer%s x %s + lm_head; all %d layers: %s\n",
           amount(b1, sizeof(b1), r->prefill_flop), c->num_layers, c->num_layers > 1 ? "s" : "",
           amount(b2, sizeof(b2), r->lm_layer_flop), r->full_layers, amount(b3, sizeof(b3), pf));
    if (o->dry_run)
        return;
    int cpu = o->mo.backend != CVLM_BACKEND_CUDA;
    if (cpu)
        printf("  threads               %d (the CPU time of each phase / (wall x threads): "
               "the share of them the run got)\n",
               r->threads);
    printf("  vision tower+adapter  %.1f ms  (%s); est. %d layers %.1f s", r->t_vision * 1e3,
           rate(b1, sizeof(b1), r->vision_flop, r->t_vision), r->full_vit_layers,
           r->t_vision * vf / r->vision_flop);
    if (cpu)
        printf("; CPU share %.0f%%", 100 * r->cpu_vision / (r->t_vision * r->threads));
    printf("\n  prefill %4d tokens    %.1f ms  (%s); est. %d layers %.1f s", r->T,
           r->t_prefill * 1e3, rate(b2, sizeof(b2), r->prefill_flop, r->t_prefill), r->full_layers,
           r->t_prefill * pf / r->prefill_flop);
    if (cpu)
        printf("; CPU share %.0f%%", 100 * r->cpu_prefill / (r->t_prefill * r->threads));
    printf("\n");
    printf("  vision + prefill      %.1f ms\n", (r->t_vision + r->t_prefill) * 1e3);
    for (int i = 0; i < o->n_batch; i++)
        printf("  decode batch %3d      %.1f tokens/s  (%.2f ms/step, %.1f GB/s read, ctx %d)\n",
               o->batch[i], o->batch[i] / r->t_step[i], r->t_step[i] * 1e3,
               r->step_bytes[i] / r->t_step[i] / 1e9, r->ctx);
}

static void report_json(const struct vlm_opts *o, const struct cvlm_config *c,
                        const struct vlm_result *r, FILE *f)
{
    const char *be = o->mo.backend == CVLM_BACKEND_CUDA ? "cuda" : "cpu";
    int tp = o->mo.tp > 1 ? o->mo.tp : 1;
    double vf = vision_full_flop(c, r), pf = prefill_full_flop(c, r);
    fprintf(f,
            "{\"model\": \"%s\", \"backend\": \"%s\", \"tp\": %d, \"threads\": %d, "
            "\"dtype\": \"%s\", \"quantize\": \"%s\", \"quantize_vision\": %s,\n"
            " \"layers\": %d, \"vit_layers\": %d, \"full_layers\": %d, \"full_vit_layers\": %d, "
            "\"image_slots\": %d, \"prompt_tokens\": %d, \"decode_context\": %d,\n",
            o->config ? o->config : o->preset, be, tp, r->threads, cvlm_dtype_name(o->dtype),
            cvlm_quant_name(o->quant), o->quant_vision ? "true" : "false", c->num_layers,
            c->vision.num_layers, r->full_layers, r->full_vit_layers, cvlm_config_image_tokens(c),
            r->T, r->ctx);
    fprintf(f,
            " \"vision_ms\": %.3f, \"vision_tflop\": %.4f, \"vision_tflops\": %.5f,"
            " \"vision_full_tflop\": %.4f, \"vision_full_est_s\": %.3f, \"vision_cpu_s\": %.3f,\n",
            r->t_vision * 1e3, r->vision_flop / 1e12, r->vision_flop / r->t_vision / 1e12,
            vf / 1e12, r->t_vision * vf / r->vision_flop, r->cpu_vision);
    fprintf(
        f,
        " \"prefill_ms\": %.3f, \"prefill_tflops\": %.5f, \"prefill_full_tflop\": %.4f,"
        " \"prefill_full_est_s\": %.3f, \"prefill_cpu_s\": %.3f, \"vision_prefill_ms\": %.3f,\n",
        r->t_prefill * 1e3, r->prefill_flop / r->t_prefill / 1e12, pf / 1e12,
        r->t_prefill * pf / r->prefill_flop, r->cpu_prefill, (r->t_vision + r->t_prefill) * 1e3);
    fprintf(f, " \"decode\": [");
    for (int i = 0; i < o->n_batch; i++)
        fprintf(f,
                "%s{\"batch\": %d, \"tok_s\": %.3f, \"step_ms\": %.4f, \"bytes_per_step\": %.0f, "
                "\"gb_s\": %.3f}",
                i ? ", " : "", o->batch[i], o->batch[i] / r->t_step[i], r->t_step[i] * 1e3,
                r->step_bytes[i], r->step_bytes[i] / r->t_step[i] / 1e9);
    fprintf(f, "]}\n");
}

/* Random weights: on a GPU generated in device memory; on the CPU in host memory, or,
 * quantized, as codes directly (the quantizer fills the tensors without data, the
 * backend the rest: no 16-bit copy of the decoder ever exists). */
static int make_weights(const struct vlm_opts *o, const struct cvlm_config *c,
                        struct cvlm_weights **w)
{
    int rc = o->mo.backend == CVLM_BACKEND_CUDA || o->quant
                 ? cvlm_weights_dummy_lazy(c, o->dtype, w)
                 : cvlm_weights_dummy(c, o->dtype, 1, w);
    return rc ? rc : cvlm_weights_quantize(*w, o->quant, o->quant_vision, o->quant_lm_head);
}

int cvlm_cli_bench_vlm(int argc, char **argv)
{
    struct vlm_opts o;
    struct vlm_result r = {0};
    struct cvlm_config c;
    struct cvlm_weights *w = NULL;
    int rc = parse(argc, argv, &o);
    if (rc)
        return usage(rc < 0 ? 2 : 0);
    if (!(rc = load_config(&o, &c, &r.full_layers, &r.full_vit_layers))) {
        r.T = 1 + cvlm_config_image_tokens(&c) + o.question;
        flops(&c, r.T, &r);
        if (o.dry_run) {
            report_text(&o, &c, &r);
            return 0;
        }
        rc = make_weights(&o, &c, &w);
    }
    if (!rc)
        rc = run_all(&o, w, &r);
    cvlm_weights_destroy(w);
    if (rc) {
        fprintf(stderr, "cogvlm bench-vlm: %s\n", cvlm_last_error());
        return 1;
    }
    report_text(&o, &c, &r);
    FILE *f = o.json ? fopen(o.json, "w") : NULL;
    if (o.json && !f) {
        fprintf(stderr, "cogvlm bench-vlm: %s: cannot create\n", o.json);
        return 1;
    }
    if (f) {
        report_json(&o, &c, &r, f);
        fclose(f);
    }
    return 0;
}
