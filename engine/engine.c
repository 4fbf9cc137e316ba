/* engine.c - the engine thread and the thread-safe API of engine.h.
 *
 * The engine thread loops: take newly submitted requests into the waiting queue, run one
 * scheduler step, publish the stats; it sleeps on a condition variable when there is
 * nothing to do and is woken by submit and cancel. Callers never wait for model work.
 */
#include "engine/sched.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void fill_defaults(struct cvlm_engine_opts *o)
{
    if (o->kv_bytes == 0)
        o->kv_bytes = (size_t)256 << 20;
    if (o->block_size <= 0)
        o->block_size = 16;
    if (o->max_batched_tokens <= 0)
        o->max_batched_tokens = 512;
    if (o->max_seqs <= 0)
        o->max_seqs = 64;
    if (o->max_seqs > o->max_batched_tokens)
        o->max_seqs = o->max_batched_tokens; /* every running sequence decodes each step */
    if (o->queue_limit <= 0)
        o->queue_limit = 256;
}

/* Per-step scratch sized for the token budget and the sequence cap. */
static int alloc_scratch(struct cvlm_engine *e)
{
    size_t T = (size_t)e->opts.max_batched_tokens, S = (size_t)e->opts.max_seqs;
    size_t V = (size_t)e->w->cfg.vocab_size;
    e->b_ids = malloc(T * 4);
    e->b_pos = malloc(T * 4);
    e->b_seq = malloc(T * 4);
    e->b_slot = malloc(T * 4);
    e->b_img = malloc(T * 4);
    e->b_expert = malloc(T);
    e->b_want = malloc(T);
    e->b_seqs = malloc(S * sizeof(*e->b_seqs));
    e->b_feats = malloc(S * sizeof(*e->b_feats));
    e->b_req = malloc(S * sizeof(*e->b_req));
    e->b_nfed = malloc(S * sizeof(int));
    e->running = malloc(S * sizeof(*e->running));
    e->logits = malloc(S * V * sizeof(float));
    e->lp_scratch = malloc(V * sizeof(float));
    return e->b_ids && e->b_pos && e->b_seq && e->b_slot && e->b_img && e->b_expert &&
                   e->b_want && e->b_seqs && e->b_feats && e->b_req && e->b_nfed &&
                   e->running && e->logits && e->lp_scratch
               ? 0
               : cvlm_errf(CVLM_ENOMEM, "out of memory");
}

/* Model, KV cache (sized from the byte budget) and vision cache. */
static int load(struct cvlm_engine *e)
{
    const struct cvlm_engine_opts *o = &e->opts;
    char path[4096];
    int rc;
    if ((rc = cvlm_weights_load(o->model_dir, &e->w)))
        return rc;
    snprintf(path, sizeof(path), "%s/tokenizer.model", o->model_dir);
    if ((rc = cvlm_tokenizer_load(o->tokenizer ? o->tokenizer : path, &e->tok)))
        return rc;
    const struct cvlm_config *c = &e->w->cfg;
    struct cvlm_model_opts mo = {.max_tokens = o->max_batched_tokens, .kv_bytes = o->kv_bytes,
                                 .block_size = o->block_size, .threads = o->threads,
                                 .backend = (enum cvlm_backend_kind)o->backend, .tp = o->tp,
                                 .device = o->device};
    if ((rc = cvlm_model_create(e->w, &mo, &e->model)))
        return rc;
    int blocks = cvlm_model_kv_blocks(e->model);
    e->max_context = o->max_context > 0 ? o->max_context : c->max_position_embeddings;
    if (e->max_context > blocks * o->block_size)
        e->max_context = blocks * o->block_size; /* one sequence must fit the cache */
    e->kv = cvlm_kv_create(blocks, o->block_size);
    e->vc = cvlm_vc_create(e->model, o->vision_cache_bytes);
    if (!e->kv || !e->vc)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    return alloc_scratch(e);
}

/* Snapshot of the engine thread's counters and cache states for other threads. */
static void publish_stats(struct cvlm_engine *e)
{
    struct cvlm_kv_stats ks;
    struct cvlm_vc_stats vs;
    int w = 0;
    for (struct cvlm_request *r = e->wait_head; r; r = r->next)
        w++;
    cvlm_kv_get_stats(e->kv, &ks);
    cvlm_vc_get_stats(e->vc, &vs);
    pthread_mutex_lock(&e->mu);
    e->pub = e->st;
    e->pub.running = e->n_running;
    e->pub.kv_blocks = ks.n_blocks;
    e->pub.kv_used = ks.used;
    e->pub.kv_cached = ks.cached;
    e->n_waiting_pub = w;
    pthread_mutex_unlock(&e->mu);
}

static void *engine_main(void *arg)
{
    struct cvlm_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stop && !e->in_head && !e->wait_head && !e->n_running)
            pthread_cond_wait(&e->cv, &e->mu);
        while (e->in_head) {
            struct cvlm_request *r = e->in_head;
            e->in_head = r->next;
            e->n_in--;
            cvlm_sched_enqueue(e, r, 0);
        }
        e->in_tail = NULL;
        int stop = e->stop;
        pthread_mutex_unlock(&e->mu);
        if (stop)
            break;
        cvlm_sched_step(e);
        publish_stats(e);
    }
    return NULL;
}

int cvlm_engine_create(const struct cvlm_engine_opts *opts, struct cvlm_engine **out)
{
    struct cvlm_engine *e = calloc(1, sizeof(*e));
    int rc;
    *out = NULL;
    if (!e)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    e->opts = *opts;
    fill_defaults(&e->opts);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    if (!opts->model_dir) {
        rc = cvlm_errf(CVLM_EINVAL, "no model directory");
        goto fail;
    }
    if (!(e->model_dir = strdup(opts->model_dir))) {
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
        goto fail;
    }
    e->opts.model_dir = e->model_dir;
    if ((rc = load(e)))
        goto fail;
    e->opts.tokenizer = NULL; /* the caller's string: used only while loading */
    publish_stats(e);
    if (pthread_create(&e->thread, NULL, engine_main, e)) {
        rc = cvlm_errf(CVLM_ENOMEM, "cannot start the engine thread");
        goto fail;
    }
    e->thread_started = 1;
    *out = e;
    return 0;
fail:
    cvlm_engine_destroy(e);
    return rc;
}

void cvlm_engine_destroy(struct cvlm_engine *e)
{
    if (!e)
        return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_signal(&e->cv);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    /* whatever is left is finished as cancelled (owners still hold their references) */
    while (e->in_head) {
        struct cvlm_request *r = e->in_head;
        e->in_head = r->next;
        cvlm_sched_enqueue(e, r, 0);
    }
    if (e->kv)
        cvlm_sched_abort_all(e);
    void *scratch[] = {e->b_ids, e->b_pos, e->b_seq, e->b_slot, e->b_img, e->b_expert,
                       e->b_want, e->b_seqs, e->b_feats, e->b_req, e->b_nfed, e->running,
                       e->logits, e->lp_scratch};
    for (size_t i = 0; i < sizeof(scratch) / sizeof(scratch[0]); i++)
        free(scratch[i]);
    cvlm_vc_destroy(e->vc);
    cvlm_kv_destroy(e->kv);
    cvlm_model_destroy(e->model);
    cvlm_weights_destroy(e->w);
    cvlm_tokenizer_destroy(e->tok);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    free(e->model_dir);
    free(e);
}

void cvlm_engine_get_info(const struct cvlm_engine *e, struct cvlm_engine_info *info)
{
    const struct cvlm_config *c = &e->w->cfg;
    info->model_dir = e->model_dir;
    info->vocab_size = c->vocab_size;
    info->context_length = e->max_context;
    info->image_tokens = cvlm_config_image_tokens(c);
    info->has_vision = c->has_vision;
    info->eos_id = c->eos_token_id;
    info->bos_id = c->bos_token_id;
    info->kv_blocks = cvlm_model_kv_blocks(e->model);
    info->block_size = e->opts.block_size;
}

int cvlm_engine_submit(struct cvlm_engine *e, struct cvlm_request *r, void (*wake)(void *ctx),
                       void *ctx)
{
    int rc = 0;
    pthread_mutex_lock(&e->mu);
    if (e->draining || e->stop)
        rc = cvlm_errf(CVLM_ESTATE, "the server is shutting down");
    else if (r->state != CVLM_REQ_NEW)
        rc = cvlm_errf(CVLM_EINVAL, "request submitted twice");
    else if (e->n_in + e->n_waiting_pub >= e->opts.queue_limit)
        rc = cvlm_errf(CVLM_EBUSY, "the queue is full (%d waiting)", e->opts.queue_limit);
    if (!rc) {
        cvlm_request_ref(r);
        r->wake = wake;
        r->wake_ctx = ctx;
        r->t_submit = cvlm_now_ms();
        r->state = CVLM_REQ_WAITING;
        r->next = NULL;
        if (e->in_tail)
            e->in_tail->next = r;
        else
            e->in_head = r;
        e->in_tail = r;
        e->n_in++;
        e->st.requests_submitted++; /* read only by the engine thread after the lock */
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return rc;
}

void cvlm_engine_cancel(struct cvlm_engine *e, struct cvlm_request *r)
{
    atomic_store(&r->cancel, 1);
    pthread_mutex_lock(&e->mu);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

size_t cvlm_engine_token_text(const struct cvlm_engine *e, int32_t id, char *buf, size_t cap)
{
    /* the piece itself, with its word-boundary space kept ("\xe2\x96\x81" -> ' '), so that
     * the tokens of a completion concatenate to its text; byte pieces are their byte */
    const char *p = cvlm_tokenizer_piece(e->tok, id);
    size_t n = 0;
    unsigned v;
    if (!p || id == e->w->cfg.bos_token_id || id == e->w->cfg.eos_token_id)
        return 0;
    if (strlen(p) == 6 && sscanf(p, "<0x%2X>", &v) == 1) {
        if (cap)
            buf[n++] = (char)v;
        return n;
    }
    while (*p && n < cap) {
        if (!strncmp(p, "\xe2\x96\x81", 3)) {
            buf[n++] = ' ';
            p += 3;
        } else {
            buf[n++] = *p++;
        }
    }
    return n;
}

void cvlm_engine_get_stats(struct cvlm_engine *e, struct cvlm_engine_stats *s)
{
    pthread_mutex_lock(&e->mu);
    *s = e->pub;
    s->waiting = e->n_waiting_pub + e->n_in;
    pthread_mutex_unlock(&e->mu);
}

void cvlm_engine_drain(struct cvlm_engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->draining = 1;
    pthread_mutex_unlock(&e->mu);
}

int cvlm_engine_pending(struct cvlm_engine *e)
{
    pthread_mutex_lock(&e->mu);
    int n = e->n_in + e->n_waiting_pub + e->pub.running;
    pthread_mutex_unlock(&e->mu);
    return n;
}
