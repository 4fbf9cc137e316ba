/* sched.c - continuous batching over the paged KV cache: one step at a time.
 *
 * A step reads as its phases (cvlm_sched_step): apply cancellations -> plan -> encode
 * images -> forward -> sample -> publish. A running request has slots [n_computed,
 * n_tokens) still to feed: one for a decode, more for a prefill (or a recompute after
 * preemption). The plan is one mixed batch under the token budget: first every decode
 * (oldest first), then prefill chunks of running requests, then new admissions in FIFO
 * order. The vision tower runs once per image, in the step that feeds the image's first
 * slots, unless the vision cache has it or the prefix cache already holds the image's KV;
 * at most max_images_per_step images are encoded per step (the decodes of the batch wait
 * for them: a 17B tower costs seconds per image on a CPU), a chunk whose image is over
 * the budget stops before the image and continues in a later step. A request is admitted
 * only when its whole known sequence fits in free or evictable blocks; decode growth that
 * finds none preempts the newest running request, which is requeued first and recomputed
 * later (its sampler state and emitted text are kept, so its output does not change).
 */
#include "engine/sched/sched.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- queue and bookkeeping ------------------------------------------------------------ */

void cvlm_sched_enqueue(struct cvlm_engine *e, struct cvlm_request *r, int front)
{
    atomic_fetch_add(&e->n_waiting, 1);
    r->state = CVLM_REQ_WAITING;
    r->next = NULL;
    if (front) {
        r->next = e->wait_head;
        e->wait_head = r;
        if (!e->wait_tail)
            e->wait_tail = r;
    } else {
        if (e->wait_tail)
            e->wait_tail->next = r;
        else
            e->wait_head = r;
        e->wait_tail = r;
    }
}

static struct cvlm_request *dequeue(struct cvlm_engine *e)
{
    struct cvlm_request *r = e->wait_head;
    if (r) {
        atomic_fetch_sub(&e->n_waiting, 1);
        e->wait_head = r->next;
        if (!e->wait_head)
            e->wait_tail = NULL;
        r->next = NULL;
    }
    return r;
}

static void release_blocks(struct cvlm_engine *e, struct cvlm_request *r)
{
    for (int i = 0; i < r->n_blocks; i++)
        cvlm_kv_unref(e->kv, r->blocks[i]);
    r->n_blocks = r->n_published = 0;
    r->chain = 0;
}

static void release_feats(struct cvlm_engine *e, struct cvlm_request *r)
{
    if (r->feats)
        cvlm_vc_release(e->vc, r->feats);
    r->feats = NULL;
}

static void remove_running(struct cvlm_engine *e, struct cvlm_request *r)
{
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i] == r) {
            memmove(&e->running[i], &e->running[i + 1], (size_t)(e->n_running - i - 1) * sizeof(r));
            e->n_running--;
            return;
        }
}

/* Ends a request (running or waiting) and drops the engine's reference. */
static void finish(struct cvlm_engine *e, struct cvlm_request *r, enum cvlm_finish why,
                   const char *err)
{
    release_blocks(e, r);
    release_feats(e, r);
    if (r->state == CVLM_REQ_RUNNING)
        remove_running(e, r);
    cvlm_req_finish(r, why, err);
    e->st.requests_finished += why == CVLM_FINISH_STOP || why == CVLM_FINISH_LENGTH;
    e->st.requests_cancelled += why == CVLM_FINISH_CANCELLED;
    e->st.requests_failed += why == CVLM_FINISH_ERROR;
    cvlm_request_unref(r);
}

static void preempt(struct cvlm_engine *e, struct cvlm_request *r)
{
    release_blocks(e, r);
    release_feats(e, r);
    remove_running(e, r);
    r->n_computed = 0;
    cvlm_sched_enqueue(e, r, 1);
    e->st.preemptions++;
}

void cvlm_sched_abort_all(struct cvlm_engine *e)
{
    struct cvlm_request *r;
    while (e->n_running)
        finish(e, e->running[e->n_running - 1], CVLM_FINISH_CANCELLED, NULL);
    while ((r = dequeue(e)))
        finish(e, r, CVLM_FINISH_CANCELLED, NULL);
}

static void apply_cancels(struct cvlm_engine *e)
{
    for (int i = e->n_running - 1; i >= 0; i--)
        if (atomic_load(&e->running[i]->cancel))
            finish(e, e->running[i], CVLM_FINISH_CANCELLED, NULL);
    for (struct cvlm_request **pp = &e->wait_head; *pp;) {
        struct cvlm_request *r = *pp;
        if (atomic_load(&r->cancel)) {
            *pp = r->next;
            atomic_fetch_sub(&e->n_waiting, 1);
            finish(e, r, CVLM_FINISH_CANCELLED, NULL);
        } else {
            pp = &r->next;
        }
    }
    e->wait_tail = NULL;
    for (struct cvlm_request *r = e->wait_head; r; r = r->next)
        e->wait_tail = r;
}

/* ---- KV blocks and the prefix cache ----------------------------------------------------- */

/* What identifies a slot's KV, given everything before it: its token id, or for image
 * slots the image content and the offset inside the image. */
static uint64_t slot_key(const struct cvlm_request *r, int slot)
{
    if (r->image_start >= 0 && slot >= r->image_start && slot < r->image_start + r->image_len) {
        uint64_t h = r->img_hash + (uint64_t)(slot - r->image_start) * 0x9e3779b97f4a7c15ull;
        h ^= h >> 31;
        return h | (1ull << 63);
    }
    return (uint64_t)(uint32_t)r->tokens[slot] + 1;
}

/* Chain hash of block b over every one of its slots: keys are hashed in chunks of 256,
 * each chunk chained onto the previous one, so a block of up to 256 slots hashes as one
 * chunk and a larger one (up to CVLM_MAX_BLOCK_SIZE) covers its slots past 256 too. */
static uint64_t block_hash(const struct cvlm_engine *e, const struct cvlm_request *r, int b,
                           uint64_t prev)
{
    uint64_t keys[256], h = prev;
    int bs = cvlm_kv_block_size(e->kv);
    for (int s0 = b * bs; s0 < (b + 1) * bs; s0 += 256) {
        int n = 0;
        for (int s = s0; s < (b + 1) * bs && n < 256; s++)
            keys[n++] = slot_key(r, s);
        h = cvlm_kv_chain(h, keys, n);
    }
    return h;
}

/* Holds blocks for slots [0, slots); 0 or -1 when no block can be had. */
static int ensure_blocks(struct cvlm_engine *e, struct cvlm_request *r, int slots)
{
    int bs = cvlm_kv_block_size(e->kv);
    while (r->n_blocks * bs < slots) {
        int b = cvlm_kv_alloc(e->kv);
        if (b < 0)
            return -1;
        r->blocks[r->n_blocks++] = b;
    }
    return 0;
}

/* Publishes every block that is now completely computed. */
static void publish_blocks(struct cvlm_engine *e, struct cvlm_request *r)
{
    int bs = cvlm_kv_block_size(e->kv);
    if (e->opts.no_prefix_cache)
        return;
    while ((r->n_published + 1) * bs <= r->n_computed) {
        r->chain = block_hash(e, r, r->n_published, r->chain);
        cvlm_kv_publish(e->kv, r->blocks[r->n_published], r->chain);
        r->n_published++;
    }
}

/* Reuses cached blocks for the longest known prefix, leaving at least one slot to feed
 * (its logits are needed). */
static void match_prefix(struct cvlm_engine *e, struct cvlm_request *r)
{
    int bs = cvlm_kv_block_size(e->kv), full = (r->n_tokens - 1) / bs;
    uint64_t chain = 0;
    if (e->opts.no_prefix_cache)
        return;
    for (int b = 0; b < full; b++) {
        uint64_t h = block_hash(e, r, b, chain);
        int blk = cvlm_kv_lookup(e->kv, h);
        if (blk < 0)
            break;
        r->blocks[r->n_blocks++] = blk;
        chain = h;
    }
    r->chain = chain;
    r->n_published = r->n_blocks;
    r->n_computed = r->n_blocks * bs;
}

/* Admits the queue head if its whole known sequence fits; 1 if admitted. */
static int admit(struct cvlm_engine *e, struct cvlm_request *r)
{
    int bs = cvlm_kv_block_size(e->kv);
    match_prefix(e, r);
    int need = (r->n_tokens + bs - 1) / bs - r->n_blocks;
    if (need > cvlm_kv_available(e->kv)) {
        release_blocks(e, r);
        r->n_computed = 0;
        return 0;
    }
    ensure_blocks(e, r, r->n_tokens);
    e->st.prefix_hit_tokens += (uint64_t)r->n_computed;
    e->st.prefix_query_tokens += (uint64_t)r->n_tokens;
    r->state = CVLM_REQ_RUNNING;
    r->admit_no = ++e->admit_seq;
    if (r->t_admit == 0)
        r->t_admit = cvlm_now_ms();
    e->running[e->n_running++] = r;
    return 1;
}

/* ---- phase 2: the plan ------------------------------------------------------------------ */

/* What one step will run: sequences e->b_req[0..ns) with e->b_nfed[s] slots each (decodes
 * first, then prefill chunks), and the requests whose image goes through the vision tower
 * first, e->enc_req[0..n_enc). The token arrays of the batch are built from it once the
 * images are encoded. */
struct plan {
    int ns;     /* sequences planned */
    int budget; /* tokens left under max_batched_tokens */
    int images; /* vision-tower runs left under the per-step image budget; < 0: no limit */
    int n_enc;  /* images to encode this step */
    int n;      /* tokens in the built batch */
};

static void plan_seq(struct cvlm_engine *e, struct plan *p, struct cvlm_request *r, int cnt)
{
    e->b_req[p->ns] = r;
    e->b_nfed[p->ns++] = cnt;
    p->budget -= cnt;
}

/* Whether r's next chunk of *cnt slots can run this step, as far as its image goes: no
 * image slot in it, features already held or in the vision cache, or the step's image
 * budget admits one more vision-tower run (r is then queued for the encode phase).
 * Without budget the chunk stops before the image, so its text prefix still runs, or r
 * waits for a later step (returns 0). */
static int plan_vision(struct cvlm_engine *e, struct plan *p, struct cvlm_request *r, int *cnt)
{
    if (r->image_start < 0 || r->feats || r->n_computed >= r->image_start + r->image_len ||
        r->n_computed + *cnt <= r->image_start)
        return 1;
    if ((r->feats = cvlm_vc_get(e->vc, r->img_hash))) {
        e->st.vision_hits++;
        return 1;
    }
    if (p->images != 0) {
        p->images -= p->images > 0;
        e->enc_req[p->n_enc++] = r;
        return 1;
    }
    e->st.images_deferred++;
    *cnt = r->image_start - r->n_computed;
    return *cnt > 0;
}

/* Newest running request (highest admission number). */
static struct cvlm_request *newest(struct cvlm_engine *e)
{
    struct cvlm_request *v = NULL;
    for (int i = 0; i < e->n_running; i++)
        if (!v || e->running[i]->admit_no > v->admit_no)
            v = e->running[i];
    return v;
}

/* Every decoding request gets the block its next slot needs, preempting the newest
 * running requests while blocks are short. */
static void grow_decodes(struct cvlm_engine *e)
{
    for (int i = 0; i < e->n_running; i++) {
        struct cvlm_request *r = e->running[i];
        while (r->n_tokens - r->n_computed == 1 && ensure_blocks(e, r, r->n_tokens) < 0) {
            struct cvlm_request *v = newest(e);
            preempt(e, v);
            if (v == r) {
                i--; /* r left the running list; the same index is now the next one */
                break;
            }
            if (v == NULL)
                break;
        }
    }
}

/* The next prefill chunk of r, within the token budget and the image budget. */
static void plan_prefill(struct cvlm_engine *e, struct plan *p, struct cvlm_request *r)
{
    int cnt = r->n_tokens - r->n_computed;
    if (cnt > p->budget)
        cnt = p->budget;
    if (cnt > 0 && plan_vision(e, p, r, &cnt))
        plan_seq(e, p, r, cnt);
}

/* Decodes (oldest first), prefill chunks of running requests, then admissions in FIFO
 * order while tokens, sequences and KV blocks last. */
static void plan_step(struct cvlm_engine *e, struct plan *p)
{
    struct cvlm_request *r;
    grow_decodes(e);
    for (int i = 0; i < e->n_running && p->budget > 0; i++)
        if (e->running[i]->n_tokens - e->running[i]->n_computed == 1)
            plan_seq(e, p, e->running[i], 1);
    for (int i = 0; i < e->n_running && p->budget > 0; i++)
        if (e->running[i]->n_tokens - e->running[i]->n_computed > 1)
            plan_prefill(e, p, e->running[i]);
    while (p->budget > 0 && e->n_running < e->opts.max_seqs && (r = e->wait_head)) {
        if (!admit(e, r))
            break; /* FIFO: the head waits for blocks; nothing overtakes it */
        dequeue(e);
        plan_prefill(e, p, r);
    }
}

/* ---- phase 3: images ---------------------------------------------------------------------- */

/* Takes r's planned chunk out of the plan (its image could not be encoded). */
static void unplan(struct cvlm_engine *e, struct plan *p, struct cvlm_request *r)
{
    for (int s = 0; s < p->ns; s++)
        if (e->b_req[s] == r) {
            p->budget += e->b_nfed[s];
            memmove(&e->b_req[s], &e->b_req[s + 1], (size_t)(p->ns - s - 1) * sizeof(r));
            memmove(&e->b_nfed[s], &e->b_nfed[s + 1], (size_t)(p->ns - s - 1) * sizeof(int));
            p->ns--;
            return;
        }
}

/* Runs r's image through the vision tower into a vision-cache entry (or finds it there,
 * encoded earlier in this step for another request with the same image). */
static int encode_one(struct cvlm_engine *e, struct cvlm_request *r)
{
    if ((r->feats = cvlm_vc_get(e->vc, r->img_hash))) {
        e->st.vision_hits++;
        return 0;
    }
    e->st.vision_misses++;
    if (!(r->feats = cvlm_vc_insert(e->vc, r->img_hash)))
        return cvlm_errf(CVLM_ENOMEM, "out of memory for image features");
    double t0 = cvlm_now_ms();
    int rc = cvlm_model_encode_image(e->model, r->pixels, r->feats, NULL);
    r->vision_ms += cvlm_now_ms() - t0;
    e->st.images_encoded++;
    if (rc) { /* never leave unfilled features in the cache */
        cvlm_vc_discard(e->vc, r->feats);
        r->feats = NULL;
    }
    return rc;
}

/* The vision tower for every image the plan feeds this step; a request whose image fails
 * is finished with the error and leaves the plan. */
static void encode_images(struct cvlm_engine *e, struct plan *p)
{
    for (int i = 0; i < p->n_enc; i++) {
        struct cvlm_request *r = e->enc_req[i];
        if (encode_one(e, r)) {
            unplan(e, p, r);
            finish(e, r, CVLM_FINISH_ERROR, cvlm_last_error());
        }
    }
}

/* ---- phase 4: the forward pass -------------------------------------------------------------- */

/* Writes sequence s of the plan (slots [n_computed, n_computed + b_nfed[s])) into the
 * batch's token arrays. */
static void build_seq(struct cvlm_engine *e, struct plan *p, int s)
{
    struct cvlm_request *r = e->b_req[s];
    int cnt = e->b_nfed[s];
    e->b_seqs[s] = (struct cvlm_seq_kv){r->blocks, r->n_blocks};
    e->b_feats[s] = r->feats;
    for (int slot = r->n_computed; slot < r->n_computed + cnt; slot++, p->n++) {
        int rel = slot - r->image_start;
        e->b_ids[p->n] = r->tokens[slot];
        e->b_pos[p->n] = cvlm_req_pos(r, slot);
        e->b_expert[p->n] = cvlm_req_expert(r, slot);
        e->b_seq[p->n] = s;
        e->b_slot[p->n] = slot;
        e->b_img[p->n] = r->image_start >= 0 && rel >= 0 && rel < r->image_len ? rel : -1;
        e->b_want[p->n] = slot == r->n_tokens - 1;
    }
}

/* The language model over the planned batch; on failure every request in it fails. */
static int forward(struct cvlm_engine *e, struct plan *p)
{
    for (int s = 0; s < p->ns; s++)
        build_seq(e, p, s);
    struct cvlm_batch b = {.n_tokens = p->n,
                           .ids = e->b_ids,
                           .pos = e->b_pos,
                           .expert = e->b_expert,
                           .seq = e->b_seq,
                           .slot = e->b_slot,
                           .img_row = e->b_img,
                           .img_feats = e->b_feats,
                           .seqs = e->b_seqs,
                           .n_seqs = p->ns,
                           .want_logits = e->b_want};
    int rc = cvlm_model_forward(e->model, &b, e->logits);
    e->st.steps++;
    if (rc) {
        char msg[256];
        snprintf(msg, sizeof(msg), "model step failed: %s", cvlm_last_error());
        for (int s = 0; s < p->ns; s++)
            finish(e, e->b_req[s], CVLM_FINISH_ERROR, msg);
        return rc;
    }
    for (int s = 0; s < p->ns; s++)
        e->st.prompt_tokens +=
            (uint64_t)(e->b_req[s]->n_computed < e->b_req[s]->n_prompt ? e->b_nfed[s] : 0);
    return 0;
}

/* ---- phase 5: sampling and output ----------------------------------------------------------- */

/* log-softmax of the raw logits for the chosen token and the top-n alternatives. */
static void fill_logprobs(const float *raw, int V, int top, struct cvlm_token_out *t)
{
    float mx = raw[0];
    double sum = 0;
    for (int i = 1; i < V; i++)
        mx = raw[i] > mx ? raw[i] : mx;
    for (int i = 0; i < V; i++)
        sum += exp((double)raw[i] - mx);
    float lse = mx + (float)log(sum);
    t->logprob = raw[t->id] - lse;
    t->n_top = 0;
    for (int i = 0; i < V && top > 0; i++) { /* insertion into a small sorted list */
        float lp = raw[i] - lse;
        int k;
        if (t->n_top == top) {
            if (lp <= t->top_logprob[top - 1])
                continue;
            k = top - 1;
        } else {
            k = t->n_top++;
        }
        while (k > 0 && t->top_logprob[k - 1] < lp) { /* earlier ids win ties */
            t->top_logprob[k] = t->top_logprob[k - 1];
            t->top_id[k] = t->top_id[k - 1];
            k--;
        }
        t->top_logprob[k] = lp;
        t->top_id[k] = i;
    }
}

static int is_stop_id(const struct cvlm_request *r, int32_t id)
{
    for (int i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == id)
            return 1;
    return 0;
}

/* response_format: every token whose text would leave the grammar gets -inf, EOS too
 * unless the document is complete. 0, or an error (the request fails). */
static int constrain(struct cvlm_engine *e, struct cvlm_request *r, float *row, int V)
{
    const struct cvlm_config *c = &e->w->cfg;
    if (!e->vocab && cvlm_vocab_create(e->tok, V, &e->vocab))
        return CVLM_ENOMEM;
    const uint64_t *m = cvlm_grammar_mask(r->grammar, e->vocab, &r->gstate);
    if (!m)
        return CVLM_ENOMEM;
    int complete = cvlm_gstate_complete(r->grammar, &r->gstate), any = 0;
    for (int w = 0; w * 64 < V; w++) {
        uint64_t out = ~m[w]; /* tokens to ban */
        any |= m[w] != 0;
        if ((w + 1) * 64 > V)
            out &= (1ull << (V & 63)) - 1;
        for (; out; out &= out - 1) {
            int i = w * 64 + __builtin_ctzll(out);
            if (complete && cvlm_config_is_eos(c, i))
                any = 1;
            else
                row[i] = -INFINITY;
        }
    }
    return any ? 0 : cvlm_errf(CVLM_EINVAL, "no token can continue the constrained output");
}

/* Samples the next token of r from its logits row and delivers it. */
static void next_token(struct cvlm_engine *e, struct cvlm_request *r, float *row)
{
    const struct cvlm_config *c = &e->w->cfg;
    struct cvlm_token_out t = {0};
    int V = c->vocab_size;
    if (r->logprobs >= 0) /* logprobs are of the model's own distribution (engine.h) */
        memcpy(e->lp_scratch, row, (size_t)V * sizeof(float));
    cvlm_logit_bias_apply(row, V, r->bias, r->n_bias);
    int id = r->grammar ? constrain(e, r, row, V) : 0;
    if (id >= 0)
        id = cvlm_sample(&r->sp, row, V, r->tokens, r->n_tokens, r->n_prompt, &r->rng);
    if (id < 0) {
        finish(e, r, CVLM_FINISH_ERROR, cvlm_last_error());
        return;
    }
    e->st.generation_tokens++;
    int eos = cvlm_config_is_eos(c, id);
    if ((eos && (!r->ignore_eos || r->grammar)) || is_stop_id(r, id)) {
        finish(e, r, CVLM_FINISH_STOP, NULL);
        return;
    }
    if (r->grammar) { /* the sampled token's text moves the grammar on */
        const char *p;
        size_t n = cvlm_tokenizer_piece_text(e->tok, id, &p);
        if (cvlm_gstate_advance(r->grammar, &r->gstate, (const unsigned char *)p, n) <= 0) {
            finish(e, r, CVLM_FINISH_ERROR, "the constrained output left its grammar");
            return;
        }
    }
    t.id = id;
    if (r->logprobs >= 0)
        fill_logprobs(e->lp_scratch, V, r->logprobs, &t);
    r->tokens[r->n_tokens++] = id;
    int emitted = cvlm_req_emit_token(r, &t);
    if (emitted < 0)
        finish(e, r, CVLM_FINISH_ERROR, "out of memory for the output");
    else if (emitted)
        finish(e, r, CVLM_FINISH_STOP, NULL);
    else if (r->n_tokens >= r->cap)
        finish(e, r, CVLM_FINISH_LENGTH, NULL);
}

/* Advances every sequence of the batch; those that fed their last known slot sample their
 * next token and publish it (text, logprobs, finish) to their owner. */
static void sample_and_publish(struct cvlm_engine *e, struct plan *p)
{
    int V = e->w->cfg.vocab_size, k = 0;
    for (int s = 0; s < p->ns; s++) {
        struct cvlm_request *r = e->b_req[s];
        r->n_computed += e->b_nfed[s];
        publish_blocks(e, r);
        if (r->feats && r->n_computed >= r->image_start + r->image_len)
            release_feats(e, r);
        if (r->n_computed == r->n_tokens)
            next_token(e, r, e->logits + (size_t)k++ * V);
    }
}

/* Adds the time since *t to a phase's total and moves *t on. */
static void lap(double *total, double *t)
{
    double now = cvlm_now_ms();
    *total += now - *t;
    *t = now;
}

int cvlm_sched_step(struct cvlm_engine *e)
{
    int per_step = e->opts.max_images_per_step;
    struct plan p = {.budget = e->opts.max_batched_tokens, .images = per_step > 0 ? per_step : -1};
    double t = cvlm_now_ms();
    apply_cancels(e); /* 1. cancellations free their blocks */
    plan_step(e, &p); /* 2. decodes, prefill chunks, admissions */
    lap(&e->st.plan_ms, &t);
    encode_images(e, &p); /* 3. the vision tower, within its budget */
    lap(&e->st.encode_ms, &t);
    if (p.ns == 0)
        return p.n_enc > 0;
    int rc = forward(e, &p); /* 4. the language model */
    lap(&e->st.forward_ms, &t);
    if (rc)
        return rc;
    sample_and_publish(e, &p); /* 5. sample, 6. publish to the owners */
    lap(&e->st.sample_ms, &t);
    return 1;
}
