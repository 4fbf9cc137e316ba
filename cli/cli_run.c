/* cli_run.c - `cogvlm run`: one question (optionally about one image), answer streamed.
 *
 * Loads the model, preprocesses the image, runs the vision tower, prefills the prompt in
 * chunks and decodes token by token with the sampler, streaming whole UTF-8 text to
 * stdout. Timings go to stderr: image preprocess ms, vision tower ms, prefill tokens/s,
 * decode tokens/s.
 */
#include "base/clock.h"
#include "cli/cli.h"
#include "engine/error.h"
#include "engine/image/image.h"
#include "engine/model/model.h"
#include "engine/sched/sampler.h"
#include "engine/text/template.h"
#include "engine/util/fileio.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MODEL "models/cogvlm-tiny-shapes"

struct run_opts {
    const char *model, *tokenizer, *image, *prompt, *tmpl;
    int max_tokens;
    struct cvlm_model_opts mo; /* backend, tp, threads */
    struct cvlm_sampling sp;
};

static int usage(int rc)
{
    fprintf(
        rc ? stderr : stdout,
        "usage: cogvlm run [--model DIR] [--tokenizer PATH] [--image PATH] --prompt TEXT\n"
        "                  [--template chat|vqa|base] [--max-tokens N] [--temperature T]\n"
        "                  [--top-p P] [--top-k K] [--seed S]\n"
        "                  " CVLM_CLI_MODEL_USAGE "\n"
        "Defaults: --model " DEFAULT_MODEL ", tokenizer DIR/tokenizer.model, the model's\n"
        "template, 128 new tokens, greedy (temperature 0), threads = cores.\n" CVLM_CLI_MODEL_HELP);
    return rc;
}

static int parse(int argc, char **argv, struct run_opts *o)
{
    memset(o, 0, sizeof(*o));
    cvlm_sampling_defaults(&o->sp);
    o->model = DEFAULT_MODEL;
    o->max_tokens = 128;
    for (int i = 1; i < argc; i++) {
        const char *a, *v;
        int k = cvlm_cli_arg(argc, argv, &i, &o->mo, &a, &v);
        if (k != 1) {
            if (k)
                return k == 2 ? 1 : -1;
            continue;
        }
        if (!strcmp(a, "--model"))
            o->model = v;
        else if (!strcmp(a, "--tokenizer"))
            o->tokenizer = v;
        else if (!strcmp(a, "--image"))
            o->image = v;
        else if (!strcmp(a, "--prompt"))
            o->prompt = v;
        else if (!strcmp(a, "--template"))
            o->tmpl = v;
        else if (!strcmp(a, "--max-tokens"))
            o->max_tokens = atoi(v);
        else if (!strcmp(a, "--temperature"))
            o->sp.temperature = (float)atof(v);
        else if (!strcmp(a, "--top-p"))
            o->sp.top_p = (float)atof(v);
        else if (!strcmp(a, "--top-k"))
            o->sp.top_k = atoi(v);
        else if (!strcmp(a, "--seed"))
            o->sp.seed = strtoull(v, NULL, 10);
        else
            return -1;
    }
    if (!o->prompt || o->max_tokens < 1 || o->sp.temperature < 0 || o->sp.top_p <= 0 ||
        o->sp.top_p > 1 || o->sp.top_k < 0)
        return -1;
    if (o->tmpl && strcmp(o->tmpl, "chat") && strcmp(o->tmpl, "vqa") && strcmp(o->tmpl, "base"))
        return -1;
    return 0;
}

/* Reads, decodes, resizes and normalizes an image into a malloc'd CHW float array. */
static int load_pixels(const char *path, int size, float **out)
{
    unsigned char *buf;
    size_t len;
    int rc = cvlm_read_file(path, (size_t)1 << 30, &buf, &len);
    if (rc)
        return rc;
    rc = cvlm_image_preprocess(buf, len, NULL, size, out, NULL, NULL);
    free(buf);
    return rc;
}

struct session {
    struct cvlm_weights *w;
    struct cvlm_model *m;
    struct cvlm_tokenizer *tok;
    struct cvlm_prompt p;
    float *pixels, *logits;
    struct cvlm_feats *feats;
    int32_t *blocks, *tokens;
    double t_img, t_vit, t_prefill, t_decode;
    int n_decoded;
};

static int open_session(const struct run_opts *o, struct session *s)
{
    char path[4096];
    int rc;
    if ((rc = cvlm_weights_load(o->model, &s->w)) ||
        (o->mo.backend == CVLM_BACKEND_CPU && (rc = cvlm_weights_to_memory(s->w))))
        return rc;
    snprintf(path, sizeof(path), "%s/tokenizer.model", o->model);
    if ((rc = cvlm_tokenizer_load(o->tokenizer ? o->tokenizer : path, &s->tok)))
        return rc;
    const struct cvlm_config *c = &s->w->cfg;
    enum cvlm_template t = !o->tmpl                   ? c->template_version
                           : !strcmp(o->tmpl, "base") ? CVLM_TEMPLATE_BASE
                           : !strcmp(o->tmpl, "vqa")  ? CVLM_TEMPLATE_VQA
                                                      : CVLM_TEMPLATE_CHAT;
    if ((rc = cvlm_prompt_build(c, s->tok, t, NULL, 0, o->prompt, o->image != NULL, &s->p)))
        return rc;
    int total = s->p.n + o->max_tokens, bs = 16;
    struct cvlm_model_opts mo = o->mo;
    mo.max_tokens = s->p.n < 512 ? s->p.n : 512;
    mo.block_size = bs;
    mo.kv_blocks = (total + bs - 1) / bs;
    if ((rc = cvlm_model_create(s->w, &mo, &s->m)))
        return rc;
    s->blocks = malloc((size_t)mo.kv_blocks * sizeof(int32_t));
    s->tokens = malloc((size_t)total * sizeof(int32_t));
    s->logits = malloc((size_t)c->vocab_size * sizeof(float));
    if (!s->blocks || !s->tokens || !s->logits)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (int i = 0; i < mo.kv_blocks; i++)
        s->blocks[i] = i; /* one sequence owns the whole cache */
    memcpy(s->tokens, s->p.ids, (size_t)s->p.n * sizeof(int32_t));
    return 0;
}

static void close_session(struct session *s)
{
    if (s->feats)
        cvlm_model_feats_free(s->m, s->feats);
    cvlm_model_destroy(s->m);
    cvlm_weights_destroy(s->w);
    cvlm_tokenizer_destroy(s->tok);
    cvlm_prompt_free(&s->p);
    free(s->pixels);
    free(s->logits);
    free(s->blocks);
    free(s->tokens);
}

static int encode_image(const struct run_opts *o, struct session *s)
{
    const struct cvlm_config *c = &s->w->cfg;
    double t0 = cvlm_now_ms();
    int rc = load_pixels(o->image, c->vision.image_size, &s->pixels);
    if (rc)
        return rc;
    s->t_img = cvlm_now_ms() - t0;
    s->feats = cvlm_model_feats_alloc(s->m);
    if (!s->feats)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    t0 = cvlm_now_ms();
    rc = cvlm_model_encode_image(s->m, s->pixels, s->feats, NULL);
    s->t_vit = cvlm_now_ms() - t0;
    return rc;
}

/* Feeds tokens [from, to) of s->tokens at their slots; the last one's logits are kept. */
static int feed(struct session *s, int from, int to, const int32_t *pos, const uint8_t *expert)
{
    int n = to - from, img_len = cvlm_config_image_tokens(&s->w->cfg), rc;
    int32_t *seq = calloc((size_t)n, sizeof(int32_t)), *slot = malloc((size_t)n * 4),
            *img = malloc((size_t)n * 4);
    struct cvlm_seq_kv kv = {s->blocks, cvlm_model_kv_blocks(s->m)};
    if (!seq || !slot || !img) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        int at = from + i, rel = at - s->p.image_start;
        slot[i] = at;
        img[i] = s->p.image_start >= 0 && rel >= 0 && rel < img_len ? rel : -1;
    }
    struct cvlm_batch b = {.n_tokens = n,
                           .ids = s->tokens + from,
                           .pos = pos,
                           .expert = expert,
                           .seq = seq,
                           .slot = slot,
                           .img_row = img,
                           .img_feats = (const struct cvlm_feats *const *)&s->feats,
                           .seqs = &kv,
                           .n_seqs = 1};
    rc = cvlm_model_forward(s->m, &b, s->logits);
out:
    free(seq);
    free(slot);
    free(img);
    return rc;
}

static int generate(const struct run_opts *o, struct session *s)
{
    const struct cvlm_config *c = &s->w->cfg;
    struct cvlm_rng rng;
    struct cvlm_detok dt;
    char text[1024];
    size_t len;
    int n = s->p.n, chunk = cvlm_model_max_tokens(s->m), rc;
    double t0 = cvlm_now_ms();
    for (int from = 0; from < n; from += chunk) {
        int to = from + chunk < n ? from + chunk : n;
        if ((rc = feed(s, from, to, s->p.pos + from, s->p.expert + from)))
            return rc;
    }
    s->t_prefill = cvlm_now_ms() - t0;
    cvlm_rng_seed(&rng, o->sp.seed);
    cvlm_detok_init(&dt, s->tok);
    t0 = cvlm_now_ms();
    for (int k = 0; k < o->max_tokens; k++) {
        int id = cvlm_sample(&o->sp, s->logits, c->vocab_size, s->tokens, n + k, n, &rng);
        if (id < 0)
            return id;
        if (cvlm_config_is_eos(c, id))
            break;
        s->tokens[n + k] = id;
        s->n_decoded++;
        if (!cvlm_detok_push(&dt, id, text, sizeof(text), &len) && len) {
            fwrite(text, 1, len, stdout);
            fflush(stdout);
        }
        if (k + 1 == o->max_tokens)
            break;
        int32_t pos = s->p.next_pos + k;
        uint8_t expert = CVLM_EXPERT_LANG;
        if ((rc = feed(s, n + k, n + k + 1, &pos, &expert)))
            return rc;
    }
    s->t_decode = cvlm_now_ms() - t0;
    if (!cvlm_detok_flush(&dt, text, sizeof(text), &len) && len)
        fwrite(text, 1, len, stdout);
    putchar('\n');
    return 0;
}

int cvlm_cli_run(int argc, char **argv)
{
    struct run_opts o;
    struct session s = {0};
    int rc = parse(argc, argv, &o);
    if (rc)
        return usage(rc < 0 ? 2 : 0);
    if ((rc = open_session(&o, &s)) || (o.image && (rc = encode_image(&o, &s))) ||
        (rc = generate(&o, &s))) {
        fprintf(stderr, "cogvlm run: %s\n", cvlm_last_error());
        close_session(&s);
        return 1;
    }
    if (o.image)
        fprintf(stderr, "image preprocess %.1f ms, vision tower %.1f ms\n", s.t_img, s.t_vit);
    fprintf(stderr,
            "prefill %d tokens in %.1f ms (%.1f tokens/s), decode %d tokens in %.1f ms "
            "(%.1f tokens/s), %s backend, tp %d, %d threads per rank\n",
            s.p.n, s.t_prefill, s.p.n / (s.t_prefill / 1e3), s.n_decoded, s.t_decode,
            s.n_decoded > 0 ? s.n_decoded / (s.t_decode / 1e3) : 0.0,
            cvlm_model_backend(s.m)->ops->name, cvlm_model_tp(s.m),
            cvlm_model_backend(s.m)->n_threads);
    close_session(&s);
    return 0;
}
