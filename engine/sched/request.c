/* request.c - request preparation, reference counting, and the output queue.
 *
 * cvlm_request_create runs on any thread (the server's work pool): it validates the
 * parameters, decodes and preprocesses the image, renders and tokenizes the prompt and
 * checks the context length, so that the engine thread only ever sees ready requests.
 * The output side implements stop strings by holding back any decoded suffix that could
 * still become the start of a stop string.
 */
#include "engine/sched/request.h"

#include "engine/engine_private.h"
#include "engine/image/image.h"
#include "engine/text/template.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_STOPS 16
#define MAX_STOP_LEN 256

static int check_sampling(const struct cvlm_sampling *s)
{
    if (!isfinite(s->temperature) || s->temperature < 0 || s->temperature > 100)
        return cvlm_errf(CVLM_EINVAL, "temperature must be between 0 and 100");
    if (!(s->top_p > 0 && s->top_p <= 1))
        return cvlm_errf(CVLM_EINVAL, "top_p must be in (0, 1]");
    if (s->top_k < 0)
        return cvlm_errf(CVLM_EINVAL, "top_k must be >= 0");
    if (!(s->min_p >= 0 && s->min_p <= 1))
        return cvlm_errf(CVLM_EINVAL, "min_p must be in [0, 1]");
    if (!(s->repetition_penalty > 0 && s->repetition_penalty <= 10))
        return cvlm_errf(CVLM_EINVAL, "repetition_penalty must be in (0, 10]");
    if (!(fabsf(s->presence_penalty) <= 2) || !(fabsf(s->frequency_penalty) <= 2))
        return cvlm_errf(CVLM_EINVAL, "presence/frequency penalties must be in [-2, 2]");
    return 0;
}

/* OpenAI's logit_bias: at most 300 entries, biases in [-100, 100]. */
static int check_logit_bias(const struct cvlm_request_params *p, int V)
{
    if (p->n_logit_bias < 0 || p->n_logit_bias > CVLM_MAX_LOGIT_BIAS)
        return cvlm_errf(CVLM_EINVAL, "logit_bias: at most %d entries (got %d)",
                         CVLM_MAX_LOGIT_BIAS, p->n_logit_bias);
    if (p->n_logit_bias && !p->logit_bias)
        return cvlm_errf(CVLM_EINVAL, "logit_bias: %d entries but no list", p->n_logit_bias);
    for (int i = 0; i < p->n_logit_bias; i++) {
        const struct cvlm_logit_bias *b = &p->logit_bias[i];
        if (b->id < 0 || b->id >= V)
            return cvlm_errf(CVLM_EINVAL,
                             "logit_bias: token id %d is outside the vocabulary of %d tokens",
                             (int)b->id, V);
        if (!(fabsf(b->bias) <= 100))
            return cvlm_errf(CVLM_EINVAL, "logit_bias: the bias of token %d must be in [-100, 100]",
                             (int)b->id);
    }
    return 0;
}

/* Every id a request carries must index the model's vocabulary: the engine batches
 * requests together, and one bad id would fail the forward pass of all of them. */
static int check_stop_ids(const struct cvlm_request_params *p, int V)
{
    if (p->n_stop_ids < 0 || p->n_stop_ids > 64)
        return cvlm_errf(CVLM_EINVAL, "at most 64 stop token ids");
    if (p->n_stop_ids && !p->stop_ids)
        return cvlm_errf(CVLM_EINVAL, "%d stop token ids but no list", p->n_stop_ids);
    for (int i = 0; i < p->n_stop_ids; i++)
        if (p->stop_ids[i] < 0 || p->stop_ids[i] >= V)
            return cvlm_errf(CVLM_EINVAL, "stop token id %d is outside the vocabulary of %d tokens",
                             (int)p->stop_ids[i], V);
    return 0;
}

static int check_params(const struct cvlm_request_params *p, int V)
{
    int rc;
    if (!p->prompt)
        return cvlm_errf(CVLM_EINVAL, "no prompt");
    if (p->raw && p->image)
        return cvlm_errf(CVLM_EINVAL, "a raw completion prompt cannot carry an image");
    if (p->max_tokens < 0)
        return cvlm_errf(CVLM_EINVAL, "max_tokens must be >= 0");
    if (p->n_stop < 0 || p->n_stop > MAX_STOPS)
        return cvlm_errf(CVLM_EINVAL, "at most %d stop strings", MAX_STOPS);
    for (int i = 0; i < p->n_stop; i++)
        if (!p->stop[i] || !*p->stop[i] || strlen(p->stop[i]) > MAX_STOP_LEN)
            return cvlm_errf(CVLM_EINVAL, "stop strings must be 1..%d bytes", MAX_STOP_LEN);
    if ((rc = check_stop_ids(p, V)) || (rc = check_logit_bias(p, V)))
        return rc;
    if (p->logprobs < -1 || p->logprobs > CVLM_MAX_TOP_LOGPROBS)
        return cvlm_errf(CVLM_EINVAL, "top logprobs must be in 0..%d", CVLM_MAX_TOP_LOGPROBS);
    if (p->template_name && strcmp(p->template_name, "base") && strcmp(p->template_name, "chat") &&
        strcmp(p->template_name, "vqa"))
        return cvlm_errf(CVLM_EINVAL, "template must be base, chat or vqa");
    if ((rc = check_sampling(&p->sampling)))
        return rc;
    return 0;
}

/* Decodes and preprocesses the image; the hash covers the pixels the model will see. */
static int prepare_image(struct cvlm_engine *e, const struct cvlm_request_params *p,
                         struct cvlm_request *r)
{
    const struct cvlm_config *c = &e->w->cfg;
    struct cvlm_image_limits lim = {e->opts.max_image_pixels};
    if (!c->has_vision)
        return cvlm_errf(CVLM_EINVAL, "this model does not take images");
    return cvlm_image_preprocess(p->image, p->image_len, &lim, c->vision.image_size, &r->pixels,
                                 &r->img_hash, r->image_wh);
}

static enum cvlm_template template_of(const struct cvlm_engine *e, const char *name)
{
    if (!name)
        return e->w->cfg.template_version;
    return !strcmp(name, "base")  ? CVLM_TEMPLATE_BASE
           : !strcmp(name, "vqa") ? CVLM_TEMPLATE_VQA
                                  : CVLM_TEMPLATE_CHAT;
}

/* Fills the prompt (ids into r->tokens later, positions, experts) from the parameters. */
/* Refuses, before any BPE work, a prompt whose texts alone already need more tokens than
 * the context holds (a client could otherwise make the server tokenize megabytes only to
 * be told the prompt is too long). */
static int check_prompt_bound(struct cvlm_engine *e, const struct cvlm_request_params *p)
{
    size_t total = 0, n;
    int rc = cvlm_tokenizer_min_ids(e->tok, p->prompt, strlen(p->prompt), &total);
    for (int i = 0; !rc && !p->raw && i < p->n_history && i <= 1024; i++) {
        const char *u = p->history[i].user, *a = p->history[i].assistant;
        if (u && !(rc = cvlm_tokenizer_min_ids(e->tok, u, strlen(u), &n)))
            total += n;
        if (!rc && a && !(rc = cvlm_tokenizer_min_ids(e->tok, a, strlen(a), &n)))
            total += n;
    }
    if (rc)
        return rc;
    if (p->image)
        total += (size_t)cvlm_config_image_tokens(&e->w->cfg);
    if (total >= (size_t)e->max_context)
        return cvlm_errf(CVLM_ETOOBIG,
                         "the prompt (at least %zu tokens) exceeds the context length of %d "
                         "tokens",
                         total, e->max_context);
    return 0;
}

static int build_prompt(struct cvlm_engine *e, const struct cvlm_request_params *p,
                        struct cvlm_prompt *pr)
{
    const struct cvlm_config *c = &e->w->cfg;
    if (!p->raw) {
        struct cvlm_turn *h = NULL;
        int rc;
        if (p->n_history < 0 || p->n_history > 1024)
            return cvlm_errf(CVLM_EINVAL, "history of %d turns", p->n_history);
        if (p->n_history && !(h = calloc((size_t)p->n_history, sizeof(*h))))
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
        for (int i = 0; i < p->n_history; i++) {
            h[i].query = p->history[i].user ? p->history[i].user : "";
            h[i].response = p->history[i].assistant ? p->history[i].assistant : "";
        }
        rc = cvlm_prompt_build(c, e->tok, template_of(e, p->template_name), h, p->n_history,
                               p->prompt, p->image != NULL, pr);
        free(h);
        return rc;
    }
    /* a raw completion: BOS + the text, all language tokens */
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = cvlm_tokenizer_encode(e->tok, p->prompt, strlen(p->prompt), &ids, &n);
    if (rc)
        return rc;
    memset(pr, 0, sizeof(*pr));
    pr->n = (int)n + 1;
    pr->ids = malloc((size_t)pr->n * sizeof(int32_t));
    pr->types = calloc((size_t)pr->n, 1);
    pr->pos = malloc((size_t)pr->n * sizeof(int32_t));
    pr->expert = calloc((size_t)pr->n, 1);
    if (!pr->ids || !pr->types || !pr->pos || !pr->expert) {
        free(ids);
        cvlm_prompt_free(pr);
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    }
    pr->ids[0] = c->bos_token_id;
    if (n)
        memcpy(pr->ids + 1, ids, n * sizeof(int32_t));
    free(ids);
    pr->image_start = -1;
    pr->next_pos = cvlm_position_ids(pr->types, pr->n, pr->pos);
    return 0;
}

/* The rendered prompt's language ids are in the vocabulary (the tokenizer was checked
 * against it at load; this keeps that true whatever a template or tokenizer change does:
 * an id past the embedding would fail every request of the batch it ran in). */
static int check_prompt_ids(const struct cvlm_engine *e, const struct cvlm_prompt *pr)
{
    int V = e->w->cfg.vocab_size;
    for (int i = 0; i < pr->n; i++)
        if (pr->types[i] == CVLM_TOKEN_LANG && (pr->ids[i] < 0 || pr->ids[i] >= V))
            return cvlm_errf(CVLM_EINVAL,
                             "prompt token %d has id %d, outside the vocabulary of %d tokens", i,
                             (int)pr->ids[i], V);
    return 0;
}

static void request_free(struct cvlm_request *r)
{
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->stop_ids);
    free(r->bias);
    cvlm_grammar_unref(r->grammar);
    cvlm_gstate_free(&r->gstate);
    free(r->pos);
    free(r->expert);
    free(r->pixels);
    free(r->tokens);
    free(r->blocks);
    cvlm_buf_free(&r->hold);
    cvlm_buf_free(&r->out);
    free(r->otok);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/* Takes over the prompt's arrays and sizes the request's own buffers. */
static int adopt(struct cvlm_engine *e, const struct cvlm_request_params *p, struct cvlm_prompt *pr,
                 struct cvlm_request *r)
{
    int bs = cvlm_kv_block_size(e->kv), room = e->max_context - pr->n;
    if (room <= 0 || (p->max_tokens && p->max_tokens > room))
        return cvlm_errf(CVLM_ETOOBIG,
                         "the prompt (%d tokens) plus max_tokens (%d) exceeds the context "
                         "length of %d tokens",
                         pr->n, p->max_tokens, e->max_context);
    r->n_prompt = pr->n;
    r->max_new = p->max_tokens ? p->max_tokens : room;
    r->cap = r->n_prompt + r->max_new;
    r->pos = pr->pos;
    r->expert = pr->expert;
    r->next_pos0 = pr->next_pos;
    r->image_start = pr->image_start;
    r->image_len = pr->image_start >= 0 ? cvlm_config_image_tokens(&e->w->cfg) : 0;
    pr->pos = NULL;
    pr->expert = NULL;
    r->tokens = malloc((size_t)r->cap * sizeof(int32_t));
    r->blocks = malloc((size_t)((r->cap + bs - 1) / bs) * sizeof(int32_t));
    if (!r->tokens || !r->blocks)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    memcpy(r->tokens, pr->ids, (size_t)r->n_prompt * sizeof(int32_t));
    r->n_tokens = r->n_prompt;
    return 0;
}

/* Copies the caller's lists: stop strings, stop ids and the logit bias. */
static int copy_lists(const struct cvlm_request_params *p, struct cvlm_request *r)
{
    if (p->n_stop && !(r->stop = calloc((size_t)p->n_stop, sizeof(char *))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    for (int i = 0; i < p->n_stop; i++, r->n_stop++)
        if (!(r->stop[i] = strdup(p->stop[i])))
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (p->n_stop_ids && !(r->stop_ids = malloc((size_t)p->n_stop_ids * sizeof(int32_t))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (p->n_stop_ids)
        memcpy(r->stop_ids, p->stop_ids, (size_t)p->n_stop_ids * sizeof(int32_t));
    r->n_stop_ids = p->n_stop_ids;
    if (p->n_logit_bias && !(r->bias = malloc((size_t)p->n_logit_bias * sizeof(*r->bias))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (p->n_logit_bias)
        memcpy(r->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof(*r->bias));
    r->n_bias = p->n_logit_bias;
    return 0;
}

/* The response format's grammar (shared through the engine's table) and its start. */
static int prepare_grammar(struct cvlm_engine *e, const struct cvlm_request_params *p,
                           struct cvlm_request *r)
{
    if (p->response_format == CVLM_RFORMAT_TEXT)
        return 0;
    if (p->response_format != CVLM_RFORMAT_JSON_OBJECT &&
        p->response_format != CVLM_RFORMAT_JSON_SCHEMA)
        return cvlm_errf(CVLM_EINVAL, "unknown response format %d", p->response_format);
    int rc = cvlm_grammar_table_get(e->grammars, (enum cvlm_rformat)p->response_format,
                                    p->json_schema, p->json_schema_len, &r->grammar);
    return rc ? rc : cvlm_gstate_init(r->grammar, &r->gstate);
}

int cvlm_request_create(struct cvlm_engine *e, const struct cvlm_request_params *p,
                        struct cvlm_request **out)
{
    struct cvlm_request *r;
    struct cvlm_prompt pr = {0};
    int rc;
    *out = NULL;
    if ((rc = check_params(p, e->w->cfg.vocab_size)))
        return rc;
    if (!(r = calloc(1, sizeof(*r))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    pthread_mutex_init(&r->mu, NULL);
    atomic_init(&r->refs, 1);
    atomic_init(&r->cancel, 0);
    r->tok = e->tok;
    r->sp = p->sampling;
    r->ignore_eos = p->ignore_eos;
    r->logprobs = p->logprobs;
    cvlm_rng_seed(&r->rng, p->sampling.seed);
    cvlm_detok_init(&r->dt, e->tok);
    /* a completion continues its prompt, so its first word keeps its leading space; a
     * chat answer is decoded on its own, as the reference demos do */
    r->dt.started = p->raw;
    if ((rc = check_prompt_bound(e, p)) || (p->image && (rc = prepare_image(e, p, r))) ||
        (rc = build_prompt(e, p, &pr)) || (rc = check_prompt_ids(e, &pr)) ||
        (rc = adopt(e, p, &pr, r)) || (rc = copy_lists(p, r)) || (rc = prepare_grammar(e, p, r))) {
        cvlm_prompt_free(&pr);
        request_free(r);
        return rc;
    }
    cvlm_prompt_free(&pr);
    *out = r;
    return 0;
}

void cvlm_request_ref(struct cvlm_request *r)
{
    atomic_fetch_add(&r->refs, 1);
}

void cvlm_request_unref(struct cvlm_request *r)
{
    if (r && atomic_fetch_sub(&r->refs, 1) == 1)
        request_free(r);
}

int cvlm_request_prompt_tokens(const struct cvlm_request *r)
{
    return r->n_prompt;
}

void cvlm_request_image_size(const struct cvlm_request *r, int *width, int *height)
{
    *width = r->image_wh[0];
    *height = r->image_wh[1];
}

/* ---- output -------------------------------------------------------------------------- */

/* Appends text to the output queue (mu held by the caller). */
static void out_text(struct cvlm_request *r, const char *s, size_t n)
{
    if (n && cvlm_buf_append(&r->out, s, n))
        r->out_failed = 1;
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of a stop string. */
static size_t stop_prefix_suffix(const struct cvlm_request *r, const char *s, size_t n)
{
    size_t best = 0;
    for (int i = 0; i < r->n_stop; i++) {
        size_t L = strlen(r->stop[i]);
        for (size_t k = L - 1 < n ? L - 1 : n; k > best; k--)
            if (!memcmp(s + n - k, r->stop[i], k)) {
                best = k;
                break;
            }
    }
    return best;
}

/* Moves held text to the output, cutting at the first stop string; returns 1 if one was
 * found (the request is then finished by the caller). */
static int release_held(struct cvlm_request *r, int final)
{
    struct cvlm_buf *h = &r->hold;
    size_t cut = h->len, keep = 0;
    int hit = 0;
    for (int i = 0; i < r->n_stop && h->len; i++) {
        char *at = memmem(h->p, h->len, r->stop[i], strlen(r->stop[i]));
        if (at && (size_t)(at - h->p) < cut) {
            cut = (size_t)(at - h->p);
            hit = 1;
        }
    }
    if (!hit && !final) {
        keep = stop_prefix_suffix(r, h->p, h->len);
        cut = h->len - keep;
    }
    pthread_mutex_lock(&r->mu);
    out_text(r, h->p, cut);
    pthread_mutex_unlock(&r->mu);
    if (keep)
        memmove(h->p, h->p + h->len - keep, keep);
    h->len = hit ? 0 : keep;
    r->stop_hit |= hit;
    return hit;
}

/* Called with r->mu held, so that once the owner has taken the finish (under r->mu) no
 * wake-up can still be in flight: the owner may then free whatever the hook touches. */
static void wake_locked(struct cvlm_request *r)
{
    if (r->wake)
        r->wake(r->wake_ctx);
}

/* Queues a token's logprobs record (mu held). */
static void out_token(struct cvlm_request *r, const struct cvlm_token_out *t)
{
    if (r->n_otok == r->otok_cap) {
        int nc = r->otok_cap ? r->otok_cap * 2 : 16;
        struct cvlm_token_out *no = realloc(r->otok, (size_t)nc * sizeof(*no));
        if (!no) {
            r->out_failed = 1;
            return;
        }
        r->otok = no;
        r->otok_cap = nc;
    }
    r->otok[r->n_otok++] = *t;
}

int cvlm_req_emit_token(struct cvlm_request *r, const struct cvlm_token_out *t)
{
    char piece[1024];
    size_t n = 0;
    struct cvlm_token_out rec = *t;
    if (r->t_first == 0)
        r->t_first = cvlm_now_ms();
    /* text first: the token's record says how much of its piece the text left out */
    int pushed = !cvlm_detok_push(&r->dt, t->id, piece, sizeof(piece), &n);
    rec.lead_strip = (int8_t)(pushed ? r->dt.last_strip : 0);
    if (pushed && n && cvlm_buf_append(&r->hold, piece, n))
        r->out_failed = 1;
    pthread_mutex_lock(&r->mu);
    r->completion_tokens++;
    if (r->logprobs >= 0)
        out_token(r, &rec);
    pthread_mutex_unlock(&r->mu);
    /* then the text, and one wake-up for this token */
    int stopped = release_held(r, 0);
    pthread_mutex_lock(&r->mu);
    wake_locked(r);
    int failed = r->out_failed;
    pthread_mutex_unlock(&r->mu);
    return failed ? -1 : stopped;
}

void cvlm_req_finish(struct cvlm_request *r, enum cvlm_finish why, const char *error)
{
    char piece[64];
    size_t n = 0;
    double now = cvlm_now_ms();
    /* the rest of the text: bytes the detokenizer held, then the stop-string hold-back
     * (a stop string already cut the hold to nothing) */
    int more = why != CVLM_FINISH_ERROR && !r->stop_hit;
    if (more && !cvlm_detok_flush(&r->dt, piece, sizeof(piece), &n) && n &&
        cvlm_buf_append(&r->hold, piece, n))
        r->out_failed = 1;
    if (more && release_held(r, 1) && why != CVLM_FINISH_CANCELLED)
        why = CVLM_FINISH_STOP;
    pthread_mutex_lock(&r->mu);
    if (r->out_failed && why != CVLM_FINISH_CANCELLED) { /* never a silently shortened text */
        why = CVLM_FINISH_ERROR;
        error = "out of memory for the output";
    }
    r->finish = why;
    if (error)
        snprintf(r->error, sizeof(r->error), "%s", error);
    r->queue_ms = r->t_admit > 0 ? r->t_admit - r->t_submit : now - r->t_submit;
    r->ttft_ms = r->t_first > 0 ? r->t_first - r->t_submit : 0;
    r->e2e_ms = now - r->t_submit;
    r->state = CVLM_REQ_DONE;
    wake_locked(r);
    pthread_mutex_unlock(&r->mu);
}

int cvlm_request_take(struct cvlm_request *r, struct cvlm_output *o)
{
    int any;
    memset(o, 0, sizeof(*o));
    pthread_mutex_lock(&r->mu);
    if (r->out.len || r->out.failed) /* a failed buffer gives NULL and 0 (and is reset) */
        o->text = cvlm_buf_take(&r->out, &o->text_len);
    o->tokens = r->otok;
    o->n_tokens = r->n_otok;
    r->otok = NULL;
    r->n_otok = r->otok_cap = 0;
    o->prompt_tokens = r->n_prompt;
    o->completion_tokens = r->completion_tokens;
    if (r->finish != CVLM_FINISH_NONE && !r->finish_taken) {
        r->finish_taken = 1;
        o->finish = r->finish;
        memcpy(o->error, r->error, sizeof(o->error));
        o->queue_ms = r->queue_ms;
        o->vision_ms = r->vision_ms;
        o->ttft_ms = r->ttft_ms;
        o->e2e_ms = r->e2e_ms;
    }
    any = o->text_len || o->n_tokens || o->finish != CVLM_FINISH_NONE;
    pthread_mutex_unlock(&r->mu);
    return any;
}

int cvlm_request_pending(struct cvlm_request *r)
{
    pthread_mutex_lock(&r->mu);
    int any = r->out.len || r->n_otok || (r->finish != CVLM_FINISH_NONE && !r->finish_taken);
    pthread_mutex_unlock(&r->mu);
    return any;
}

void cvlm_output_free(struct cvlm_output *o)
{
    free(o->text);
    free(o->tokens);
    memset(o, 0, sizeof(*o));
}
