/* cli_bench_vlm.c - `cogvlm bench-vlm`: the serving-shaped model benchmark (GPU first).
 *
 * On random weights of a CogVLM shape (default: the full 17B config, generated on the
 * device with --backend cuda), measures what one image request and a decode batch cost:
 * - vision: the tower + adapter on one image (time, FLOPs, achieved TFLOP/s);
 * - prefill: BOS + the image's slots + --question-tokens text tokens in one forward
 *   (1278 tokens for the 490 px models and a 50-token question), with CogVLM's position
 *   ids and expert routing;
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

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_BATCHES 8

struct vlm_opts {
    const char *config, *json;
    enum cvlm_dtype dtype;
    struct cvlm_model_opts mo;
    int question, steps, layers, vit_layers;
    int batch[MAX_BATCHES], n_batch;
};

struct vlm_result {
    int T, ctx;
    double t_vision, t_prefill, vision_flop, prefill_flop;
    double t_step[MAX_BATCHES], step_bytes[MAX_BATCHES];
};

/* Seconds of the monotonic clock. */
static double now_s(void)
{
    return cvlm_now_ms() / 1e3;
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

static int usage(int rc)
{
    fprintf(rc ? stderr : stdout,
            "usage: cogvlm bench-vlm [--config config.json] [--dtype bf16|f16|f32]\n"
            "                        [--question-tokens 50] [--batch 1,16,64]\n"
            "                        [--decode-steps 32] [--layers 32] [--vit-layers 63]\n"
            "                        [--json FILE] " CVLM_CLI_MODEL_USAGE "\n"
            "Random weights of the 17B cogvlm-chat shape (or --config's), generated on the\n"
            "device with --backend cuda. Times the vision tower + adapter, the prefill of\n"
            "one image prompt, and decode steps at each batch size.\n" CVLM_CLI_MODEL_HELP);
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
    *o = (struct vlm_opts){.dtype = CVLM_DTYPE_BF16,
                           .question = 50,
                           .steps = 32,
                           .layers = 32,
                           .vit_layers = 63,
                           .batch = {1, 16, 64},
                           .n_batch = 3};
    for (int i = 1; i < argc; i++) {
        const char *a, *v;
        int k = cvlm_cli_arg(argc, argv, &i, &o->mo, &a, &v);
        if (k != 1) {
            if (k)
                return k == 2 ? 1 : -1;
            continue;
        }
        if (!strcmp(a, "--config"))
            o->config = v;
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
    return o->question < 1 || o->steps < 1 || o->layers < 1 || o->vit_layers < 1 ? -1 : 0;
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

static void flops(const struct cvlm_config *c, int T, struct vlm_result *r)
{
    const struct cvlm_vision_config *v = &c->vision;
    double np = cvlm_config_num_patches(c), N = np + 1, d = v->hidden_size;
    double F = v->intermediate_size, D = c->hidden_size, I = c->intermediate_size;
    double P2C = (double)v->in_channels * v->patch_size * v->patch_size;
    r->vision_flop = v->num_layers * (2 * N * (4 * d * d + 2 * d * F) + 4 * N * N * d) +
                     2 * np * d * P2C + 2 * np * (d * D + 3 * D * I);
    r->prefill_flop = c->num_layers * ((4 * D * D + 3 * D * I) * 2 * T +
                                       2.0 * 2.0 * D * ((double)T * (T + 1) / 2)) +
                      2.0 * D * c->vocab_size;
}

static int bench_decode(struct cvlm_model *m, const struct vlm_opts *o, const struct plan *p,
                        int bi, float *logits, struct vlm_result *r)
{
    const struct cvlm_config *c = cvlm_model_config(m);
    struct dec d = {0};
    int rc = dec_init(&d, p, o->batch[bi], o->steps), pos0 = p->pos[p->T - 1] + 1;
    if (!rc)
        rc = dec_step(m, &d, pos0, 0, logits); /* warm-up */
    double t0 = now_s();
    for (int k = 0; !rc && k < o->steps; k++)
        rc = dec_step(m, &d, pos0, k, logits);
    r->t_step[bi] = (now_s() - t0) / o->steps;
    double D = c->hidden_size, I = c->intermediate_size;
    double ws = (double)cvlm_dtype_size(o->dtype);
    double as = (double)cvlm_dtype_size(cvlm_model_backend(m)->act_dtype);
    r->step_bytes[bi] = c->num_layers * (4 * D * D + 3 * D * I) * ws + c->vocab_size * D * ws +
                        d.B * (d.ctx + o->steps / 2.0) * 2.0 * c->num_layers * D * as;
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
    if ((rc = cvlm_model_encode_image(m, px, f, NULL)) || (rc = prefill(m, &p, f, logits)))
        goto out; /* warm-up */
    double t0 = now_s();
    if ((rc = cvlm_model_encode_image(m, px, f, NULL)))
        goto out;
    r->t_vision = now_s() - t0;
    t0 = now_s();
    if ((rc = prefill(m, &p, f, logits)))
        goto out;
    r->t_prefill = now_s() - t0;
    r->T = p.T;
    flops(c, p.T, r);
    for (int i = 0; !rc && i < o->n_batch; i++)
        rc = bench_decode(m, o, &p, i, logits, r);
out:
    if (f)
        cvlm_model_feats_free(m, f);
    cvlm_model_destroy(m);
    plan_free(&p);
    free(px);
    free(logits);
    return rc;
}

static void report(const struct vlm_opts *o, const struct cvlm_config *c,
                   const struct vlm_result *r, FILE *f, int json)
{
    const char *be = o->mo.backend == CVLM_BACKEND_CUDA ? "cuda" : "cpu";
    int tp = o->mo.tp > 1 ? o->mo.tp : 1;
    if (!json) {
        printf("cogvlm bench-vlm: %s backend, tp %d, %s weights, LM %d layers, ViT %d layers\n", be,
               tp, cvlm_dtype_name(o->dtype), c->num_layers, c->vision.num_layers);
        printf("  vision tower+adapter  %.1f ms  (%.1f TFLOP/s of %.1f TFLOP)\n", r->t_vision * 1e3,
               r->vision_flop / r->t_vision / 1e12, r->vision_flop / 1e12);
        printf("  prefill %4d tokens    %.1f ms  (%.1f TFLOP/s)\n", r->T, r->t_prefill * 1e3,
               r->prefill_flop / r->t_prefill / 1e12);
        printf("  vision + prefill      %.1f ms\n", (r->t_vision + r->t_prefill) * 1e3);
        for (int i = 0; i < o->n_batch; i++)
            printf(
                "  decode batch %3d      %.1f tokens/s  (%.2f ms/step, %.0f GB/s read, ctx %d)\n",
                o->batch[i], o->batch[i] / r->t_step[i], r->t_step[i] * 1e3,
                r->step_bytes[i] / r->t_step[i] / 1e9, r->ctx);
        return;
    }
    fprintf(f,
            "{\"backend\": \"%s\", \"tp\": %d, \"dtype\": \"%s\", \"layers\": %d, "
            "\"vit_layers\": %d, \"prompt_tokens\": %d, \"decode_context\": %d,\n",
            be, tp, cvlm_dtype_name(o->dtype), c->num_layers, c->vision.num_layers, r->T, r->ctx);
    fprintf(f, " \"vision_ms\": %.3f, \"vision_tflop\": %.4f, \"vision_tflops\": %.3f,\n",
            r->t_vision * 1e3, r->vision_flop / 1e12, r->vision_flop / r->t_vision / 1e12);
    fprintf(f, " \"prefill_ms\": %.3f, \"prefill_tflops\": %.3f, \"vision_prefill_ms\": %.3f,\n",
            r->t_prefill * 1e3, r->prefill_flop / r->t_prefill / 1e12,
            (r->t_vision + r->t_prefill) * 1e3);
    fprintf(f, " \"decode\": [");
    for (int i = 0; i < o->n_batch; i++)
        fprintf(f,
                "%s{\"batch\": %d, \"tok_s\": %.3f, \"step_ms\": %.4f, \"bytes_per_step\": %.0f, "
                "\"gb_s\": %.3f}",
                i ? ", " : "", o->batch[i], o->batch[i] / r->t_step[i], r->t_step[i] * 1e3,
                r->step_bytes[i], r->step_bytes[i] / r->t_step[i] / 1e9);
    fprintf(f, "]}\n");
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
    if (o.config && !(rc = cvlm_config_load(o.config, &c)))
        c.num_layers = o.layers < c.num_layers ? o.layers : c.num_layers;
    else if (!o.config)
        config_17b(&c, o.layers, o.vit_layers);
    if (!rc && !c.has_vision)
        rc = cvlm_errf(CVLM_EINVAL, "bench-vlm needs a config with a vision tower");
    /* on a GPU the weights are generated in device memory; on the CPU in host memory */
    if (!rc)
        rc = o.mo.backend == CVLM_BACKEND_CUDA ? cvlm_weights_dummy_lazy(&c, o.dtype, &w)
                                               : cvlm_weights_dummy(&c, o.dtype, 1, &w);
    if (!rc)
        rc = run_all(&o, w, &r);
    cvlm_weights_destroy(w);
    if (rc) {
        fprintf(stderr, "cogvlm bench-vlm: %s\n", cvlm_last_error());
        return 1;
    }
    report(&o, &c, &r, stdout, 0);
    FILE *f = o.json ? fopen(o.json, "w") : NULL;
    if (o.json && !f) {
        fprintf(stderr, "cogvlm bench-vlm: %s: cannot create\n", o.json);
        return 1;
    }
    if (f) {
        report(&o, &c, &r, f, 1);
        fclose(f);
    }
    return 0;
}
