/* request.h - a request's full state (internal to engine/; the server sees it opaque).
 *
 * Three parts with three owners:
 * - the prepared input, immutable after cvlm_request_create (prompt tokens, positions,
 *   experts, image pixels and hash, sampling parameters);
 * - the scheduling state, touched only by the engine thread (tokens generated, KV blocks,
 *   features, detokenizer, stop-string hold-back);
 * - the output queue, under `mu`, filled by the engine thread and drained by the owner
 *   with cvlm_request_take().
 */
#ifndef CVLM_REQUEST_H
#define CVLM_REQUEST_H

#include "base/buf.h"
#include "base/clock.h"
#include "engine/engine.h"
#include "engine/text/tokenizer.h"

#include <pthread.h>
#include <stdatomic.h>

struct cvlm_feats; /* engine/model/model.h */

enum cvlm_req_state {
    CVLM_REQ_NEW = 0,
    CVLM_REQ_WAITING,
    CVLM_REQ_RUNNING, /* prefilling (more than one slot to feed) or decoding (one) */
    CVLM_REQ_DONE,
};

struct cvlm_request {
    atomic_int refs;
    atomic_int cancel;
    const struct cvlm_tokenizer *tok;

    /* prepared input (immutable) */
    int n_prompt, cap; /* cap = n_prompt + max_new slots */
    int32_t *pos;      /* [n_prompt] */
    uint8_t *expert;   /* [n_prompt] */
    int next_pos0;     /* position of the first generated token */
    int image_start, image_len;
    float *pixels; /* normalized CHW, NULL without image */
    uint64_t img_hash;
    int image_wh[2]; /* the image's own width and height as decoded; 0 without image */
    struct cvlm_sampling sp;
    int max_new, ignore_eos, logprobs;
    char **stop;
    int n_stop;
    int32_t *stop_ids;
    int n_stop_ids;
    struct cvlm_logit_bias *bias; /* added to the raw logits before sampling */
    int n_bias;
    struct cvlm_grammar *grammar; /* response_format's grammar, NULL: free text */

    /* engine thread */
    enum cvlm_req_state state;
    int32_t *tokens;          /* [cap] prompt then generated */
    int n_tokens, n_computed; /* slots known / slots whose KV is written */
    int32_t *blocks;          /* [ceil(cap / block_size)] */
    int n_blocks, n_published;
    uint64_t chain;           /* chain hash of the published blocks so far */
    struct cvlm_feats *feats; /* pinned vision-cache entry while image slots remain */
    struct cvlm_rng rng;
    struct cvlm_gstate gstate; /* the output so far in `grammar` */
    struct cvlm_detok dt;
    struct cvlm_buf hold; /* decoded text held back: may start a stop string */
    int stop_hit;         /* a stop string ended the text: nothing more is emitted */
    uint64_t admit_no;    /* admission order: the newest is preempted first */
    double t_submit, t_admit, t_first, vision_ms;
    struct cvlm_request *next;

    /* output queue (mu) */
    pthread_mutex_t mu;
    struct cvlm_buf out; /* text not yet taken */
    struct cvlm_token_out *otok;
    int n_otok, otok_cap;
    int out_failed; /* output could not be queued (memory): the request fails */
    enum cvlm_finish finish;
    int finish_taken;
    char error[256];
    int completion_tokens;
    double queue_ms, ttft_ms, e2e_ms;
    void (*wake)(void *ctx);
    void *wake_ctx;
};

/* Position and expert of any slot (prompt or generated). */
static inline int32_t cvlm_req_pos(const struct cvlm_request *r, int slot)
{
    return slot < r->n_prompt ? r->pos[slot] : r->next_pos0 + (slot - r->n_prompt);
}
static inline uint8_t cvlm_req_expert(const struct cvlm_request *r, int slot)
{
    return slot < r->n_prompt ? r->expert[slot] : 0;
}

/* Engine-thread side of the output: appends a generated token (with its sampled
 * logprobs when asked), runs the stop-string hold-back, and finishes.
 * cvlm_req_emit_token returns 0, 1 when a stop string ended the text, or -1 when the
 * output could not be queued (out of memory: the caller fails the request; no output is
 * ever dropped silently). */
int cvlm_req_emit_token(struct cvlm_request *r, const struct cvlm_token_out *t);
void cvlm_req_finish(struct cvlm_request *r, enum cvlm_finish why, const char *error);

#endif
