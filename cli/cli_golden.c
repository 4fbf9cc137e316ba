/* cli_golden.c - `cogvlm golden --fixture DIR`: conformance against reference outputs.
 *
 * Reads a fixture in the format of golden-tiny/README.md (manifest.json + raw float32
 * arrays) and, for every case: rebuilds the prompt (ids, token types, position ids,
 * expert mask) from the template and query, runs the full prompt, compares the logits
 * of every position and the intermediate arrays, then decodes greedily with the KV cache
 * and compares each step's logits and token. The BF16 checks rerun a case on the BF16
 * weights with the RoPE inv_freq convention each one names. Every size comes from the
 * fixture's config.json. Exit status 0 only if every case is within tolerance.
 *
 * Tokens: `--tokens exact` (the default on the CPU backend) decodes freely and every
 * greedy token must match. `--tokens report` (the default with --backend cuda, whose
 * activations are BF16; its default tolerance is then 5e-2) feeds the reference tokens
 * instead of ours (teacher forcing), so that every step's logits stay comparable, and
 * reports how many tokens agree and, where one differs, the reference's top-2 margin: on a
 * random model a near tie flips a token under BF16 rounding without any kernel bug. A
 * differing token fails only if it is not a near tie (reference margin of our token over
 * 2 * tolerance * max(1, |logit|)).
 */
#include "cli/cli.h"
#include "engine/error.h"
#include "engine/image/image.h"
#include "engine/model/model.h"
#include "engine/model/quantize.h"
#include "engine/text/template.h"
#include "engine/util/fileio.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct golden {
    const char *dir;
    json_t *man;
    struct cvlm_tokenizer *tok;
    float *pixels; /* our preprocessing of the fixture image, CHW */
    double tol;
    struct cvlm_model_opts mo; /* backend, tp, threads */
    int report_tokens;         /* --tokens report: teacher-forced, differences reported */
    enum cvlm_quant quant;     /* --quantize: weights quantized at load */
    int quant_vision;          /* --quantize-vision */
    int quant_lm_head;         /* --quantize-lm-head (default true) */
    int failed, tok_agree, tok_total;
    int V;                    /* vocabulary of the model under test */
    double kl_sum, kl_max;    /* next-token KL(reference || ours), nats, every */
    long kl_rows, top1_agree; /* logits row compared (prompt and greedy) */
};

/* max |a-b| and max |a-b| / max(1, |b|) over n values */
struct err {
    double abs, rel;
};

static struct err compare(const float *ours, const float *ref, size_t n)
{
    struct err e = {0, 0};
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)ours[i] - ref[i]);
        double r = d / fmax(1.0, fabs(ref[i]));
        if (!(d <= e.abs))
            e.abs = d; /* also catches NaN */
        if (!(r <= e.rel))
            e.rel = r;
    }
    return e;
}

/* Loads the array a manifest descriptor {file, dtype, shape} names; *n = element count. */
static float *load_array(const struct golden *g, json_t *desc, size_t *n)
{
    char path[4096];
    json_t *shape = json_object_get(desc, "shape"), *v;
    size_t i, cnt = 1;
    FILE *f;
    float *buf;
    if (!json_is_string(json_object_get(desc, "file")) || !json_is_array(shape))
        return NULL;
    json_array_foreach (shape, i, v)
        cnt *= (size_t)json_integer_value(v);
    snprintf(path, sizeof(path), "%s/%s", g->dir, json_string_value(json_object_get(desc, "file")));
    if (!(f = fopen(path, "rb")))
        return NULL;
    buf = malloc(cnt * sizeof(float) + 1);
    if (buf && fread(buf, sizeof(float), cnt, f) != cnt) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = cnt;
    return buf;
}

static int json_ints_equal(json_t *arr, const void *vals, int n, int is_u8)
{
    if (!json_is_array(arr) || (int)json_array_size(arr) != n)
        return 0;
    for (int i = 0; i < n; i++) {
        long long want = json_integer_value(json_array_get(arr, (size_t)i));
        long long got = is_u8 ? ((const uint8_t *)vals)[i] : ((const int32_t *)vals)[i];
        if (want != got)
            return 0;
    }
    return 1;
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) /* lowest index wins ties, as torch.argmax */
            best = i;
    return best;
}

/* Captures the residual stream per layer for a whole prompt run in chunks. */
struct capture {
    float *hs; /* [L + 1, T, D] */
    int T, D, offset;
};

static void on_hidden(void *ctx, int layer, const float *rows, int n, int width)
{
    struct capture *c = ctx;
    memcpy(c->hs + ((size_t)layer * c->T + c->offset) * width, rows,
           (size_t)n * width * sizeof(float));
}

struct run {
    struct cvlm_prompt p;
    int32_t *blocks;
    struct cvlm_seq_kv seq;
    struct cvlm_feats *feats;
    float *logits;     /* [T, V] prompt logits */
    float *gen_logits; /* [steps, V] */
    int32_t *tokens;   /* [steps] */
    float *vit;        /* [num_positions, d] */
    struct capture cap;
};

/* Feeds slots [from, to) of the prompt; all their logits go to r->logits. */
static int prefill(struct cvlm_model *m, struct run *r, int from, int to)
{
    int n = to - from, V = cvlm_model_config(m)->vocab_size, rc;
    int32_t *seq = calloc((size_t)n, sizeof(int32_t)), *slot = malloc((size_t)n * 4),
            *img = malloc((size_t)n * 4);
    uint8_t *want = malloc((size_t)n);
    int img_len = cvlm_config_image_tokens(cvlm_model_config(m));
    if (!seq || !slot || !img || !want) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        int s = from + i;
        slot[i] = s;
        img[i] = r->p.image_start >= 0 && s >= r->p.image_start && s < r->p.image_start + img_len
                     ? s - r->p.image_start
                     : -1;
        want[i] = 1;
    }
    struct cvlm_batch b = {.n_tokens = n,
                           .ids = r->p.ids + from,
                           .pos = r->p.pos + from,
                           .expert = r->p.expert + from,
                           .seq = seq,
                           .slot = slot,
                           .img_row = img,
                           .img_feats = (const struct cvlm_feats *const *)&r->feats,
                           .seqs = &r->seq,
                           .n_seqs = 1,
                           .want_logits = want,
                           .on_hidden = on_hidden,
                           .dbg_ctx = &r->cap};
    r->cap.offset = from;
    rc = cvlm_model_forward(m, &b, r->logits + (size_t)from * V);
out:
    free(seq);
    free(slot);
    free(img);
    free(want);
    return rc;
}

/* Greedy continuation: step 0 is the prompt's last row, step k feeds token k-1: ours, or
 * with `forced` (teacher forcing) the reference's. */
static int generate(struct cvlm_model *m, struct run *r, int steps, const int32_t *forced)
{
    int V = cvlm_model_config(m)->vocab_size, T = r->p.n;
    memcpy(r->gen_logits, r->logits + (size_t)(T - 1) * V, (size_t)V * sizeof(float));
    r->tokens[0] = argmax(r->gen_logits, V);
    for (int k = 1; k < steps; k++) {
        int32_t id = forced ? forced[k - 1] : r->tokens[k - 1];
        int32_t pos = r->p.next_pos + k - 1, slot = T + k - 1, seq = 0;
        uint8_t expert = CVLM_EXPERT_LANG;
        struct cvlm_batch b = {.n_tokens = 1,
                               .ids = &id,
                               .pos = &pos,
                               .expert = &expert,
                               .seq = &seq,
                               .slot = &slot,
                               .seqs = &r->seq,
                               .n_seqs = 1};
        int rc = cvlm_model_forward(m, &b, r->gen_logits + (size_t)k * V);
        if (rc)
            return rc;
        r->tokens[k] = argmax(r->gen_logits + (size_t)k * V, V);
    }
    return 0;
}

static void run_free(struct cvlm_model *m, struct run *r)
{
    cvlm_model_feats_free(m, r->feats);
    cvlm_prompt_free(&r->p);
    free(r->blocks);
    free(r->logits);
    free(r->gen_logits);
    free(r->tokens);
    free(r->vit);
    free(r->cap.hs);
}

static int check_prompt(json_t *c, const struct cvlm_prompt *p)
{
    return json_ints_equal(json_object_get(c, "input_ids"), p->ids, p->n, 0) &&
           json_ints_equal(json_object_get(c, "token_type_ids"), p->types, p->n, 1) &&
           json_ints_equal(json_object_get(c, "position_ids"), p->pos, p->n, 0) &&
           json_ints_equal(json_object_get(c, "vision_expert_mask"), p->expert, p->n, 1);
}

/* The next-token distributions of logits rows: KL(reference || ours) in nats and whether
 * the argmax agrees, per row, summed into g (the quantization figure: a quantized model
 * against the unquantized reference). */
static void kl_rows(struct golden *g, const float *ours, const float *ref, size_t rows)
{
    int V = g->V;
    for (size_t r = 0; r < rows; r++) {
        const float *p = ref + r * V, *q = ours + r * V;
        double mp = p[0], mq = q[0], sp = 0, sq = 0, kl = 0;
        int ap = 0, aq = 0;
        for (int i = 1; i < V; i++) {
            ap = p[i] > p[ap] ? i : ap;
            aq = q[i] > q[aq] ? i : aq;
        }
        mp = p[ap];
        mq = q[aq];
        for (int i = 0; i < V; i++) {
            sp += exp(p[i] - mp);
            sq += exp(q[i] - mq);
        }
        double lp = mp + log(sp), lq = mq + log(sq);
        for (int i = 0; i < V; i++) {
            double a = p[i] - lp, b = q[i] - lq;
            kl += exp(a) * (a - b);
        }
        g->kl_sum += kl;
        g->kl_max = kl > g->kl_max ? kl : g->kl_max;
        g->kl_rows++;
        g->top1_agree += ap == aq;
    }
}

/* Compares ours against the array a descriptor names; prints "name abs rel"; returns
 * 1 if within tolerance. A missing descriptor is skipped (returns 1). */
static int report(struct golden *g, json_t *c, const char *key, const char *label,
                  const float *ours, size_t n)
{
    json_t *desc = json_object_get(c, key);
    size_t rn = 0;
    float *ref;
    if (!desc)
        return 1;
    ref = load_array(g, json_object_get(c, key), &rn);
    if (!ref || rn != n) {
        printf("  %-16s missing or wrong size (%zu values, ours %zu)\n", label, rn, n);
        free(ref);
        return 0;
    }
    struct err e = compare(ours, ref, n);
    int ok = e.rel <= g->tol;
    if (!strcmp(key, "logits") && g->V > 0 && n % (size_t)g->V == 0)
        kl_rows(g, ours, ref, n / (size_t)g->V);
    printf("  %-16s max abs %.3g  max rel %.3g  %s\n", label, e.abs, e.rel, ok ? "ok" : "FAIL");
    free(ref);
    return ok;
}

/* The reference's greedy tokens (NULL if the fixture has no list of `steps` of them). */
static int32_t *ref_tokens(json_t *gen, int steps)
{
    json_t *t = json_object_get(gen, "tokens");
    int32_t *ids;
    if (!json_is_array(t) || (int)json_array_size(t) != steps ||
        !(ids = malloc((size_t)steps * sizeof(*ids))))
        return NULL;
    for (int k = 0; k < steps; k++)
        ids[k] = (int32_t)json_integer_value(json_array_get(t, (size_t)k));
    return ids;
}

/* One differing token: the reference's top-2 margin, where our token stands in the
 * reference logits, and our own margin. 1 if it is a near tie (see the file header). */
static int token_diff(const struct golden *g, int k, int want, int got, const float *ref,
                      const float *ours, int V)
{
    float second = -INFINITY;
    for (int i = 0; ref && i < V; i++)
        if (i != want && ref[i] > second)
            second = ref[i];
    if (!ref) {
        printf("    step %d: reference %d, ours %d (no reference logits)\n", k, want, got);
        return 1;
    }
    double behind = (double)ref[want] - ref[got], bound = 2 * g->tol * fmax(1.0, fabs(ref[want]));
    printf("    step %d: reference %d, ours %d; reference top-2 margin %.4g, our token %.4g "
           "below its top; our margin %.4g: %s\n",
           k, want, got, (double)ref[want] - second, behind, (double)ours[got] - ours[want],
           behind <= bound ? "near tie" : "NOT a near tie");
    return behind <= bound;
}

/* --tokens report: agreement of the teacher-forced greedy tokens; 1 unless a differing
 * token is not a near tie. */
static int token_report(struct golden *g, json_t *gen, const struct run *r, const int32_t *want,
                        int steps, int V)
{
    size_t n = 0;
    float *ref = load_array(g, json_object_get(gen, "logits"), &n);
    int agree = 0, ok = 1;
    if (ref && n != (size_t)steps * V) {
        free(ref);
        ref = NULL;
    }
    for (int k = 0; k < steps; k++)
        agree += r->tokens[k] == want[k];
    printf("  %-16s %d/%d agree (teacher-forced)\n", "greedy tokens", agree, steps);
    for (int k = 0; k < steps; k++)
        if (r->tokens[k] != want[k])
            ok &= token_diff(g, k, want[k], r->tokens[k], ref ? ref + (size_t)k * V : NULL,
                             r->gen_logits + (size_t)k * V, V);
    g->tok_agree += agree;
    g->tok_total += steps;
    free(ref);
    return ok;
}

static int setup_run(struct golden *g, struct cvlm_model *m, json_t *c, struct run *r, int steps)
{
    const struct cvlm_config *cfg = cvlm_model_config(m);
    const char *t = json_string_value(json_object_get(c, "template_version"));
    const char *q = json_string_value(json_object_get(c, "query"));
    int has_image = json_is_true(json_object_get(c, "has_image")), rc;
    enum cvlm_template tmpl = !t                   ? cfg->template_version
                              : !strcmp(t, "base") ? CVLM_TEMPLATE_BASE
                              : !strcmp(t, "vqa")  ? CVLM_TEMPLATE_VQA
                                                   : CVLM_TEMPLATE_CHAT;
    if (!q)
        return cvlm_errf(CVLM_EFORMAT, "case without a query");
    if ((rc = cvlm_prompt_build(cfg, g->tok, tmpl, NULL, 0, q, has_image, &r->p)))
        return rc;
    int V = cfg->vocab_size, D = cfg->hidden_size, T = r->p.n, bs = cvlm_model_block_size(m);
    r->seq.n_blocks = (T + steps + bs - 1) / bs;
    if (r->seq.n_blocks > cvlm_model_kv_blocks(m))
        return cvlm_errf(CVLM_ETOOBIG, "prompt of %d tokens exceeds the KV cache", T);
    r->blocks = malloc((size_t)r->seq.n_blocks * sizeof(int32_t));
    r->logits = malloc((size_t)T * V * sizeof(float));
    r->gen_logits = malloc((size_t)steps * V * sizeof(float));
    r->tokens = malloc((size_t)steps * sizeof(int32_t));
    r->cap.hs = calloc((size_t)(cfg->num_layers + 1) * T * D, sizeof(float));
    r->cap.T = T;
    r->cap.D = D;
    if (!r->blocks || !r->logits || !r->gen_logits || !r->tokens || !r->cap.hs)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (int i = 0; i < r->seq.n_blocks; i++)
        r->blocks[i] = i;
    r->seq.block_table = r->blocks;
    if (has_image) {
        size_t d = (size_t)cfg->vision.hidden_size, N = (size_t)cfg->vision.num_positions;
        r->feats = cvlm_model_feats_alloc(m);
        r->vit = malloc(N * d * sizeof(float));
        if (!r->feats || !r->vit)
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
        if ((rc = cvlm_model_encode_image(m, g->pixels, r->feats, r->vit)))
            return rc;
    }
    return 0;
}

/* Runs one case; `full` also compares the prompt logits and intermediate arrays. */
static void run_case(struct golden *g, struct cvlm_model *m, json_t *c, const char *label, int full)
{
    const struct cvlm_config *cfg = cvlm_model_config(m);
    json_t *gen = json_object_get(c, "generate");
    int steps = (int)json_integer_value(json_object_get(gen, "steps")), ok = 1, rc;
    int V = cfg->vocab_size, D = cfg->hidden_size, chunk = cvlm_model_max_tokens(m);
    struct run r = {0};
    int32_t *forced = NULL;

    printf("case %s\n", label);
    g->V = V;
    if (steps <= 0)
        steps = 1;
    if ((rc = setup_run(g, m, c, &r, steps)))
        goto fail;
    int prompt_ok = check_prompt(c, &r.p);
    printf("  %-16s %s (%d tokens)\n", "prompt", prompt_ok ? "ok" : "FAIL", r.p.n);
    ok &= prompt_ok;
    if (full && r.vit) {
        size_t nf = (size_t)cvlm_config_image_tokens(cfg) * D;
        float *feats = malloc(nf * sizeof(float));
        ok &= report(g, c, "vit_output", "vit_output", r.vit,
                     (size_t)cfg->vision.num_positions * cfg->vision.hidden_size);
        if (feats) {
            cvlm_model_feats_to_host(m, r.feats, feats);
            ok &= report(g, c, "vision_features", "vision_features", feats, nf);
            free(feats);
        }
    }
    for (int from = 0; from < r.p.n; from += chunk)
        if ((rc = prefill(m, &r, from, from + chunk < r.p.n ? from + chunk : r.p.n)))
            goto fail;
    if (full) {
        ok &= report(g, c, "logits", "prompt logits", r.logits, (size_t)r.p.n * V);
        ok &= report(g, c, "hidden_states", "hidden_states", r.cap.hs,
                     (size_t)(cfg->num_layers + 1) * r.p.n * D);
    }
    forced = g->report_tokens ? ref_tokens(gen, steps) : NULL;
    if ((rc = generate(m, &r, steps, forced)))
        goto fail;
    ok &= report(g, gen, "logits", "greedy logits", r.gen_logits, (size_t)steps * V);
    if (forced) {
        ok &= token_report(g, gen, &r, forced, steps, V);
    } else {
        int match = json_ints_equal(json_object_get(gen, "tokens"), r.tokens, steps, 0);
        printf("  %-16s %s\n", "greedy tokens", match ? "all match" : "MISMATCH");
        ok &= match;
    }
    printf("  => %s\n", ok ? "PASS" : "FAIL");
    free(forced);
    g->failed += !ok;
    run_free(m, &r);
    return;
fail:
    printf("  error: %s\n  => FAIL\n", cvlm_last_error());
    g->failed++;
    free(forced);
    run_free(m, &r);
}

/* Opens the model of one weights entry ("float32"/"bfloat16") with a RoPE convention. */
static int open_model(struct golden *g, const char *key, enum cvlm_rope_freq rf,
                      struct cvlm_weights **w, struct cvlm_model **m)
{
    json_t *e = json_object_get(json_object_get(g->man, "weights"), key);
    const char *dir = json_string_value(json_object_get(e, "dir"));
    char path[4096];
    struct cvlm_model_opts o = g->mo;
    o.rope_freq = rf;
    int rc;
    if (!dir)
        return cvlm_errf(CVLM_EFORMAT, "manifest: no weights.%s.dir", key);
    snprintf(path, sizeof(path), "%s/%s", g->dir, dir);
    if ((rc = cvlm_weights_load(path, w)))
        return rc;
    if ((rc = cvlm_weights_quantize(*w, g->quant, g->quant_vision, g->quant_lm_head)) ||
        (rc = cvlm_model_create(*w, &o, m))) {
        cvlm_weights_destroy(*w);
        *w = NULL;
    }
    return rc;
}

/* Decodes, resizes and normalizes the fixture image with our pipeline into g->pixels. */
static int preprocess_image(struct golden *g, const char *path, int S)
{
    unsigned char *buf;
    size_t len;
    int rc = cvlm_read_file(path, (size_t)1 << 30, &buf, &len);
    if (rc)
        return rc;
    rc = cvlm_image_preprocess(buf, len, NULL, S, &g->pixels, NULL, NULL);
    free(buf);
    return rc;
}

/* Our own preprocessing of the fixture image, checked against pixel_values. If it fails
 * or differs, that is reported as a failure and the model cases run on the reference
 * pixels instead, so that an image-pipeline error does not hide the model's state. */
static void prepare_image(struct golden *g, const struct cvlm_config *cfg)
{
    json_t *im = json_object_get(g->man, "image");
    const char *file = json_string_value(json_object_get(im, "file"));
    char path[4096];
    size_t n = 0, want = (size_t)3 * cfg->vision.image_size * cfg->vision.image_size;
    if (!file)
        return; /* a text-only fixture */
    snprintf(path, sizeof(path), "%s/%s", g->dir, file);
    int rc = preprocess_image(g, path, cfg->vision.image_size);
    float *ref = load_array(g, json_object_get(im, "pixel_values"), &n);
    if (ref && n != want) {
        free(ref);
        ref = NULL;
    }
    if (rc) {
        printf("pixel_values       error: %s\n", cvlm_last_error());
        g->failed++;
    } else if (ref) {
        struct err e = compare(g->pixels, ref, n);
        printf("pixel_values       max abs %.3g  %s\n", e.abs, e.abs == 0 ? "exact" : "DIFFERS");
        g->failed += e.abs > 0;
    }
    if (ref && (rc || !g->pixels)) {
        free(g->pixels);
        g->pixels = ref; /* continue on the reference pixels */
    } else {
        free(ref);
    }
}

static int load_tokenizer(struct golden *g, const char *override)
{
    json_t *t = json_object_get(g->man, "tokenizer");
    const char *file = json_string_value(json_object_get(t, "file"));
    char path[4096];
    if (override)
        snprintf(path, sizeof(path), "%s", override);
    else if (!file)
        return cvlm_errf(CVLM_EFORMAT, "manifest names no tokenizer; pass --tokenizer");
    else {
        /* the fixture's tokenizer sits in the fixture or next to it */
        snprintf(path, sizeof(path), "%s/%s", g->dir, file);
        if (access(path, R_OK) != 0)
            snprintf(path, sizeof(path), "%s/../%s", g->dir, file);
    }
    return cvlm_tokenizer_load(path, &g->tok);
}

static void run_all(struct golden *g)
{
    struct cvlm_weights *w = NULL;
    struct cvlm_model *m = NULL;
    json_t *c, *cases = json_object_get(g->man, "cases");
    size_t i;
    if (open_model(g, "float32", CVLM_ROPE_FREQ_AUTO, &w, &m)) {
        printf("error: %s\n", cvlm_last_error());
        g->failed++;
    } else {
        prepare_image(g, &w->cfg);
        json_array_foreach (cases, i, c)
            run_case(g, m, c, json_string_value(json_object_get(c, "name")), 1);
    }
    cvlm_model_destroy(m);
    cvlm_weights_destroy(w);
    json_array_foreach (json_object_get(g->man, "bf16_checks"), i, c) {
        const char *variant = json_string_value(json_object_get(c, "variant"));
        enum cvlm_rope_freq rf = variant && !strcmp(variant, "inv_freq_exact")
                                     ? CVLM_ROPE_FREQ_EXACT
                                     : CVLM_ROPE_FREQ_FILE;
        char label[256];
        const char *name = json_string_value(json_object_get(c, "name"));
        snprintf(label, sizeof(label), "bf16 %s (%s)", name ? name : "?", variant ? variant : "?");
        if (open_model(g, "bfloat16", rf, &w, &m)) {
            printf("case %s\n  error: %s\n  => FAIL\n", label, cvlm_last_error());
            g->failed++;
            continue;
        }
        run_case(g, m, c, label, 0);
        cvlm_model_destroy(m);
        cvlm_weights_destroy(w);
    }
}

/* The options into g and *tok; -1 to go on, else the exit status (usage, --help). */
static int parse_args(int argc, char **argv, struct golden *g, const char **tok)
{
    int rc;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--fixture") && i + 1 < argc)
            g->dir = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc)
            *tok = argv[++i];
        else if (!strcmp(argv[i], "--tol") && i + 1 < argc)
            g->tol = atof(argv[++i]);
        else if (!strcmp(argv[i], "--quantize") && i + 1 < argc) {
            if (cvlm_quant_parse(argv[++i], &g->quant)) {
                fprintf(stderr, "cogvlm golden: %s\n", cvlm_last_error());
                return 2;
            }
        } else if (!strcmp(argv[i], "--quantize-vision"))
            g->quant_vision = 1;
        else if (!strcmp(argv[i], "--quantize-lm-head") && i + 1 < argc) {
            if (cvlm_cli_bool(argv[i], argv[i + 1], &g->quant_lm_head))
                return 2;
            i++;
        } else if (!strcmp(argv[i], "--tokens") && i + 1 < argc &&
                   (!strcmp(argv[i + 1], "exact") || !strcmp(argv[i + 1], "report")))
            g->report_tokens = !strcmp(argv[++i], "report");
        else if ((rc = cvlm_cli_model_opt(argc, argv, &i, &g->mo)) < 0)
            return 2;
        else if (!rc) {
            printf("usage: cogvlm golden --fixture DIR [--tokenizer PATH] [--tol REL]\n"
                   "       [--tokens exact|report] [--quantize none|int8|int4 [--quantize-vision]\n"
                   "       [--quantize-lm-head true|false]]\n"
                   "       " CVLM_CLI_MODEL_USAGE "\n"
                   "Checks the engine against a reference fixture (golden-tiny format).\n"
                   "Tolerance: |ours - ref| <= REL * max(1, |ref|), default 1e-4 (5e-2 with\n"
                   "--backend cuda: BF16 activations).\n"
                   "--tokens: exact (default; cpu): free greedy decoding, every token must\n"
                   "match; report (default with --backend cuda): the reference tokens are fed,\n"
                   "agreement and the top-2 margins of differing tokens are reported, and only\n"
                   "a difference that is not a near tie fails.\n"
                   "--quantize: the weights quantized at load; the errors are measured and\n"
                   "reported (tokens: report), not held to a tolerance unless --tol is "
                   "given; lm_head is int8 too unless --quantize-lm-head false (as the\n"
                   "server's quantize_lm_head).\n" CVLM_CLI_MODEL_HELP);
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    int bf16_acts = g->mo.backend == CVLM_BACKEND_CUDA; /* the CUDA backend's activations */
    if (g->tol < 0)
        g->tol = g->quant ? 1e30 : bf16_acts ? 5e-2 : 1e-4;
    if (g->report_tokens < 0)
        g->report_tokens = bf16_acts || g->quant;
    return -1;
}

int cvlm_cli_golden(int argc, char **argv)
{
    struct golden g = {.tol = -1, .report_tokens = -1, .quant_lm_head = 1};
    int rc;
    const char *tok = NULL;
    char path[4096];
    json_error_t jerr;
    if ((rc = parse_args(argc, argv, &g, &tok)) >= 0)
        return rc;
    if (!g.dir) {
        fprintf(stderr, "cogvlm golden: --fixture DIR is required\n");
        return 2;
    }
    snprintf(path, sizeof(path), "%s/manifest.json", g.dir);
    if (!(g.man = json_load_file(path, 0, &jerr))) {
        fprintf(stderr, "cogvlm golden: %s: %s\n", path, jerr.text);
        return 1;
    }
    if (load_tokenizer(&g, tok)) {
        fprintf(stderr, "cogvlm golden: %s\n", cvlm_last_error());
        json_decref(g.man);
        return 1;
    }
    run_all(&g);
    printf("golden: %s (tolerance %.0e relative, %s backend, tp %d)",
           g.failed ? "FAILED" : "all cases pass", g.tol,
           g.mo.backend == CVLM_BACKEND_CUDA ? "cuda" : "cpu", g.mo.tp > 1 ? g.mo.tp : 1);
    if (g.report_tokens)
        printf("; tokens reported: %d/%d greedy tokens agree", g.tok_agree, g.tok_total);
    printf("\n");
    if (g.kl_rows)
        printf("next-token KL(reference || ours): mean %.3g nats, max %.3g over %ld positions; "
               "argmax agrees at %ld (%.1f %%)\n",
               g.kl_sum / g.kl_rows, g.kl_max, g.kl_rows, g.top1_agree,
               100.0 * g.top1_agree / g.kl_rows);
    cvlm_tokenizer_destroy(g.tok);
    free(g.pixels);
    json_decref(g.man);
    return g.failed ? 1 : 0;
}
